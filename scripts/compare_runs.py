"""Compare the tables of two run directories (e.g. the demo before and after a refactor).

    python scripts/compare_runs.py RUN_A RUN_B [--ignore-columns a,b] [--schema-1-to-2]

Every ``*.parquet`` table present in both is compared row by row and value by value (its
provenance metadata aside); exits 1 if any differs. ``--schema-1-to-2`` first reads RUN_A's
tables (written before the table vocabulary, schema 1) in schema 2's words: the renamed
columns (``V1_TO_V2``), -1 ranks and seeds as nulls, empty reasons as nulls, and the
dropped ``position_error`` (its text is in ``skip_reason``). That mapping is the whole
difference between the two vocabularies: with it, every number must be the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

KINDS = ("first_hop", "second_hop", "composition", "entity_shortcut", "relation_shortcut")
V1_TO_V2: dict[str, dict[str, str]] = {
    "evaluation.parquet": {
        **{f"{k}_correct": f"{k}_alias_match" for k in KINDS},
        "exclusion_reason": "skip_reason",
    },
    "backpatch.parquet": {"success": "alias_match"},
    "knockout.parquet": {"layer": "window_center", "correct": "alias_match"},
    "logit_lens.parquet": {"layer": "hidden_layer"},
    "projection.parquet": {"layer": "block"},
    "attention.parquet": {"layer": "block"},
    "probe.parquet": {
        "layer": "hidden_layer",
        "correct": "token_match",
        "control_correct": "control_token_match",
    },
}
"""Renamed columns, per table (schema 1 -> schema 2)."""
DROPPED = {"evaluation.parquet": ["position_error"]}
NULL_SENTINELS = {
    "backpatch.parquet": {"e3_rank": -1},
    "logit_lens.parquet": {"e2_rank": -1, "e3_rank": -1},
    "projection.parquet": {"e2_rank": -1, "e3_rank": -1},
    "patchscope.parquet": {"seed": -1},
    "evaluation.parquet": {"skip_reason": ""},
    "knockout.parquet": {"skip_reason": ""},
}
"""Schema 1's stand-ins for a missing value, per table and (schema 2) column."""
VALUES = {"stages.parquet": {"method": {"patchscopes": "patchscope"}}}


def as_schema_2(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """A schema-1 table in schema 2's words (module docstring)."""
    table = table.rename(columns=V1_TO_V2.get(name, {})).drop(columns=DROPPED.get(name, []))
    for column, sentinel in NULL_SENTINELS.get(name, {}).items():
        if column in table:
            table[column] = table[column].mask(table[column] == sentinel)
    for column, mapping in VALUES.get(name, {}).items():
        table[column] = table[column].replace(mapping)
    if name == "backpatch.parquet":  # a screened cell's generation was "", now null
        table["generation"] = table["generation"].mask(table["screened"])
    if name == "knockout.parquet":  # skipped rows held "" / False / False: now nulls
        skipped = table["skip_reason"].notna()
        for column in ("generation", "alias_match", "changed"):
            table[column] = table[column].astype(object).mask(skipped)
    return table


def _comparable(table: pd.DataFrame) -> pd.DataFrame:
    """Nullable and plain dtypes compared by value (an Int64 null equals a float NaN)."""
    out = table.copy()
    for column in out.columns:
        if (
            isinstance(out[column].dtype, (pd.Int64Dtype, pd.BooleanDtype))
            or out[column].dtype == bool
        ):
            out[column] = out[column].astype(object).where(out[column].notna(), None)
        elif out[column].dtype == object or pd.api.types.is_string_dtype(out[column].dtype):
            out[column] = out[column].astype(object).where(out[column].notna(), None)
    return out


def compare(a: Path, b: Path, ignore: set[str], schema_1_to_2: bool = False) -> bool:
    same = True
    for path in sorted(a.glob("*.parquet")):
        other = b / path.name
        if not other.is_file():
            print(f"{path.name}: only in {a}")
            continue
        x, y = pd.read_parquet(path), pd.read_parquet(other)
        if schema_1_to_2:
            x = as_schema_2(path.name, x)
        extra = sorted(set(x.columns) ^ set(y.columns))
        common = [c for c in x.columns if c in set(y.columns) - ignore]
        try:
            pd.testing.assert_frame_equal(
                _comparable(x[common]), _comparable(y[common]), check_dtype=False
            )
            note = f"; columns in one only: {extra}" if extra else ""
            print(f"{path.name}: identical ({len(x)} rows, {len(common)} columns compared{note})")
        except AssertionError as err:
            same = False
            print(f"{path.name}: DIFFERS: {str(err).splitlines()[0]}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore-columns", default="", help="comma-separated columns not compared")
    parser.add_argument(
        "--schema-1-to-2",
        action="store_true",
        help="read RUN_A's tables (schema 1) in schema 2's words first",
    )
    args = parser.parse_args()
    ignore = {c for c in args.ignore_columns.split(",") if c}
    sys.exit(0 if compare(args.a, args.b, ignore, args.schema_1_to_2) else 1)


if __name__ == "__main__":
    main()
