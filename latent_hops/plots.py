"""Plots: functions from result tables to plotly Figures (the CLI only saves them)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from latent_hops.errors import InputError
from latent_hops.rundir import write_text

GREY = "#d9d9d9"


def layer_name(layer: float) -> str:
    """A layer's axis label: the embedding output (layer -1) is "emb"."""
    return "emb" if layer == -1 else str(int(layer))


def _layer_ticks(values) -> dict:
    """Axis ticks at every whole layer the values span, the embedding output labelled "emb"."""
    values = list(values)
    if not values:
        return {}
    ticks = list(range(int(np.floor(min(values))), int(np.ceil(max(values))) + 1))
    return {"tickvals": ticks, "ticktext": [layer_name(t) for t in ticks]}


def _percent_heatmap(z: np.ndarray, x: list[str], y: list[str], text=None) -> go.Heatmap:
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


def backpatch_heatmap(
    cells: pd.DataFrame,
    subset: str = "incorrect",
    position: str = "t1",
    split: str = "all",
    kind: str = "back",
    oracle: pd.DataFrame | None = None,
) -> go.Figure:
    """Source layer (y) x target layer (x): % of cases for which the cell gives e3.

    ``cells`` is ``backpatch.cell_rates(...)``. Cells outside the kind's region (s <= t for
    back-patches) are grey; hovering shows the counts. With ``oracle``
    (``backpatch.oracle_rates``), the title carries the oracle rate of every kind.
    """
    data = cells[(cells.subset == subset) & (cells.position == position) & (cells.split == split)]
    if data.empty:
        raise InputError(f"no cells for subset={subset!r}, position={position!r}, split={split!r}")
    layers = sorted(set(data.source_layer) | set(data.target_layer))
    index = {layer: i for i, layer in enumerate(layers)}
    z = np.full((len(layers), len(layers)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    for r in data[data.kind == kind].itertuples():
        i, j = index[r.source_layer], index[r.target_layer]
        z[i, j] = 100 * r.rate
        text[i, j] = (
            f"source {r.source_layer} → target {r.target_layer}<br>"
            f"{r.successes}/{r.cases} cases ({100 * r.rate:.0f}%)"
        )
    names = [layer_name(layer) for layer in layers]
    fig = go.Figure(_percent_heatmap(z, names, names, text))
    title = f"Back-patching at {position}: {subset} cases ({split})"
    if oracle is not None:
        o = oracle[
            (oracle.subset == subset) & (oracle.position == position) & (oracle.split == split)
        ]
        rates = ", ".join(f"{r.kind} {100 * r.rate:.0f}%" for r in o.itertuples())
        grid = f"; {int(o.cells.max())} cells per case and kind" if "cells" in o and len(o) else ""
        n = int(o.cases.max()) if len(o) else 0
        title += f"<br><sup>oracle (≥1 cell succeeds) — {rates}; n = {n}{grid}</sup>"
    fig.update_layout(
        title=title,
        xaxis_title="target layer t",
        yaxis_title="source layer s",
        plot_bgcolor=GREY,
        width=620,
        height=520,
    )
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(type="category", showgrid=False)
    return fig


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


STAGE_LABELS = {
    "first_hop_layer": "first hop resolved",
    "info_propagation_layer": "information propagation",
    "second_hop_onset_layer": "second-hop onset",
    "second_hop_layer": "second hop resolved",
    "prediction_extracted_layer": "prediction extracted",
}
SUBSET_COLORS = {"correct": "#1b9e77", "incorrect": "#d95f02"}
METHOD_COLORS = ("#1f77b4", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def stage_boxplot(
    stages: pd.DataFrame, method: str = "patchscopes", split: str | None = None
) -> go.Figure:
    """Boxplots of each stage's layer, correct vs incorrect cases (the paper's Figure).

    Stages keep their order and their place even when no case reached them; each stage's
    label gives n per subset (a box of 1 case is not a finding), and every case is a point.
    """
    data = stages[stages.method == method]
    if split is not None:
        data = data[data.split == split]
    subsets = ("correct", "incorrect")
    counts = {
        stage: " | ".join(str(int(data[data.subset == s][stage].notna().sum())) for s in subsets)
        for stage in STAGE_LABELS
    }
    labels = {stage: f"{name}<br>n = {counts[stage]}" for stage, name in STAGE_LABELS.items()}
    fig = go.Figure()
    for subset in subsets:
        d = data[data.subset == subset]
        long = d.melt(value_vars=list(STAGE_LABELS), var_name="stage", value_name="layer").dropna()
        fig.add_trace(
            go.Box(
                x=long.stage.map(labels),
                y=long.layer,
                name=f"{subset} (n={len(d)})",
                marker_color=SUBSET_COLORS[subset],
                boxmean=True,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
            )
        )
    fig.update_layout(
        boxmode="group",
        title=f"Stages of two-hop queries ({method}{', ' + split if split else ''})"
        "<br><sup>n per stage: correct | incorrect cases that reached it</sup>",
        yaxis_title="layer",
        width=820,
        height=480,
    )
    # the explicit range keeps stages that no case reached on the axis, in their place
    fig.update_xaxes(
        categoryorder="array", categoryarray=list(labels.values()), range=[-0.5, len(labels) - 0.5]
    )
    fig.update_yaxes(**_layer_ticks(data[list(STAGE_LABELS)].stack().dropna()))
    return fig


def resolution_curves(stages: pd.DataFrame, method: str | None = None) -> go.Figure:
    """% of cases whose e2 is decoded from t1 (first hop) / e3 from t2 (second hop) by each
    layer (cumulative over the minimum decoding layer): one panel per hop, one colour per
    method, solid for correct and dashed for incorrect cases."""
    data = stages if method is None else stages[stages.method == method]
    data = data[data.subset.isin(["correct", "incorrect"])]
    hops = (
        ("first_hop_layer", "first hop: e2 from t1"),
        ("second_hop_layer", "second hop: e3 from t2"),
    )
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=[name for _, name in hops], shared_yaxes=True
    )
    layers = sorted(set(data.first_hop_layer.dropna()) | set(data.second_hop_layer.dropna()))
    methods = sorted(data.method.unique())
    for col, (column, _) in enumerate(hops, start=1):
        for (m, subset), d in data.groupby(["method", "subset"]):
            fig.add_trace(
                go.Scatter(
                    x=layers,
                    y=[100 * (d[column] <= layer).mean() for layer in layers],
                    mode="lines+markers",
                    name=f"{m}, {subset} (n={len(d)})",
                    legendgroup=f"{m}, {subset}",
                    showlegend=col == 1,
                    line={
                        "dash": "solid" if subset == "correct" else "dash",
                        "color": METHOD_COLORS[methods.index(m) % len(METHOD_COLORS)],
                    },
                ),
                row=1,
                col=col,
            )
    fig.update_layout(
        title="Cases resolved by layer (minimum decoding layer)",
        yaxis_title="% of cases",
        width=980,
        height=480,
    )
    fig.update_xaxes(title="layer", **_layer_ticks(layers))
    return fig


def patchscope_heatmap(
    scopes: pd.DataFrame, position: str = "t1", entity: str = "e2", ids: Sequence[str] | None = None
) -> go.Figure:
    """Source layer (y) x target layer (x): % of cases decoded as ``entity`` from ``position``."""
    data = scopes[scopes.position == position]
    if ids is not None:
        data = data[data.id.isin(set(ids))]
    hit = (
        data.assign(hit=data.decoded == entity)
        .groupby(["source_layer", "target_layer"])["hit"]
        .mean()
    )
    grid = hit.unstack("target_layer") * 100
    fig = go.Figure(
        _percent_heatmap(
            grid.values,
            [layer_name(c) for c in grid.columns],
            [layer_name(i) for i in grid.index],
        )
    )
    fig.update_layout(
        title=f"Patchscopes: {entity} decoded from {position}",
        xaxis_title="target layer",
        yaxis_title="source layer",
        width=560,
        height=520,
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def knockout_curves(knockout: pd.DataFrame, evaluation: pd.DataFrame) -> go.Figure:
    """% of cases whose answer changes when each window of layers is knocked out, per preset."""
    data = knockout[knockout.skip_reason == ""].merge(evaluation[["id", "subset"]], on="id")
    fig = go.Figure()
    for (preset, subset), d in data.groupby(["preset", "subset"]):
        rate = d.groupby("layer")["changed"].mean() * 100
        fig.add_trace(
            go.Scatter(
                x=rate.index,
                y=rate.values,
                mode="lines+markers",
                name=f"{preset}, {subset}",
                line={"color": SUBSET_COLORS.get(subset)},
            )
        )
    fig.update_layout(
        title="Attention knockout: answer changed",
        xaxis_title="centre layer of the window",
        yaxis_title="% of cases",
        width=820,
        height=480,
    )
    return fig
