"""The table vocabulary: every column of every table latent_hops writes, declared once.

One name per idea, in every table:

- ``alias_match``: an alias (longer than one character) of the target entity is a
  case-insensitive substring of the generation -- the paper's scoring, whatever the table;
- ``skip_reason``: why a row holds no result (null when it holds one); a skipped row is
  marked, never counted as a result (its measured values are null);
- layers say which kind they are: ``hidden_layer`` (the hidden state of layer l, i.e. the
  residual stream after block l; -1 = the embedding output), ``source_layer`` /
  ``target_layer`` (hidden-state layers read and written), ``block`` (a block's attention or
  MLP output), ``window_center`` / ``window_start`` / ``window_end`` (blocks of a knockout
  window) -- joining two tables on a layer therefore never pairs different kinds;
- missing values are nulls: nullable integers (``Int64``) for ranks and seeds, never -1.

Each table is a ``TableSchema`` (its file, what one row is, its columns) checked whenever it
is written; ``docs/columns.md`` is generated from them (``scripts/column_docs.py``). Tables
carry what made them and ``SCHEMA_VERSION`` in their Parquet metadata; a table of another
schema version is refused with a line saying to recompute (``rundir.reusable_table``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
from pandas.api import types as pdt

SCHEMA_VERSION = 2
"""Version of this vocabulary; recorded in every table (1: latent_hops before the redesign)."""

KINDS = {
    "str": "text (null where the doc says)",
    "int": "integer, never null",
    "Int64": "nullable integer",
    "float": "float (NaN where the doc says)",
    "bool": "true/false, never null",
    "boolean": "nullable true/false",
}


@dataclass(frozen=True)
class Column:
    """One column: its name, what it holds (``kind``, see ``KINDS``) and what it means."""

    name: str
    kind: str
    doc: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name}: unknown kind {self.kind!r}; use {list(KINDS)}")

    def described(self, doc: str) -> Column:
        """The same column with a table's own wording."""
        return replace(self, doc=doc)

    def renamed(self, name: str) -> Column:
        """The same kind of column under another name (``first_hop_alias_match``)."""
        return replace(self, name=name)

    def holds(self, values: pd.Series) -> bool:
        """Whether ``values`` are of this column's kind."""
        dtype = values.dtype
        if len(values) == 0:
            return True
        if self.kind == "str":
            return pdt.is_string_dtype(dtype) or (
                pdt.is_object_dtype(dtype)
                and values.map(lambda v: v is None or isinstance(v, str)).all()
            )
        if self.kind == "int":
            return pdt.is_integer_dtype(dtype) and not values.isna().any()
        if self.kind == "Int64":
            return isinstance(dtype, pd.Int64Dtype)
        if self.kind == "float":
            return pdt.is_float_dtype(dtype)
        if self.kind == "bool":
            return pdt.is_bool_dtype(dtype) and not isinstance(dtype, pd.BooleanDtype)
        return isinstance(dtype, pd.BooleanDtype)  # boolean


@dataclass(frozen=True)
class TableSchema:
    """A table latent_hops writes: its file, what one row is, and its columns in order."""

    file: str
    row: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def check(self, frame: pd.DataFrame, what: str | None = None) -> None:
        """The declared columns, in order and of their kinds; else a bug in the code that made
        ``frame`` (not the user's input)."""
        check_columns(frame, self.columns, what or self.file)

    def empty(self) -> pd.DataFrame:
        """A table of this schema with no rows (each column of its kind)."""
        dtypes = {"str": "object", "int": "int64", "Int64": "Int64", "float": "float64"}
        dtypes |= {"bool": "bool", "boolean": "boolean"}
        return pd.DataFrame({c.name: pd.Series([], dtype=dtypes[c.kind]) for c in self.columns})


def check_columns(frame: pd.DataFrame, columns: Sequence[Column], what: str) -> None:
    """The declared columns, in order and of their kinds; else a bug in the code that made
    ``frame`` (not the user's input)."""
    want, got = [c.name for c in columns], list(frame.columns)
    if got != want:
        raise RuntimeError(f"{what} produced columns {got}, declared {want}")
    wrong = [
        f"{c.name} ({frame[c.name].dtype}, declared {c.kind})"
        for c in columns
        if not c.holds(frame[c.name])
    ]
    if wrong:
        raise RuntimeError(f"{what} produced columns of the wrong kind: {', '.join(wrong)}")


SCHEMAS: dict[str, TableSchema] = {}
"""Every table schema by file name, but the analyses' own (``Analysis.schema``)."""


def register_schema(schema: TableSchema) -> TableSchema:
    SCHEMAS[schema.file] = schema
    return schema


# ---------------------------------------------------------------------------- the vocabulary

ID = Column("id", "str", "query id")
SPLIT = Column("split", "str", "the dataset's split (toy: train, test_id, test_ood; else 'all')")
SUBSET = Column("subset", "str", "correct / incorrect (by the composition answer) / excluded")
POSITION = Column("position", "str", "t1 (e1's last token) or t2 (the prompt's last token)")
HIDDEN_LAYER = Column(
    "hidden_layer",
    "int",
    "hidden state of layer l: the residual stream after block l; -1 = the embedding output",
)
SOURCE_LAYER = Column(
    "source_layer", "int", "hidden-state layer whose clean state is read (-1 = embeddings)"
)
TARGET_LAYER = Column(
    "target_layer", "int", "hidden-state layer it is written into (-1 = embeddings)"
)
BLOCK = Column("block", "int", "transformer block (its attention or MLP output)")
GENERATION = Column("generation", "str", "greedy generation (null: not generated)")
ALIAS_MATCH = Column(
    "alias_match",
    "boolean",
    "an alias (longer than one character) of the target entity is a case-insensitive "
    "substring of the generation (null: not generated)",
)
SKIP_REASON = Column("skip_reason", "str", "why this row holds no result (null when it holds one)")
E2_RANK = Column(
    "e2_rank", "Int64", "rank (0 = top) of e2's best first token (null: no known first token)"
)
E3_RANK = Column(
    "e3_rank", "Int64", "rank (0 = top) of e3's best first token (null: no known first token)"
)

SKIPPED = register_schema(
    TableSchema(
        "skipped",
        "a query that could not become a case (in memory: ``Run.cases()``, "
        "``BackpatchResult.skipped``; written into backpatch_summary.json)",
        (ID, SKIP_REASON.described("why: e1 not found in the prompt's tokens, a prompt too long")),
    )
)


FILES = {
    "evaluation.parquet": "the evaluation (below)",
    "<analysis>.parquet": "an analysis' table (below; <analysis> = its name, the CLI command)",
    "<analysis>/part-*.parquet": "a resumable analysis' parts (its table's columns, a chunk "
    "of cases each); `latent-hops merge` joins every shard's parts",
    "<analysis>/config.json": "what made the parts (the table's provenance): parts made "
    "otherwise are refused, not mixed in",
    "backpatch_cells.parquet": "back-patching's per-cell rates (below)",
    "backpatch_summary.json": "model, dataset, made_by, cases, rows, skipped (the skipped table "
    "below), oracle and non_oracle (below)",
    "backpatch_heatmaps.html": "the back-patching heatmaps, one page (plotly.js embedded)",
    "stages.html": "the stage boxplots and resolution curves, one page",
    "report.html": "`latent-hops report`: every section of the run, one self-contained page",
    "manifest.json": "one entry per command run here: command, its flags, package and library "
    "versions, dataset SHA-256, status (ok, interrupted, failed), start and end",
    "slurm/": "submitit's job files and logs (`--executor slurm`)",
    ".manifest.lock": "the lock concurrent shards take to append to manifest.json",
    ".tmp-*": "a file being written (renamed into place when complete; a killed process's "
    "leftovers are removed on the next run)",
}
"""Every file (pattern) a run directory can hold, and what it is (docs/columns.md)."""


def rank_or_null(rank: int) -> int | None:
    """A rank from ``ranks.best_rank`` (-1: no known token) as a table value (null)."""
    return None if rank < 0 else int(rank)
