"""Executed copies of the notebooks for readers who do not run them: docs/notebooks/*.ipynb.

The notebooks in notebooks/ are committed without outputs (the tests execute them). This
runs each one offline and writes a copy with its outputs, where every plotly figure also
carries a static PNG (drawn by headless Chromium), so GitHub and nbviewer show the plots;
``--html`` also writes an HTML export (nbconvert) beside it.

    python scripts/export_notebooks.py [NAME ...] [--html]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import time
from pathlib import Path

import nbformat
import plotly.io as pio
from nbclient import NotebookClient

from latent_hops.plots import save_png

ROOT = Path(__file__).resolve().parents[1]
PLOTLY = "application/vnd.plotly.v1+json"


def add_pngs(book: nbformat.NotebookNode, chromium: str = "chromium") -> int:
    """Give every plotly output of an executed notebook an ``image/png`` twin; returns how many."""
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        for cell in book.cells:
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if PLOTLY in data and "image/png" not in data:
                    fig = pio.from_json(json.dumps(data[PLOTLY]))
                    png = save_png(fig, Path(tmp) / f"{count}.png", chromium)
                    data["image/png"] = base64.b64encode(png.read_bytes()).decode()
                    count += 1
    return count


def export(name: str, out: Path, html: bool = False, chromium: str = "chromium") -> Path:
    """Execute notebooks/<name>.ipynb offline and write out/<name>.ipynb (+ .html)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    start = time.time()
    NotebookClient(
        book, timeout=1800, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}
    ).execute()
    seconds = time.time() - start
    figures = add_pngs(book, chromium)
    book.metadata["latent_hops"] = {"executed_seconds": round(seconds), "figures": figures}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.ipynb"
    nbformat.write(book, path)
    if html:
        from nbconvert import HTMLExporter

        (out / f"{name}.html").write_text(HTMLExporter().from_notebook_node(book)[0])
    print(f"{path}: executed in {seconds:.0f}s, {figures} figures with PNGs")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "notebooks")
    parser.add_argument("--html", action="store_true")
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    for name in names:
        export(name, args.out, args.html, args.chromium)


if __name__ == "__main__":
    main()
