"""One self-contained HTML page for a run directory: tables, figures and a methods note each.

Reads whatever the run directory holds (evaluation, back-patching, stages, Patchscopes,
knockout) and skips, with a line saying so, what is not there. plotly.js is embedded once,
so the page works offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from latent_hops import backpatch as bp
from latent_hops import plots
from latent_hops.errors import InputError
from latent_hops.evaluation import summarize

NOTES = {
    "evaluation": "Greedy decoding, 10 new tokens; a prompt is answered correctly when an alias (longer than one "
                  "character) of the target entity is a case-insensitive substring of the generation. Analysed "
                  "cases know both single hops and are not answered by either shortcut.",
    "backpatch": "Back-patch (s → t, s > t): the clean hidden state of layer s (blocks.s.hook_resid_post) at t1 or t2 "
                 "replaces that of layer t, on the prompt pass only; success = e3 in the greedy generation. "
                 "Colour: % of cases a cell rescues (incorrect) or keeps correct (correct). The oracle rate (≥ 1 "
                 "cell succeeds) is shown next to two controls with as many cells: forward patches (s < t) and a "
                 "random direction with the source state's norm.",
    "samples": "Successful generations of the cells that rescue most incorrect cases (per position and kind): "
               "success is an alias substring of the generation, as in the paper, so read what counted.",
    "non_oracle": "Beyond the paper: the best (position, s, t) of each kind is chosen on half of the incorrect "
                  "cases; gain = share of the other half rescued, damage = share of correct cases broken "
                  "(bootstrap 95% intervals).",
    "stages": "Per case, the layer of each stage: first hop resolved (e2 decoded at t1), information propagation "
              "(mean of: last→t1 knockout layer, attention output ranking e2 first, e2 decoded at t2), second-hop "
              "onset (e3's logit-lens rank at t2 enters the top 10 and stays), second hop resolved (e3 decoded at "
              "t2), prediction extracted (MLP output ranks the prediction first). 'Decoded' by logit lens, "
              "Patchscopes or linear probe (one figure each).",
    "patchscope": "Patchscopes: the source hidden state is written into the target prompt's placeholder at the "
                  "target layer; the generation is classified with the paper's patterns. The table gives, per "
                  "target prompt and position, the share of runs decoded as each entity.",
    "probe": "Linear probes (ridge regression onto the entity's unembedding vector, nearest candidate wins), "
             "cross-validated by entity: {grouping}. Control: the same probe with shuffled targets. A layer "
             "counts for the stage table only where the probe beats its control by {margin:.0%}.",
    "coverage": "Share of cases for which each method gives each stage a layer. An empty cell means the method "
                "never decoded that entity there (e.g. a small model's logit lens is blind in early layers, so "
                "the probe and Patchscopes carry the first-hop question), or that the analysis was not run.",
    "knockout": "Attention knockout: edges from query to key positions are blocked (score −inf) in all heads of "
                "layers [l − 3, l + 3]; a layer matters when the answer changes (and not both are correct).",
}


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(float_format=lambda x: f"{x:.3f}", border=0, classes="table")


def _section(title: str, note: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>{body}</section>"


class _Figures:
    """Turns figures into divs, embedding plotly.js in the first one only."""

    def __init__(self):
        self.count = 0

    def __call__(self, fig: go.Figure) -> str:
        self.count += 1
        return fig.to_html(full_html=False, include_plotlyjs=self.count == 1, div_id=f"figure-{self.count}")


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from the tables in ``run_dir``; returns its path."""
    run = Path(run_dir)
    if not (run / "evaluation.parquet").is_file():
        raise InputError(f"{run} has no evaluation.parquet: run `latent-hops evaluate` (or demo) first")
    fig = _Figures()
    evaluation = pd.read_parquet(run / "evaluation.parquet")
    parts = [_section("Dataset and hop accuracies", NOTES["evaluation"], _table(summarize(evaluation)))]

    if (run / "backpatch.parquet").is_file():
        labelled = bp.with_labels(pd.read_parquet(run / "backpatch.parquet"), evaluation)
        oracle, cells = bp.oracle_rates(labelled), bp.cell_rates(labelled)
        splits = sorted(set(oracle.split) - {"all"}) or ["all"]  # per split: ID and OOD failures differ
        heatmaps = [fig(plots.backpatch_heatmap(cells, subset, position, split, oracle=oracle))
                    for split in splits for subset in ("incorrect", "correct") if subset in set(oracle.subset)
                    for position in sorted(set(oracle.position))
                    if len(cells.query("split == @split and subset == @subset"))]
        parts.append(_section("Back-patching", NOTES["backpatch"],
                              "<div class='grid'>" + "".join(heatmaps) + "</div>" + _table(oracle)))
        parts.append(_section("Back-patching without the oracle", NOTES["non_oracle"], _table(bp.non_oracle(labelled))))
        parts.append(_section("What counted as a rescue", NOTES["samples"], _table(bp.success_samples(labelled))))
    else:
        parts.append("<p>No back-patching results in this run.</p>")

    if (run / "stages.parquet").is_file():
        stages = pd.read_parquet(run / "stages.parquet")
        body = "".join(fig(plots.stage_boxplot(stages, m)) for m in stages["method"].unique())
        body += fig(plots.resolution_curves(stages))
        from latent_hops.stages import STAGES, empty_stage_notes, stage_medians
        coverage = stages.groupby(["method", "subset"])[STAGES].agg(lambda c: f"{c.notna().mean():.0%} of {len(c)}")
        absent = {name for name in ("logit-lens", "projection", "knockout")
                  if not (run / f"{name.replace('-', '_')}.parquet").is_file()}
        empty = "".join(f"<li>{html.escape(note)}</li>" for note in empty_stage_notes(stages, absent))
        empty = f"<p class='note'>Empty columns:</p><ul class='note'>{empty}</ul>" if empty else ""
        parts.append(_section("Stages of two-hop queries", NOTES["stages"], body + _table(stage_medians(stages))
                              + empty + f"<p class='note'>{html.escape(NOTES['coverage'])}</p>" + _table(coverage)))
    else:
        parts.append("<p>No stage table in this run.</p>")

    if (run / "patchscope.parquet").is_file():
        scopes = pd.read_parquet(run / "patchscope.parquet")
        from latent_hops.patchscopes import decoded_shares, reads_nothing
        body = fig(plots.patchscope_heatmap(scopes, "t1", "e2")) + fig(plots.patchscope_heatmap(scopes, "t2", "e3"))
        warning = ("<p class='note'><b>Warning: Patchscopes reads nothing on this model</b>: every patched "
                   "generation is the same string whatever the source layer, so its 0% cells measure nothing.</p>"
                   if reads_nothing(scopes) else "")
        parts.append(_section("Patchscopes", NOTES["patchscope"], warning + "<div class='grid'>" + body + "</div>"
                              + _table(decoded_shares(scopes))))
    if (run / "probe.parquet").is_file():
        from latent_hops.probe import DEFAULT_MARGIN, probe_accuracy
        probed = pd.read_parquet(run / "probe.parquet")
        if "grouping" in probed:
            note = NOTES["probe"].format(grouping=probed["grouping"].iloc[0], margin=DEFAULT_MARGIN)
            parts.append(_section("Linear probes", note, _table(probe_accuracy(probed))))
    if (run / "knockout.parquet").is_file():
        parts.append(_section("Attention knockout", NOTES["knockout"],
                              fig(plots.knockout_curves(pd.read_parquet(run / "knockout.parquet"), evaluation))))

    summary, manifest = run / "backpatch_summary.json", run / "manifest.json"
    meta = json.loads(summary.read_text()) if summary.is_file() else {}
    if not meta.get("model") and manifest.is_file():  # no back-patching run: the manifest says what ran
        meta = json.loads(manifest.read_text())["runs"][-1]["config"]
    title = f"latent_hops report — model {meta.get('model', '?')}, dataset {meta.get('dataset', '?')}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1300px} .note{color:#444;max-width:900px}"
            ".grid{display:flex;flex-wrap:wrap;gap:8px} .table{border-collapse:collapse;font-size:13px}"
            ".table td,.table th{padding:2px 8px;border-bottom:1px solid #ddd}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(parts) + "</body></html>")
    out = run / "report.html"
    out.write_text(page)
    return out
