"""One call from queries to back-patching results, for notebooks and custom queries.

    import latent_hops as lh
    model = lh.load_model("toy")
    result = lh.run_backpatch(model, [lh.TwoHopQuery(...), ...])   # or a query table
    result.summary            # oracle rates with 95% intervals, per subset x position x kind
    result.heatmap("incorrect", "t2").show()

It is ``run.Run`` with the back-patching analysis, so it takes the same cases as the CLI for
the same arguments: evaluate the queries (or reuse ``evaluation=``), keep the analysable
subsets (never the excluded ones) with at most ``max_cases`` per split x subset, prepare
the cases (skips recorded with their reasons), sweep with the fast engine, label the rows.
With ``out=`` the sweep is written to (and resumed from) a run directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from latent_hops.analyses import backpatch as bp
from latent_hops.backend import Model
from latent_hops.evaluation import EvaluationConfig
from latent_hops.queries import TwoHopQuery, queries_to_table
from latent_hops.run import Run, Selection


@dataclass
class BackpatchResult:
    """Labelled back-patching rows and what was left out, with their summaries."""

    table: pd.DataFrame  # one row per query x position x cell, with subset and split
    evaluation: pd.DataFrame  # one row per query: generations, flags, subset
    skipped: pd.DataFrame  # analysable queries that could not be patched (id, reason)
    config: bp.BackpatchConfig = field(default_factory=bp.BackpatchConfig)

    @property
    def summary(self) -> pd.DataFrame:
        """Oracle rates (a case counts if any cell gives e3) over all splits, with the
        number of cells per case they were computed on."""
        rates = bp.oracle_rates(self.table)
        return rates[rates["split"] == "all"].reset_index(drop=True)

    @property
    def cells(self) -> pd.DataFrame:
        return bp.cell_rates(self.table)

    def heatmap(
        self, subset: str = "incorrect", position: str = "t2", kind: str = "back"
    ) -> go.Figure:
        return bp.backpatch_heatmap(
            self.cells, subset, position, "all", kind, oracle=bp.oracle_rates(self.table)
        )


def run_backpatch(
    model: Model,
    queries: Sequence[TwoHopQuery] | pd.DataFrame,
    config: bp.BackpatchConfig | None = None,
    subsets: Sequence[str] = ("incorrect", "correct"),
    max_cases: int | None = None,
    evaluation: pd.DataFrame | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> BackpatchResult:
    """Evaluate ``queries`` (or take ``evaluation``), then back-patch up to ``max_cases``
    per split x subset (default all). No analysable query raises ``NoCasesError``, whose
    ``.evaluation`` says why."""
    config = config or bp.BackpatchConfig()
    table = queries if isinstance(queries, pd.DataFrame) else queries_to_table(list(queries))
    ev_config = EvaluationConfig(
        max_new_tokens=config.max_new_tokens, suffix=config.suffix, progress=progress
    )
    run = Run(
        model,
        table,
        out,
        selection=Selection(tuple(subsets), max_cases),
        configs={"evaluate": ev_config, "backpatch": replace(config, progress=progress)},
        evaluation=evaluation,
        progress=progress,
    )
    _, skipped = run.cases(config.positions)
    labelled = bp.with_labels(run.table("backpatch"), run.evaluation())
    return BackpatchResult(labelled, run.evaluation(), skipped, config)
