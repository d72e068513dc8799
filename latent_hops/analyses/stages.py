"""Stages of a two-hop query (reference §5): one row per case with the layer of each stage.

- first hop resolved: min layer where e2 is decoded from t1;
- information propagation: mean of the information-propagation measures the case has
  (the paper's: min layer where knocking out last -> t1 changes the answer, min layer whose
  attention output at t2 ranks e2 first, min layer where e2 is decoded from t2) -- column
  ``info_propagation_measures`` names them, row by row;
- second-hop onset: the first layer from which e3's logit-lens rank at t2 stays within the
  top k up to the last layer;
- second hop resolved: min layer where e3 is decoded from t2;
- prediction extracted: min layer whose MLP output at t2 ranks the model's prediction first.

Nothing here names an analysis: every registered analysis declares the measures it gives
(``Analysis.stage_measures``: column, stage, what an empty value means) and owns their
parameters (the logit lens' ``onset_k``, the knockout's ``--knockout-preset``, the probes'
``--probe-margin``). "Decoded" is estimated by every decoding method (column ``method``: one
row per case and method); the other measures are shared by a case's rows.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from latent_hops.analysis import (
    STAGES,
    Analysis,
    Column,
    Context,
    ReportInput,
    Results,
    StageMeasure,
    analyses,
    get,
    option,
    register,
)
from latent_hops.errors import InputError
from latent_hops.plots import SUBSET_COLORS, layer_ticks, save_html
from latent_hops.tables import ID, SPLIT, SUBSET, TableSchema

logger = logging.getLogger(__name__)

STAGE_COLUMNS = [f"{stage}_layer" for stage in STAGES]
PROPAGATION = "info_propagation"
TABLE = TableSchema(
    "stages.parquet",
    "a case x decoding method",
    (
        ID,
        SUBSET.described("correct or incorrect (evaluation)"),
        SPLIT,
        Column("method", "str", "the decoding method (analysis) that estimated 'decoded'"),
        *(
            Column(
                s,
                "float",
                "layer of this stage, in its measures' kind (a hidden-state layer, a block, a "
                "knockout window's centre); the mean where a case has several measures (NaN: "
                "never reached, or not measured: see the notes)",
            )
            for s in STAGE_COLUMNS
        ),
        Column(
            "info_propagation_measures",
            "str",
            "the measures info_propagation_layer averages for this case (comma-separated)",
        ),
    ),
)


def stage_analyses() -> list[Analysis[Any]]:
    """The registered analyses that give the stage table measures, in order."""
    return [a for a in analyses() if a.stage_measures]


def demo_skips(model: Any) -> tuple[str, ...]:
    """Stage analyses ``--skip auto`` leaves out on ``model`` (``Analysis.demo_skip``): those
    that read nothing there, or cost far more than the others."""
    out = []
    for analysis in stage_analyses():
        why = analysis.demo_skip(model) if analysis.demo_skip else None
        if why:
            logger.info("skipping %s: %s", analysis.name, why)
            out.append(analysis.name)
    return tuple(out)


@dataclass(frozen=True)
class StagesConfig:
    skip: tuple[str, ...] = option(
        (),
        "comma-separated analyses not to run (their stage columns stay empty); 'auto' skips "
        "those that read nothing on the model (Patchscopes on the toys) or cost far more than "
        "the rest (causal tracing)",
    )


def stage_table(
    evaluation: pd.DataFrame,
    tables: Mapping[str, pd.DataFrame | None],
    configs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Columns ``id``, ``subset``, ``split``, ``method``, the five stage layers and
    ``info_propagation_measures``, from the tables of the stage analyses (by name; a missing
    or None table leaves the columns it feeds empty), each reduced with its config
    (``configs``, else its defaults)."""
    configs = configs or {}
    known = {a.name: a for a in stage_analyses()}
    unknown = sorted(set(tables) - set(known))
    if unknown:
        raise InputError(f"no stage analysis named {unknown}; stage analyses: {', '.join(known)}")
    shared = evaluation[["id"]].set_index("id").iloc[:0]
    present: list[StageMeasure] = []
    decoded: dict[str, pd.DataFrame] = {}
    for analysis in known.values():
        table = tables.get(analysis.name)
        if table is None:
            continue
        config = configs.get(analysis.name) or analysis.config()
        layers = analysis.measured_layers(table, config)
        own = [m for m in analysis.stage_measures if not m.decoded]
        shared = shared.join(layers[[m.column for m in own]], how="outer")
        present += own
        if analysis.decodes and not table.empty:
            decoded[analysis.name] = layers[
                [m.column for m in analysis.stage_measures if m.decoded]
            ]
    if not decoded:
        raise InputError(
            "the stage table needs a decoding method: run the logit lens, Patchscopes or probes"
        )
    rows = []
    for method, layers in decoded.items():
        t = shared.join(layers, how="outer")
        measures = present + [m for m in known[method].stage_measures if m.decoded]
        for stage in STAGES:
            columns = [m.column for m in measures if m.stage == stage]
            t[f"{stage}_layer"] = t[columns].mean(axis=1) if columns else float("nan")
        info = [m for m in measures if m.stage == PROPAGATION]
        t["info_propagation_measures"] = [
            ",".join(m.label for m in info if pd.notna(row[m.column]))
            for _, row in t[[m.column for m in info]].iterrows()
        ]
        t["method"] = method
        rows.append(t.rename_axis("id").reset_index())
    out = pd.concat(rows, ignore_index=True).merge(
        evaluation[["id", "subset", "split"]], on="id", how="left"
    )
    out = out[TABLE.names]
    return out.astype({c: float for c in STAGE_COLUMNS})


STAGE_LABELS = {
    "first_hop_layer": "first hop resolved",
    "info_propagation_layer": "information propagation",
    "second_hop_onset_layer": "second-hop onset",
    "second_hop_layer": "second hop resolved",
    "prediction_extracted_layer": "prediction extracted",
}

METHOD_COLORS = ("#1f77b4", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def stage_boxplot(
    stages: pd.DataFrame, method: str = "logit_lens", split: str | None = None
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
    fig.update_yaxes(**layer_ticks(data[list(STAGE_LABELS)].stack().dropna()))
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
    fig.update_xaxes(title="layer", **layer_ticks(layers))
    return fig


def stage_medians(stages: pd.DataFrame) -> pd.DataFrame:
    """Median layer of each stage per method x split x subset."""
    return stages.groupby(["method", "split", "subset"])[STAGE_COLUMNS].median()


def empty_stage_notes(stages: pd.DataFrame, skipped: Collection[str] = ()) -> list[str]:
    """One line per (method, stage) column with no value in any case, saying why: all of
    the analyses feeding it (besides the method) were skipped ("not measured"), or they ran
    and the stage was never reached (what each measure's emptiness means)."""
    notes = []
    for method, rows in stages.groupby("method", sort=False):
        for stage in STAGES:
            if rows[f"{stage}_layer"].notna().any():
                continue
            fed = [
                (a.name, m)
                for a in stage_analyses()
                for m in a.stage_measures
                if m.stage == stage and (not m.decoded or a.name == method)
            ]
            shared = [name for name, m in fed if not m.decoded]
            never = ", ".join(m.empty for _, m in fed) or "no analysis measures it"
            if shared and set(shared) <= set(skipped):
                notes.append(
                    f"{method}: {stage}_layer empty -- not measured ({', '.join(shared)} skipped)"
                )
            else:
                notes.append(
                    f"{method}: {stage}_layer empty -- never reached in {len(rows)} cases: {never}"
                )
    return notes


COVERAGE_NOTE = (
    "A missing layer (NaN) means the stage was never reached for that case (e.g. a small "
    "model's logit lens is blind in early layers, so the probe and Patchscopes carry the "
    "first-hop question), or that the analysis feeding it was not run (see the notes on "
    "empty columns)."
)


def _skipped(context: Context, config: StagesConfig) -> tuple[str, ...]:
    names = [a.name for a in stage_analyses()]
    skip = [s for s in config.skip if s != "auto"]
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise InputError(f"--skip: unknown analyses {unknown}; choose from {', '.join(names)}")
    if "auto" in config.skip:
        skip += demo_skips(context.model)
    return tuple(dict.fromkeys(skip))


def _run(context: Context, config: StagesConfig) -> pd.DataFrame:
    """Every stage analysis not skipped, each reused from the run directory when it was made
    the same way, then the stage table."""
    skip = _skipped(context, config)
    names = [a.name for a in stage_analyses() if a.name not in skip]
    tables = {name: context.table(name) for name in names}
    if skip:
        logger.info("skipped: %s (their stage columns are empty)", ", ".join(sorted(skip)))
    return stage_table(context.evaluation, tables, {n: context.config(n) for n in names})


def _summary(results: Results[StagesConfig]) -> str:
    stages, config = results.table, results.config
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        text = stage_medians(stages).to_string()
    text += "".join(f"\nnote: {note}" for note in empty_stage_notes(stages, config.skip))
    if results.run_dir is not None:
        figures = [stage_boxplot(stages, method) for method in stages["method"].unique()]
        figures.append(resolution_curves(stages))
        save_html(
            figures,
            results.run_dir / "stages.html",
            "latent_hops: stages of two-hop queries",
            get("stages").note(config) + " " + COVERAGE_NOTE,
        )
    return text


def _report(section: ReportInput[StagesConfig]) -> str:
    stages, config = section.table, section.config
    body = "".join(section.figure(stage_boxplot(stages, m)) for m in stages["method"].unique())
    body += section.figure(resolution_curves(stages))
    coverage = stages.groupby(["method", "subset"])[STAGE_COLUMNS].agg(
        lambda c: f"{c.notna().mean():.0%} of {len(c)}"
    )
    empty = "".join(
        f"<li>{html.escape(note)}</li>" for note in empty_stage_notes(stages, config.skip)
    )
    empty = f"<p class='note'>Empty columns:</p><ul class='note'>{empty}</ul>" if empty else ""
    return (
        body
        + section.html_table(stage_medians(stages))
        + empty
        + f"<p class='note'>{html.escape(COVERAGE_NOTE)} Share of cases for which each method "
        "gives each stage a layer:</p>" + section.html_table(coverage)
    )


def _note(config: StagesConfig) -> str:
    measures = "; ".join(
        f"{m.stage}: {m.label} ({a.name})" for a in stage_analyses() for m in a.stage_measures
    )
    return (
        "Per case, the layer of each stage, from the measures the analyses declare (a stage "
        "with several measures is their mean; column info_propagation_measures says which a "
        f"case has): {measures}. 'Decoded' by each decoding method (one figure each)."
    )


register(
    Analysis(
        name="stages",
        title="Stages of two-hop queries",
        order=90,
        help="every stage analysis, then the per-case stage table -> stages.parquet, stages.html",
        config=StagesConfig,
        schema=TABLE,
        run=_run,
        summary=_summary,
        report=_report,
        inputs=stage_analyses,
        uses_positions=lambda config: ("t1", "t2"),
        in_demo=True,
        note=_note,
    )
)
