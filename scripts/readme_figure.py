"""Render the README's back-patching heatmap (a PNG) from a run directory, with headless Chromium.

python scripts/readme_figure.py runs/demo docs/backpatch_heatmap.png [--split test_id --position t2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from latent_hops.analyses import backpatch as bp
from latent_hops.plots import save_png


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--split", default="test_id")
    parser.add_argument("--subset", default="incorrect")
    parser.add_argument("--position", default="t2")
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    labelled = bp.with_labels(
        pd.read_parquet(args.run_dir / "backpatch.parquet"),
        pd.read_parquet(args.run_dir / "evaluation.parquet"),
    )
    fig = bp.backpatch_heatmap(
        bp.cell_rates(labelled),
        args.subset,
        args.position,
        args.split,
        oracle=bp.oracle_rates(labelled),
    )
    save_png(fig, args.png, args.chromium)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
