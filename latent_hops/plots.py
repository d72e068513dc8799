"""What the figures share: layer names and ticks, the percentage heatmap, subset colours, and
standalone HTML pages. Each figure is a function from a table to a plotly Figure and lives in
the analysis that makes the table (the CLI and the report only save or embed them)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

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


def percent_heatmap(z: np.ndarray, x: list[str], y: list[str], text=None) -> go.Heatmap:
    """A heatmap of percentages whose scale spans the panel's own range (a 0-7% panel is not
    one colour), stated on the colour bar; grids up to 16 layers also print each cell's value."""
    top = max(float(np.nanmax(z)) if np.isfinite(z).any() else 0.0, 1.0)
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
