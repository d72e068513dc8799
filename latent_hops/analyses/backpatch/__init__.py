"""Back-patching (reference §4): a later layer's hidden state written back into an earlier
layer of the same run, at the same position (t1 or t2), on the prompt pass only.

A cell (s, t, kind) writes, at target layer t, the clean run's hidden state of source
layer s (``kind="back"``: s > t, the paper's patch; ``"forward"``: s < t, a control) or a
random direction with the norm of that source state (``"random"``: s > t, a control).
Success = an e3 alias in the greedy generation (10 tokens).

- ``cells``: the configuration and the cells of a sweep;
- ``engine``: the naive reference and the fast engine (identical generations);
- ``cost``: a sweep's generations, its least work and its time estimated beforehand;
- ``stats``: oracle and non-oracle rates, per-cell rates, what counted as a rescue;
- ``report``: the heatmap, the summary files and the report section.
"""

from __future__ import annotations

import logging

import pandas as pd

from latent_hops.analyses.backpatch.cells import (
    KINDS,
    RESULT_COLUMNS,
    TABLE,
    BackpatchConfig,
    Cell,
    all_cells,
    prepare_cases,
)
from latent_hops.analyses.backpatch.cost import Estimate, estimate, minimum_work
from latent_hops.analyses.backpatch.engine import (
    random_direction,
    rows_per_batch,
    sweep,
    sweep_naive,
)
from latent_hops.analyses.backpatch.report import (
    backpatch_heatmap,
    note,
    report,
    summarize,
    summary,
)
from latent_hops.analyses.backpatch.stats import (
    cell_rates,
    non_oracle,
    oracle_rates,
    oracle_tests,
    success_samples,
    with_labels,
)
from latent_hops.analysis import Analysis, Context, register

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "Estimate",
    "RESULT_COLUMNS",
    "TABLE",
    "BackpatchConfig",
    "Cell",
    "all_cells",
    "backpatch_heatmap",
    "cell_rates",
    "estimate",
    "minimum_work",
    "non_oracle",
    "oracle_rates",
    "oracle_tests",
    "prepare_cases",
    "random_direction",
    "rows_per_batch",
    "success_samples",
    "summarize",
    "sweep",
    "sweep_naive",
    "with_labels",
]


def _run(context: Context, config: BackpatchConfig) -> pd.DataFrame:
    """The sweep, resumable: chunks of cases written as parts of RUN_DIR/backpatch/."""
    all_cells(context.model, config)  # a bad layer grid fails here, before any work
    if context.progress and context.cases:  # interactive: say what it will cost first
        cost = estimate(context.model, context.cases, config)
        logger.info("backpatch: %s; --workers / --executor ray share it", cost)
    return context.in_parts(
        "backpatch", lambda part: sweep(context.model, part, config), config, "backpatch"
    )


register(
    Analysis(
        name="backpatch",
        title="Back-patching",
        order=10,
        help="back-patching sweep: a later layer's hidden state written into an earlier one, "
        "with forward and random controls -> backpatch.parquet, backpatch_cells.parquet, "
        "backpatch_summary.json, backpatch_heatmaps.html",
        config=BackpatchConfig,
        schema=TABLE,
        run=_run,
        resumable=True,
        shardable=True,
        in_demo=True,
        summary=summary,
        report=report,
        note=note,
    )
)
