"""Two-hop queries: the typed record, the table form, the five prompts, and dataset I/O.

A query is (e1, r1, e2, r2, e3): "the spouse of the performer of Imagine is" has e1 =
Imagine, r1 = performer, e2 = John Lennon (the bridge), r2 = spouse, e3 = Yoko Ono. Many
queries are a pandas DataFrame with one row per query and the columns of ``QUERY_COLUMNS``
(aliases as lists of strings); ``TwoHopQuery`` is one row as a typed record.

``load_dataset`` reads ``"toy"`` (shipped with the package), the paper's ``two_hop.csv``
(aliases stored as Python-list literals), or Parquet / JSONL written by ``save_dataset``.
"""

from __future__ import annotations

import ast
import os
import string
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import pandas as pd

from latent_hops.errors import InputError
from latent_hops.tables import Column, TableSchema, register_schema

PROMPT_KINDS = ("first_hop", "second_hop", "composition", "entity_shortcut", "relation_shortcut")
"""The five prompts of a query (reference §Data), in this order everywhere."""

PROMPT_SUFFIX = " is"
REQUIRED_COLUMNS = (
    "id",
    "e1_label",
    "e2_label",
    "e3_label",
    "e1_aliases",
    "e2_aliases",
    "e3_aliases",
    "r1_template",
    "r2_template",
)


class DatasetError(InputError):
    """A dataset that cannot be read, with the reason (and the row id where there is one)."""

    code = "dataset"


@dataclass(frozen=True)
class TwoHopQuery:
    """One two-hop query (a row of the paper's ``two_hop.csv`` plus a ``split``)."""

    id: str
    e1_label: str
    e2_label: str
    e3_label: str
    r1_template: str  # e.g. "the performer of {}"
    r2_template: str  # e.g. "the spouse of {}"
    e1_aliases: tuple[str, ...] = ()
    e2_aliases: tuple[str, ...] = ()
    e3_aliases: tuple[str, ...] = ()
    e1: str = ""
    r1: str = ""
    e2: str = ""
    r2: str = ""
    e3: str = ""
    e1_type: str = ""
    e2_type: str = ""
    e3_type: str = ""
    r1_type: str = ""
    r2_type: str = ""
    source_prompt: str = ""
    split: str = "all"

    def names(self, entity: str) -> tuple[str, ...]:
        """Label and aliases of ``entity`` ("e1", "e2" or "e3"), label first, deduplicated."""
        label = getattr(self, f"{entity}_label")
        return tuple(dict.fromkeys((label, *getattr(self, f"{entity}_aliases"))))

    def prompts(self, suffix: str = PROMPT_SUFFIX) -> dict[str, str]:
        """The five prompts of the reference (first hop, second hop, composition, shortcuts)."""
        return build_prompts(
            self.r1_template, self.r2_template, self.e1_label, self.e2_label, suffix
        )

    def composition_prompt(self, suffix: str = PROMPT_SUFFIX) -> str:
        """The two-hop prompt: the dataset's ``source_prompt`` when it has one."""
        return self.source_prompt or self.prompts(suffix)["composition"]


QUERY_COLUMNS = tuple(f.name for f in fields(TwoHopQuery))
ALIAS_COLUMNS = ("e1_aliases", "e2_aliases", "e3_aliases")

_QUERY_DOCS = {
    "id": "query id (unique)",
    "e1_label": "the subject's name as it appears in the prompt (Imagine)",
    "e2_label": "the bridge entity's name (John Lennon)",
    "e3_label": "the answer's name (Yoko Ono)",
    "r1_template": "first-hop relation with one {} slot (the performer of {})",
    "r2_template": "second-hop relation with one {} slot (the spouse of {})",
    "e1_aliases": "other names of e1: a list (CSV: a Python list literal, '[\"...\"]')",
    "e2_aliases": "other names of e2 (counted as e2 when generated)",
    "e3_aliases": "other names of e3 (counted as e3 when generated)",
    "e1": "e1's id in the knowledge base (optional; Wikidata in the paper)",
    "r1": "r1's id (optional)",
    "e2": "e2's id (optional)",
    "r2": "r2's id (optional)",
    "e3": "e3's id (optional)",
    "e1_type": "e1's entity type (optional)",
    "e2_type": "e2's entity type (optional; rebalancing caps cases per bridge type)",
    "e3_type": "e3's entity type (optional)",
    "r1_type": "r1's relation type (optional)",
    "r2_type": "r2's relation type (optional)",
    "source_prompt": "the two-hop prompt, if not r2_template(r1_template(e1_label)) + ' is' "
    "(optional)",
    "split": "a split name of your own (optional; default 'all')",
}
QUERY_SCHEMA = register_schema(
    TableSchema(
        "queries (input: the paper's two_hop.csv, or .parquet / .jsonl)",
        "a two-hop query; the first nine columns are required, the rest optional (extra "
        "columns, like the paper's popularity counts, are ignored)",
        tuple(
            Column(name, "str", _QUERY_DOCS[name])
            for name in (
                *REQUIRED_COLUMNS,
                *(c for c in QUERY_COLUMNS if c not in REQUIRED_COLUMNS),
            )
        ),
    )
)
"""The input schema (documentation only: aliases are lists once read)."""


def build_prompts(
    r1_template: str, r2_template: str, e1: str, e2: str, suffix: str = PROMPT_SUFFIX
) -> dict[str, str]:
    """The five prompts, from data-driven templates with one ``{}`` slot each.

    The relation shortcut drops e1: ``r2_template(r1_template(""))``, whitespace-normalised.
    """

    def fill(template: str, value: str) -> str:
        return " ".join(template.format(value).split())

    return {
        "first_hop": fill(r1_template, e1) + suffix,
        "second_hop": fill(r2_template, e2) + suffix,
        "composition": fill(r2_template, fill(r1_template, e1)) + suffix,
        "entity_shortcut": fill(r2_template, e1) + suffix,
        "relation_shortcut": fill(r2_template, fill(r1_template, "")) + suffix,
    }


def composition_spans(
    query: TwoHopQuery, suffix: str = PROMPT_SUFFIX
) -> dict[str, tuple[int, int]] | str:
    """Character spans [start, end) of ``"e1"`` and of the first-hop phrase ``"r1"`` (r1's
    template with e1 in it) in the composition prompt, or a skip reason.

    Computed from the templates, not by searching the prompt, so an e1 name that occurs
    twice (or inside a relation phrase) still maps to its own mention. A ``source_prompt``
    that differs from the template form is searched, and must contain e1 exactly once (its
    r1 phrase is then unknown).
    """
    prompt = query.composition_prompt(suffix)
    if prompt == query.prompts(suffix)["composition"]:
        inner = "\1" + " ".join(query.r1_template.format("\0").split()) + "\2"
        outer = " ".join(query.r2_template.format(inner).split())
        a, b, c, n = outer.index("\1"), outer.index("\0"), outer.index("\2"), len(query.e1_label)
        return {"e1": (b - 1, b - 1 + n), "r1": (a, c + n - 2)}
    count = prompt.count(query.e1_label)
    if count != 1:
        found = "does not occur" if count == 0 else f"occurs {count} times"
        return f"e1 label {query.e1_label!r} {found} in the prompt {prompt!r}"
    start = prompt.index(query.e1_label)
    return {"e1": (start, start + len(query.e1_label))}


def e1_span_in_composition(
    query: TwoHopQuery, suffix: str = PROMPT_SUFFIX
) -> tuple[int, int] | str:
    """Character span of e1's mention in the composition prompt, or a skip reason."""
    spans = composition_spans(query, suffix)
    return spans if isinstance(spans, str) else spans["e1"]


# ---------------------------------------------------------------------------- tables


def queries_to_table(queries: list[TwoHopQuery]) -> pd.DataFrame:
    """Table form of many queries (aliases as lists)."""
    rows = [{**asdict(q), **{c: list(getattr(q, c)) for c in ALIAS_COLUMNS}} for q in queries]
    return pd.DataFrame(rows, columns=list(QUERY_COLUMNS))


def iter_queries(table: pd.DataFrame) -> list[TwoHopQuery]:
    """Typed records for every row of a query table."""
    records = table[list(QUERY_COLUMNS)].to_dict("records")
    return [TwoHopQuery(**{**r, **{c: tuple(r[c]) for c in ALIAS_COLUMNS}}) for r in records]


def _parse_aliases(value: object, row_id: str, column: str) -> list[str]:
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = list(value.tolist() if hasattr(value, "tolist") else value)  # type: ignore[arg-type]
    elif value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        items = []
    else:
        try:
            items = ast.literal_eval(str(value))
        except (ValueError, SyntaxError):
            raise DatasetError(
                f"row id {row_id}: column {column} is not a Python list literal: {value!r}"
            ) from None
        if not isinstance(items, (list, tuple)):
            raise DatasetError(f"row id {row_id}: column {column} is not a list: {value!r}")
    return [str(a) for a in items]


LABEL_COLUMNS = ("e1_label", "e2_label", "e3_label")


def template_problem(template: str) -> str | None:
    """Why a relation template is unusable (None if it is fine): exactly one ``{}`` slot, no
    named or numbered fields, other braces escaped as ``{{`` / ``}}``."""
    try:
        slots = [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as err:
        return f"not a valid template ({err}); write literal braces as '{{{{' and '}}}}'"
    if any(name for name, _, _ in slots):
        named = [n for n, _, _ in slots if n]
        return f"named or numbered fields {named} are not allowed: use one '{{}}'"
    if len(slots) != 1:
        return f"must contain exactly one '{{}}' slot, found {len(slots)}"
    if slots[0][1] or slots[0][2]:
        return "the '{}' slot takes no format spec or conversion"
    return None


def normalize_table(raw: pd.DataFrame, source: str = "dataset") -> pd.DataFrame:
    """Validate a raw query table and bring it to ``QUERY_COLUMNS`` (typed, aliases parsed)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise DatasetError(f"{source}: missing required columns: {', '.join(missing)}")
    if len(raw) == 0:
        raise DatasetError(f"{source}: the dataset is empty (no queries)")
    table = raw.copy()
    table["id"] = table["id"].astype(str)
    dup = table["id"][table["id"].duplicated()].unique()
    if len(dup):
        raise DatasetError(f"{source}: duplicate query ids: {', '.join(map(str, dup[:10]))}")
    for column in ALIAS_COLUMNS:
        table[column] = [_parse_aliases(v, i, column) for v, i in zip(table[column], table["id"])]
    for template in ("r1_template", "r2_template"):
        for value, row in zip(table[template].astype(str), table["id"]):
            problem = template_problem(value)
            if problem:
                raise DatasetError(f"{source}: row id {row}: {template} {value!r}: {problem}")
    for column in LABEL_COLUMNS:  # " Imagine " would put t1 on the wrong token
        table[column] = [" ".join(str(v).split()) for v in table[column]]
        empty = table["id"][table[column] == ""].tolist()
        if empty:  # its prompts would ask about nothing ("the spouse of  is")
            raise DatasetError(
                f"{source}: {column} is empty in {len(empty)} rows (ids: {', '.join(empty[:5])})"
            )
    for column in ALIAS_COLUMNS:
        table[column] = [[" ".join(a.split()) for a in aliases] for aliases in table[column]]
    for column in QUERY_COLUMNS:
        if column in ALIAS_COLUMNS:
            continue
        if column not in table.columns:
            table[column] = "all" if column == "split" else ""
        table[column] = table[column].fillna("").astype(str)
    return table[list(QUERY_COLUMNS)].reset_index(drop=True)


SHIPPED_DATASETS = {
    "toy": ("latent_hops.toy", "two_hop.csv"),
    "world": ("latent_hops.data", "world_two_hop.csv"),
}
"""Datasets inside the package: the toy model's, and real-world facts
(``scripts/build_world_dataset.py``)."""


def shipped_dataset_path(name: str) -> Path:
    """Path of a dataset shipped inside the installed package ("toy" or "world")."""
    package, filename = SHIPPED_DATASETS[name]
    return Path(str(resources.files(package) / filename))


def toy_dataset_path() -> Path:
    """The toy dataset CSV inside the installed package."""
    return shipped_dataset_path("toy")


def load_dataset(spec: str | os.PathLike = "toy") -> pd.DataFrame:
    """Load queries: ``"toy"``, ``"world"``, the paper's CSV, or our Parquet / JSONL; returns
    the table."""
    shipped = str(spec) in SHIPPED_DATASETS
    path = shipped_dataset_path(str(spec)) if shipped else Path(spec).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"dataset {str(spec)!r}: no such file (expected "
            f"{' or '.join(map(repr, SHIPPED_DATASETS))}, "
            ".csv, .parquet or .jsonl)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            raw = pd.read_csv(path, dtype=str, keep_default_na=False)
            _check_delimiter(path, raw)
        elif suffix in (".parquet", ".pq"):
            raw = pd.read_parquet(path)
        elif suffix in (".jsonl", ".json"):
            raw = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        else:
            raise DatasetError(
                f"dataset {path}: unknown format {suffix!r} (use .csv, .parquet or .jsonl)"
            )
    except (pd.errors.ParserError, ValueError, OSError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"dataset {path}: cannot be parsed: {err}") from None
    return normalize_table(raw, str(path))


DELIMITERS = ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"))


def _check_delimiter(path: Path, raw: pd.DataFrame) -> None:
    """A CSV whose header is split by another delimiter reads as one column: say so, rather
    than list every required column as missing."""
    if all(c in raw.columns for c in REQUIRED_COLUMNS):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline()
    for sep, name in DELIMITERS:
        if header.count(sep) > header.count(","):
            raise DatasetError(
                f"dataset {path}: its header is {name}-separated ({header.strip()[:60]!r}...); "
                "latent_hops reads comma-separated CSV, like the paper's two_hop.csv: save it "
                "with commas, or as .parquet / .jsonl"
            )


SAVED_FORMATS = (".parquet", ".pq", ".csv", ".jsonl")


def save_dataset(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a query table in the format its name says, each read back by ``load_dataset``:
    Parquet (the project's own), CSV (the paper's layout: ``write_paper_csv``) or JSON lines.
    (Parquet bytes under a ``.csv`` name, as this once wrote, could not be read back.)"""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVED_FORMATS:
        raise DatasetError(f"{path}: unknown format {suffix!r}; name it {', '.join(SAVED_FORMATS)}")
    table = normalize_table(table, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        return write_paper_csv(table, path)
    if suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        table.to_parquet(path, index=False)
    return path


def write_paper_csv(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a query table exactly in the layout of the paper's ``two_hop.csv``: a leading
    unnamed index column (0, 1, ...), then ``id`` and the other columns, aliases as Python-list
    literals -- the official code reads it with ``pd.read_csv(path, index_col=0)``, which
    would take ``id`` as the index were the leading column missing. ``load_dataset`` reads it
    back (the index column is ignored)."""
    out = table.reset_index(drop=True)
    for column in ALIAS_COLUMNS:
        out[column] = [repr(list(v)) for v in out[column]]
    out.to_csv(path, index=True)
    return Path(path)
