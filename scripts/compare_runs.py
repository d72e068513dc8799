"""Compare the tables of two run directories (e.g. the demo before and after a refactor).

    python scripts/compare_runs.py RUN_A RUN_B [--ignore-columns target,info_propagation_measures]

Every ``*.parquet`` table present in both is compared row by row and value by value (its
provenance metadata aside); exits 1 if any differs. Used for issue 11's "no number changes".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def compare(a: Path, b: Path, ignore: set[str]) -> bool:
    same = True
    for path in sorted(a.glob("*.parquet")):
        other = b / path.name
        if not other.is_file():
            print(f"{path.name}: only in {a}")
            continue
        x, y = pd.read_parquet(path), pd.read_parquet(other)
        extra = sorted(set(x.columns) ^ set(y.columns))
        common = [c for c in x.columns if c in set(y.columns) - ignore]
        try:
            pd.testing.assert_frame_equal(x[common], y[common], check_dtype=False)
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
    args = parser.parse_args()
    ignore = {c for c in args.ignore_columns.split(",") if c}
    sys.exit(0 if compare(args.a, args.b, ignore) else 1)


if __name__ == "__main__":
    main()
