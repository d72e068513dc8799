"""Stages of a two-hop query (reference §5): one row per case with the layer of each stage.

- first hop resolved: min layer where e2 is decoded from t1;
- information propagation: mean of (min layer where knocking out last -> t1 changes the
  answer, min layer whose attention output at t2 ranks e2 first, min layer where e2 is
  decoded from t2), over the measures that exist for the case -- column
  ``info_propagation_measures`` names them, row by row;
- second-hop onset: the first layer from which e3's logit-lens rank at t2 stays within the
  top ``onset_k`` up to the last layer (``logit_lens.onset_layer``);
- second hop resolved: min layer where e3 is decoded from t2;
- prediction extracted: min layer whose MLP output at t2 ranks the model's prediction first.

"Decoded" is estimated by every analysis that decodes entities (logit lens, Patchscopes,
linear probes: column ``method``). The measures come from the registered analyses'
``stage_layers``; an analysis added to the registry with one joins the table by itself.
"""

from __future__ import annotations

import html
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import pandas as pd

from latent_hops import plots
from latent_hops.analysis import (
    Analysis,
    Column,
    Context,
    ReportInput,
    analyses,
    get,
    option,
    register,
)
from latent_hops.errors import InputError

STAGES = [
    "first_hop_layer",
    "info_propagation_layer",
    "second_hop_onset_layer",
    "second_hop_layer",
    "prediction_extracted_layer",
]
DECODED = ("first_hop_layer", "e2_at_t2_layer", "second_hop_layer")  # per decoding method
PROPAGATION = {
    "knockout_layer": "knockout",
    "attn_e2_layer": "attn_e2",
    "e2_at_t2_layer": "e2_at_t2",
}
MEASURES = (
    "second_hop_onset_layer",
    "attn_e2_layer",
    "prediction_extracted_layer",
    "knockout_layer",
)
TABLE = (
    Column("id", "query id"),
    Column("subset", "correct or incorrect (evaluation)"),
    Column("split", "dataset split"),
    Column("method", "how 'decoded' was estimated"),
    *(
        Column(s, "layer of this stage (NaN: never reached, or not measured: see the notes)")
        for s in STAGES
    ),
    Column(
        "info_propagation_measures", "the measures info_propagation_layer averages for this case"
    ),
)


def stage_analyses() -> list[Analysis]:
    """The registered analyses that give the stage table layers, in order."""
    return [a for a in analyses() if a.stage_layers is not None]


@dataclass(frozen=True)
class StagesConfig:
    skip: tuple[str, ...] = option(
        (),
        "comma-separated analyses not to run (their stage columns stay empty); "
        "demo: 'auto' skips what reads nothing on the model (Patchscopes on the toys)",
    )
    onset_k: int = option(10, "second-hop onset: e3's logit-lens rank at t2 stays <= k")
    knockout_preset: str = option(
        "last_to_t1", "the knockout preset whose layer measures information propagation"
    )
    probe_margin: float = option(
        0.10, "a probe layer counts where it beats its control by this margin"
    )


def stage_table(
    evaluation: pd.DataFrame,
    tables: Mapping[str, pd.DataFrame | None],
    config: StagesConfig = StagesConfig(),
) -> pd.DataFrame:
    """Columns ``id``, ``subset``, ``split``, ``method``, the five stage layers and
    ``info_propagation_measures``, from the tables of the stage analyses (by name; a
    missing or None table leaves the columns it feeds empty)."""
    unknown = set(tables) - {a.name for a in stage_analyses()}
    if unknown:
        raise InputError(
            f"no stage analysis named {sorted(unknown)}; stage analyses: "
            f"{', '.join(a.name for a in stage_analyses())}"
        )
    shared = evaluation[["id"]].set_index("id").iloc[:0]
    decoded: dict[str, pd.DataFrame] = {}
    for analysis in stage_analyses():
        table = tables.get(analysis.name)
        if table is None:
            continue
        assert analysis.stage_layers is not None
        layers = analysis.stage_layers(table, config)
        shared = shared.join(layers[[c for c in layers if c in MEASURES]], how="outer")
        if analysis.decodes is not None and not table.empty:
            decoded[analysis.decodes] = layers[[c for c in layers if c in DECODED]]
    if not decoded:
        raise InputError(
            "the stage table needs a decoding method: run the logit lens, Patchscopes or probes"
        )
    shared = shared.reindex(columns=list(MEASURES))
    rows = []
    for method, layers in decoded.items():
        t = shared.join(layers.reindex(columns=list(DECODED)), how="outer")
        measures = t[list(PROPAGATION)]
        t["info_propagation_layer"] = measures.mean(axis=1)
        t["info_propagation_measures"] = [
            ",".join(PROPAGATION[c] for c in PROPAGATION if pd.notna(row[c]))
            for _, row in measures.iterrows()
        ]
        t["method"] = method
        rows.append(t.rename_axis("id").reset_index())
    out = pd.concat(rows, ignore_index=True).merge(
        evaluation[["id", "subset", "split"]], on="id", how="left"
    )
    return out[[c.name for c in TABLE]]


def stage_medians(stages: pd.DataFrame) -> pd.DataFrame:
    """Median layer of each stage per method x split x subset."""
    return stages.groupby(["method", "split", "subset"])[STAGES].median()


STAGE_SOURCES = {
    "first_hop_layer": ((), "e2 never decoded from t1"),
    "info_propagation_layer": (
        ("knockout", "projection"),
        "no knockout effect, no attention output ranking e2 first, e2 never decoded from t2",
    ),
    "second_hop_onset_layer": (("logit-lens",), "e3 never stays in the logit lens' top k at t2"),
    "second_hop_layer": ((), "e3 never decoded from t2"),
    "prediction_extracted_layer": (
        ("projection",),
        "no MLP output at t2 ranks the prediction first",
    ),
}
"""For each stage: the analyses (besides the row's decoding method) that feed it, and what
an empty column means when they ran."""


def empty_stage_notes(stages: pd.DataFrame, skipped: Collection[str] = ()) -> list[str]:
    """One line per (method, stage) column with no value in any case, saying why: all of
    its analyses were skipped ("not measured"), or they ran and the stage was never reached."""
    notes = []
    for method, rows in stages.groupby("method", sort=False):
        for stage in STAGES:
            if rows[stage].notna().any():
                continue
            fed_by, never = STAGE_SOURCES[stage]
            if fed_by and set(fed_by) <= set(skipped):
                notes.append(
                    f"{method}: {stage} empty -- not measured ({', '.join(fed_by)} skipped)"
                )
            else:
                notes.append(
                    f"{method}: {stage} empty -- never reached in {len(rows)} cases: {never}"
                )
    return notes


COVERAGE_NOTE = (
    "A missing layer (NaN) means the stage was never reached for that case (e.g. a small model's "
    "logit "
    "lens is blind in early layers, so the probe and Patchscopes carry the first-hop question), or "
    "that the analysis feeding it was not run (see the notes on empty columns)."
)


def _run(context: Context, config: StagesConfig) -> pd.DataFrame:
    """Every stage analysis not skipped, each reused from the run directory when it was made
    the same way, then the stage table."""
    names = [a.name for a in stage_analyses()]
    unknown = set(config.skip) - set(names)
    if unknown:
        raise InputError(
            f"--skip: unknown analyses {sorted(unknown)}; choose from {', '.join(names)}"
        )
    knockout = context.config("knockout")
    if "knockout" not in config.skip and config.knockout_preset not in knockout.presets:
        raise InputError(
            f"--knockout-preset {config.knockout_preset} is not among the knockout's --presets "
            f"{','.join(knockout.presets)}: add it, or choose another"
        )
    tables = {name: context.table(name) for name in names if name not in config.skip}
    if config.skip:
        print(f"skipped: {', '.join(sorted(config.skip))} (their stage columns are empty)")
    return stage_table(context.evaluation, tables, config)


def _summary(context: Context, stages: pd.DataFrame, config: StagesConfig) -> str:
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        text = stage_medians(stages).to_string()
    text += "".join(f"\nnote: {note}" for note in empty_stage_notes(stages, config.skip))
    if context.run_dir is not None:
        figures = [plots.stage_boxplot(stages, method) for method in stages["method"].unique()]
        figures.append(plots.resolution_curves(stages))
        plots.save_html(
            figures,
            context.run_dir / "stages.html",
            "latent_hops: stages of two-hop queries",
            get("stages").note(config) + " " + COVERAGE_NOTE,
        )
    return text


def _report(section: ReportInput) -> str:
    stages, config = section.table, section.config
    body = "".join(
        section.figure(plots.stage_boxplot(stages, m)) for m in stages["method"].unique()
    )
    body += section.figure(plots.resolution_curves(stages))
    coverage = stages.groupby(["method", "subset"])[STAGES].agg(
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
        "gives each stage "
        "a layer:</p>" + section.html_table(coverage)
    )


register(
    Analysis(
        name="stages",
        title="Stages of two-hop queries",
        order=90,
        help="all stage analyses -> stages.parquet + stages.html",
        config=StagesConfig,
        columns=TABLE,
        run=_run,
        summary=_summary,
        report=_report,
        inputs=stage_analyses,
        uses_positions=lambda config: ("t1", "t2"),
        note=lambda config: (
            "Per case, the layer of each stage: first hop resolved (e2 decoded at t1), information "
            f"propagation (mean of: {config.knockout_preset} knockout layer, attention output "
            "ranking "
            "e2 first, e2 decoded at t2 -- column info_propagation_measures says which exist), "
            f"second-hop onset (e3's logit-lens rank at t2 enters the top {config.onset_k} and "
            "stays), "
            "second hop resolved (e3 decoded at t2), prediction extracted (MLP output ranks the "
            "prediction first). 'Decoded' by each decoding method (one figure each); probe layers "
            "count "
            f"where the probe beats its control by {config.probe_margin:.0%}."
        ),
    )
)
