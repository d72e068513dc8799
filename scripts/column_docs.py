"""docs/columns.md: the column dictionary of every table latent_hops writes, from the code.

The evaluation's columns (``evaluation.COLUMNS``) and each registered analysis' declared
``columns`` (the same declaration that checks every table when it is written); a test fails
when this file is out of date: ``python scripts/column_docs.py`` rewrites it.
"""

from __future__ import annotations

from pathlib import Path

from latent_hops.analysis import analyses
from latent_hops.evaluation import COLUMNS as EVALUATION_COLUMNS

OUT = Path(__file__).resolve().parents[1] / "docs" / "columns.md"


def _table(columns) -> list[str]:
    return ["| column | meaning |", "|---|---|", *(f"| `{c.name}` | {c.doc} |" for c in columns)]


def render() -> str:
    lines = [
        "# Column dictionary",
        "",
        "Every table a run directory holds, one section per file; generated from the code by",
        "`python scripts/column_docs.py` (a test keeps it current). Each Parquet file also records",
        "what made it (model, weights, dataset, configuration, version) in its schema metadata,",
        "key `latent_hops.made_by`. Layer -1 is the embedding output; -1 in a rank column means",
        "the entity has no known first token.",
        "",
        "## evaluation.parquet — one row per query",
        "",
        *_table(EVALUATION_COLUMNS),
    ]
    for analysis in analyses():
        lines += ["", f"## {analysis.table_file} — {analysis.title}", "", analysis.help, ""]
        lines += _table(analysis.columns)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
