"""One call from queries to back-patching results, for notebooks and custom queries.

    import latent_hops as lh
    model = lh.load_model("toy")
    result = lh.run_backpatch(model, [lh.TwoHopQuery(...), ...])   # or a query table
    result.summary            # oracle rates with 95% intervals, per subset x position x kind
    result.heatmap("incorrect", "t2").show()

It does what the CLI's ``backpatch`` does, in order: evaluate the queries, keep the
analysable subsets (never the excluded ones), prepare the cases (skips recorded with
their reasons), sweep with the fast engine, label the rows and summarise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go

from latent_hops import plots
from latent_hops.analyses import backpatch as bp
from latent_hops.backend import Model
from latent_hops.errors import InputError
from latent_hops.evaluation import EvaluationConfig, evaluate
from latent_hops.queries import TwoHopQuery, normalize_table, queries_to_table


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
        return plots.backpatch_heatmap(
            self.cells, subset, position, "all", kind, oracle=bp.oracle_rates(self.table)
        )


def run_backpatch(
    model: Model,
    queries: Sequence[TwoHopQuery] | pd.DataFrame,
    config: bp.BackpatchConfig | None = None,
    subsets: Sequence[str] = ("incorrect", "correct"),
    max_cases: int | None = None,
) -> BackpatchResult:
    """Evaluate ``queries``, then back-patch up to ``max_cases`` per subset (default all)."""
    config = config or bp.BackpatchConfig()
    table = queries_to_table(list(queries)) if not isinstance(queries, pd.DataFrame) else queries
    table = normalize_table(table, "queries")
    evaluation = evaluate(
        model, table, EvaluationConfig(max_new_tokens=config.max_new_tokens, suffix=config.suffix)
    )
    chosen = evaluation[evaluation["subset"].isin(subsets)]
    if max_cases is not None:
        chosen = chosen.groupby("subset", sort=False).head(max_cases)
    if chosen.empty:
        counts = evaluation["subset"].value_counts().to_dict()
        raise InputError(
            f"no query is in subsets {list(subsets)} (subsets found: {counts}); "
            "see the evaluation's exclusion_reason column"
        )
    cases, skipped = bp.prepare_cases(model, table[table["id"].isin(set(chosen["id"]))], config)
    labelled = bp.with_labels(bp.sweep(model, cases, config), evaluation)
    return BackpatchResult(labelled, evaluation, skipped, config)
