"""One self-contained HTML page for a run directory: tables, figures and a methods note each.

The evaluation, then one section per registered analysis whose table the run directory
holds (``latent_hops.analysis``), each with the methods note built from the config recorded
in that table (its ``made_by``); what is not there is named in a closing line. plotly.js is
embedded once, so the page works offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from latent_hops.analysis import ReportInput, analyses
from latent_hops.config import config_from_dict
from latent_hops.errors import InputError
from latent_hops.evaluation import summarize
from latent_hops.rundir import read_table, write_text

EVALUATION_NOTE = (
    "Greedy decoding, {max_new_tokens} new tokens; a prompt is answered correctly when an "
    "alias (longer than one character) of the target entity is a case-insensitive substring "
    "of the generation. Analysed cases know both single hops and are not answered by either "
    "shortcut."
)
IDENTITY = ("model", "weights_sha256", "dataset", "dataset_sha256")


def _number(x: float) -> str:
    """A whole number (a layer, a count) as such; other values to 3 decimals."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3f}"


def _table(frame: pd.DataFrame) -> str:
    """A table; a plain row number index is not shown."""
    plain = isinstance(frame.index, pd.RangeIndex)
    return frame.to_html(float_format=_number, border=0, classes="table", index=not plain)


def _section(title: str, note: str, body: str) -> str:
    note = f"<p class='note'>{html.escape(note)}</p>"
    return f"<section><h2>{html.escape(title)}</h2>{note}{body}</section>"


class _Figures:
    """Turns figures into divs, embedding plotly.js in the first one only."""

    def __init__(self):
        self.count = 0

    def __call__(self, fig: go.Figure) -> str:
        self.count += 1
        return fig.to_html(
            full_html=False, include_plotlyjs=self.count == 1, div_id=f"figure-{self.count}"
        )


def _title(run: Path, made_by: dict) -> str:
    """Model and dataset of the run: from the evaluation's provenance, else the manifest."""
    if not made_by.get("model") and (run / "manifest.json").is_file():
        made_by = json.loads((run / "manifest.json").read_text())["runs"][-1]["config"]
    model, dataset = made_by.get("model", "?"), made_by.get("dataset", "?")
    return f"latent_hops report — model {model}, dataset {dataset}"


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from the tables in ``run_dir``; returns its path."""
    run = Path(run_dir)
    if not (run / "evaluation.parquet").is_file():
        raise InputError(
            f"{run} has no evaluation.parquet: run `latent-hops evaluate` (or demo) first",
            code="run-dir",
        )
    fig = _Figures()
    evaluation = read_table(run / "evaluation.parquet")
    made_by = evaluation.attrs["made_by"] or {}
    note = EVALUATION_NOTE.format(
        max_new_tokens=made_by.get("config", {}).get("max_new_tokens", "?")
    )
    parts = [_section("Dataset and hop accuracies", note, _table(summarize(evaluation)))]
    absent = []
    for analysis in analyses():
        path = run / analysis.table_file
        if analysis.report is None:
            continue
        if not path.is_file():
            absent.append(analysis.title)
            continue
        table = read_table(path)
        recorded = table.attrs["made_by"] or {}
        config = config_from_dict(analysis.config, recorded.get("config", {}))
        other = [k for k in IDENTITY if made_by and recorded and recorded.get(k) != made_by.get(k)]
        warning = (
            f"<p class='note'><b>Warning: this table was made with another {', '.join(other)} "
            "than the evaluation.</b></p>"
            if other
            else ""
        )
        section = ReportInput(table, config, evaluation, run, fig, _table)
        parts.append(
            _section(analysis.title, analysis.note(config), warning + analysis.report(section))
        )
    if absent:
        parts.append(f"<p class='note'>Not in this run: {html.escape(', '.join(absent))}.</p>")
    title = _title(run, made_by)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>"
        "body{font-family:sans-serif;margin:2em;max-width:1300px} .note{color:#444;max-width:900px}"
        ".grid{display:flex;flex-wrap:wrap;gap:8px} .table{border-collapse:collapse;font-size:13px}"
        ".table td,.table th{padding:2px 8px;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "".join(parts) + "</body></html>"
    )
    return write_text(run / "report.html", page)
