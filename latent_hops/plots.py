"""What the figures share: layer names and ticks, the percentage heatmap, subset colours, and
standalone HTML pages. Each figure is a function from a table to a plotly Figure and lives in
the analysis that makes the table (the CLI and the report only save or embed them)."""

from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from latent_hops.errors import InputError
from latent_hops.rundir import write_text

GREY = "#d9d9d9"


def layer_name(layer: float) -> str:
    """A layer's axis label: the embedding output (layer -1) is "emb"."""
    return "emb" if layer == -1 else str(int(layer))


def layer_ticks(values) -> dict:
    """Axis ticks at every whole layer the values span, the embedding output labelled "emb"."""
    values = list(values)
    if not values:
        return {}
    ticks = list(range(int(np.floor(min(values))), int(np.ceil(max(values))) + 1))
    return {"tickvals": ticks, "ticktext": [layer_name(t) for t in ticks]}


def percent_heatmap(
    z: np.ndarray, x: list[str], y: list[str], text=None, zmax: float | None = None
) -> go.Heatmap:
    """A heatmap of percentages on the scale 0 to ``zmax`` (default: the panel's own maximum),
    stated on the colour bar: panels shown side by side pass one ``zmax`` so one colour means
    one rate. Grids up to 16 layers also print each cell's value."""
    own = float(np.nanmax(z)) if np.isfinite(z).any() else 0.0
    top = max(own if zmax is None else zmax, 1.0)
    return go.Heatmap(
        z=z,
        x=x,
        y=y,
        text=text,
        hoverinfo="text" if text is not None else None,
        colorscale="Viridis",
        zmin=0,
        zmax=top,
        colorbar={"title": f"% cases<br>(0–{top:.0f})"},
        hoverongaps=False,
        texttemplate="%{z:.0f}" if max(len(x), len(y)) <= 16 else None,
    )


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


def save_png(fig: go.Figure, path: str | Path, chromium: str | None = None) -> Path:
    """A static PNG of a plotly figure at its own size, drawn offline by headless Chromium
    (``chromium``, else the first of chromium / chromium-browser / google-chrome on PATH): no
    kaleido needed. An InputError says what to install where none is found."""
    browser = chromium or next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None or shutil.which(browser) is None:
        raise InputError(
            "save_png needs a Chromium browser (Debian: apt-get install chromium); or install "
            "kaleido and use fig.write_image",
            code="chromium",
        )
    png = Path(path)
    width, height = fig.layout.width or 700, fig.layout.height or 500
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        page.write_text(fig.to_html(include_plotlyjs=True, config={"displayModeBar": False}))
        png.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                browser,
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


def save_html(
    figures: Sequence[go.Figure], path: str | Path, title: str = "latent_hops", note: str = ""
) -> Path:
    """Several figures in one standalone HTML page under a heading and a note (plotly.js
    embedded once: works offline)."""
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)
    ]
    head = f"<h1>{html.escape(title)}</h1>" + (f"<p>{html.escape(note)}</p>" if note else "")
    return write_text(
        Path(path),
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'>{head}" + "\n".join(parts) + "</body></html>",
    )


SUBSET_COLORS = {"correct": "#1b9e77", "incorrect": "#d95f02"}
