"""Render the README's back-patching heatmap (a PNG) from a run directory, with headless Chromium.

python scripts/readme_figure.py runs/demo docs/backpatch_heatmap.png [--split test_id --position t2]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from latent_hops import plots
from latent_hops.analyses import backpatch as bp

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def save_png(fig, png: Path, chromium: str = "chromium") -> Path:
    """A static PNG of a plotly figure, drawn by headless Chromium at the figure's own size
    (no kaleido needed)."""
    width, height = fig.layout.width or 700, fig.layout.height or 500
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        page.write_text(fig.to_html(include_plotlyjs=True, config={"displayModeBar": False}))
        png.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width + 40},{height + 20}",
                f"--screenshot={png.resolve()}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return png


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
    fig = plots.backpatch_heatmap(
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
