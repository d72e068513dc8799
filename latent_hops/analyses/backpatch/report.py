"""Back-patching's figure, summary files and report section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from latent_hops.analyses.backpatch.cells import BackpatchConfig
from latent_hops.analyses.backpatch.stats import (
    cell_rates,
    non_oracle,
    oracle_rates,
    oracle_tests,
    success_samples,
    with_labels,
)
from latent_hops.analysis import ReportInput, Results
from latent_hops.config import config_from_dict
from latent_hops.errors import InputError
from latent_hops.plots import GREY, layer_name, percent_heatmap, save_html
from latent_hops.rundir import done_ids, write_table, write_text


def backpatch_heatmap(
    cells: pd.DataFrame,
    subset: str = "incorrect",
    position: str = "t1",
    split: str = "all",
    kind: str = "back",
    oracle: pd.DataFrame | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Source layer (y) x target layer (x): % of cases for which the cell gives e3.

    ``cells`` is ``backpatch.cell_rates(...)``. Cells outside the kind's region (s <= t for
    back-patches) are grey; hovering shows the counts. With ``oracle``
    (``backpatch.oracle_rates``), the title carries the oracle rate of every kind. ``zmax``
    (in %) fixes the colour scale, so heatmaps shown together share one (``shared_zmax``).
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
    fig = go.Figure(percent_heatmap(z, names, names, text, zmax))
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


def shared_zmax(cells: pd.DataFrame, kind: str = "back") -> float:
    """The colour scale's top (in %) for heatmaps of ``cells`` shown together: the highest
    rate of any of their cells of ``kind``."""
    rates = cells.loc[cells.kind == kind, "rate"]
    return 100 * float(rates.max()) if len(rates) else 0.0


def summarize(
    run_dir: Path,
    results: pd.DataFrame,
    evaluation: pd.DataFrame,
    made_by: dict | None = None,
    skipped: pd.DataFrame | None = None,
) -> str:
    """The back-patching summary of ``results``: RUN_DIR/backpatch_cells.parquet,
    backpatch_summary.json and backpatch_heatmaps.html, and the text the CLI prints. One
    function for a run, ``merge`` and the report's inputs."""
    labelled = with_labels(results, evaluation)
    oracle, cells, beyond = oracle_rates(labelled), cell_rates(labelled), non_oracle(labelled)
    tests = oracle_tests(labelled)
    write_table(cells, run_dir / "backpatch_cells.parquet", made_by)
    made_by = made_by or {}
    summary = {
        "model": made_by.get("model"),
        "dataset": made_by.get("dataset"),
        "made_by": made_by,
        "cases": int(results["id"].nunique()),
        "rows": len(results),
        "skipped": [] if skipped is None else skipped.to_dict("records"),
        "oracle": oracle.to_dict("records"),
        "non_oracle": beyond.to_dict("records"),
        "oracle_tests": tests.to_dict("records"),
    }
    write_text(run_dir / "backpatch_summary.json", json.dumps(summary, indent=1, default=str))
    top = shared_zmax(cells[cells.split == "all"])
    figures = [
        backpatch_heatmap(cells, subset, position, oracle=oracle, zmax=top)
        for subset in ("incorrect", "correct")
        if subset in set(oracle.subset)
        for position in sorted(set(oracle.position))
    ]
    save_html(
        figures,
        run_dir / "backpatch_heatmaps.html",
        "latent_hops: back-patching",
        note(config_from_dict(BackpatchConfig, made_by.get("config", {}))),
    )
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        text = oracle[oracle.split == "all"].to_string(index=False)
        if not beyond.empty:
            text += "\n" + beyond[beyond.split == "all"].to_string(index=False)
        if not tests.empty:
            text += "\n" + tests[tests.split == "all"].to_string(index=False)
    return text


def summary(results: Results[BackpatchConfig]) -> str:
    """``summarize`` into the run directory, and a word when the directory holds more cases
    than were asked for this time."""
    if results.run_dir is None:
        return ""
    text = summarize(
        results.run_dir, results.table, results.evaluation, results.made_by, results.skipped
    )
    folder = results.run_dir / "backpatch"
    cases, held = results.table["id"].nunique(), len(done_ids(folder))
    if held > cases:
        text += (
            f"\nsummarising the {cases} requested cases; {folder} holds {held} "
            "(`latent-hops merge` summarises them all)"
        )
    return text


def report(section: ReportInput[BackpatchConfig]) -> str:
    labelled = with_labels(section.table, section.evaluation)
    oracle, cells = oracle_rates(labelled), cell_rates(labelled)
    splits = sorted(set(oracle.split) - {"all"}) or ["all"]  # per split: ID and OOD differ
    top = shared_zmax(cells[cells.split.isin(splits)])
    heatmaps = [
        section.figure(backpatch_heatmap(cells, subset, position, split, oracle=oracle, zmax=top))
        for split in splits
        for subset in ("incorrect", "correct")
        if subset in set(oracle.subset)
        for position in sorted(set(oracle.position))
        if len(cells.query("split == @split and subset == @subset"))
    ]
    shown = oracle.assign(**{c: 100 * oracle[c] for c in ("rate", "ci_low", "ci_high")}).rename(
        columns={
            "rate": "rate %",
            "ci_low": "ci_low %",
            "ci_high": "ci_high %",
        }
    )
    tests = oracle_tests(labelled)
    return (
        "<div class='grid'>"
        + "".join(heatmaps)
        + "</div><p class='note'>Oracle rates with Wilson 95% intervals; successes = cases "
        "rescued (incorrect) or kept correct (correct).</p>"
        + section.html_table(shown)
        + "<h3>Against the controls, case by case</h3><p class='note'>Back-patching against "
        "the forward and random controls on the same cases: McNemar's exact test of the two "
        "oracles and a paired permutation test of the per-case share of successful cells. "
        f"{2 * len(tests)} tests in this table (two per row), uncorrected: read single "
        "p-values with that many in mind.</p>"
        + section.html_table(tests)
        + "<h3>Without the oracle</h3><p class='note'>The best (position, s, t) of each kind "
        "is chosen on half of the incorrect cases; gain = share of the other half rescued, "
        "damage = share of correct cases broken (Wilson 95% intervals).</p>"
        + section.html_table(non_oracle(labelled))
        + "<h3>What counted as a rescue</h3><p class='note'>Successful generations of the "
        "cells that rescue most incorrect cases (per position and kind): success is an alias "
        "substring of the generation, as in the paper, so read what counted.</p>"
        + section.html_table(success_samples(labelled))
    )


def note(config: BackpatchConfig) -> str:
    controls = ", ".join(k for k in config.kinds if k != "back") or "none"
    grid = (
        f" Layer grid: sources {config.source_layers}, targets {config.target_layers}."
        if config.source_layers or config.target_layers
        else ""
    )
    return (
        "Back-patch (s → t, s > t): the clean hidden state of layer s at "
        f"{', '.join(config.positions)} replaces that of layer t, on the prompt pass only; "
        f"success = e3 in the greedy generation ({config.max_new_tokens} tokens). Colour: % "
        "of cases a cell rescues (incorrect) or keeps correct (correct). The oracle rate "
        f"(≥ 1 cell succeeds) is shown next to the controls run ({controls}) with as many "
        "cells: forward patches (s < t) and a random direction with the source state's norm." + grid
    )
