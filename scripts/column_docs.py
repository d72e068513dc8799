"""docs/columns.md: every file a run directory holds and every table's columns, from the code.

The files (``tables.FILES``) and every table schema the package declares (``tables.SCHEMAS``:
the input queries, the evaluation, the back-patching summaries; and each registered
analysis' own) -- the same declarations that check every table when it is written.
A test fails when this file is out of date: ``python scripts/column_docs.py`` rewrites it.
"""

from __future__ import annotations

from pathlib import Path

import latent_hops.evaluation  # noqa: F401 -- declares evaluation.parquet
from latent_hops.analysis import analyses
from latent_hops.tables import FILES, KINDS, SCHEMA_VERSION, SCHEMAS, TableSchema

OUT = Path(__file__).resolve().parents[1] / "docs" / "columns.md"


def _table(schema: TableSchema) -> list[str]:
    rows = (f"| `{c.name}` | {c.kind} | {c.doc} |" for c in schema.columns)
    return ["| column | kind | meaning |", "|---|---|---|", *rows]


def render() -> str:
    own = [a.schema for a in analyses()]  # imports every analysis (and what declares schemas)
    schemas = [*SCHEMAS.values(), *own]
    lines = [
        "# Files and columns",
        "",
        "Every file a run directory holds and every table's columns; generated from the code by",
        "`python scripts/column_docs.py` (a test keeps it current). Each Parquet table records",
        "what made it in its schema metadata (key `latent_hops.made_by`: model, weights hash,",
        "dataset SHA-256, configuration, versions, and the table schema version, now",
        f"{SCHEMA_VERSION}); `latent_hops.read_table(path)` returns a table with it in",
        "`.attrs['made_by']` (`pd.read_parquet` drops it). A table of an older schema is refused",
        "with a line saying to recompute.",
        "",
        "The vocabulary: `alias_match` = an alias of the target entity is in the generation (the",
        "paper's rule); `skip_reason` = why a row holds no result (null when it holds one; a",
        "skipped row's measures are null, never counted); `hidden_layer` = the hidden state of",
        "layer l (-1 = the embedding output), `block` = a block's attention or MLP output,",
        "`window_center` = a knockout window's centre block; ranks and seeds are nullable",
        "integers (null, never -1).",
        "",
        "Kinds: " + "; ".join(f"`{k}` {v}" for k, v in KINDS.items()) + ".",
        "",
        "## Files",
        "",
        "| file | what |",
        "|---|---|",
        *(f"| `{name}` | {doc} |" for name, doc in FILES.items()),
    ]
    for schema in sorted(schemas, key=lambda s: _order(s.file)):
        lines += ["", f"## {schema.file}", "", f"A row: {schema.row}.", ""]
        lines += _table(schema)
    return "\n".join(lines) + "\n"


def _order(file: str) -> tuple[int, str]:
    first = ("queries", "evaluation.parquet")
    return (0 if file.startswith(first[0]) else 1 if file == first[1] else 2, file)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
