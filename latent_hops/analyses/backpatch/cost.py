"""What a back-patching sweep costs: its generations, the least work the protocol needs
(``minimum_work``), and the time it will take on this device (``estimate``).

The least work, for each case: one clean pass of its prompt (its tokens, no padding); for
each patched row (case x position x cell) at target layer t and position p, blocks t+1 ..
L-1 on the prompt's tokens from p onwards (nothing below t or before p changes) and the
first-step unembedding; then ``max_new_tokens - 1`` decoding steps through every block,
each unembedded. What an engine runs beyond that (padding, layers or columns recomputed,
a second clean pass) is its overhead: ``work efficiency = minimum / executed``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd

from latent_hops.analyses.backpatch.cells import BackpatchConfig, all_cells
from latent_hops.analyses.backpatch.engine import sweep
from latent_hops.backend import Model
from latent_hops.backend.work import WorkCount
from latent_hops.cases import Case
from latent_hops.positions import tokenize_prompts


def generations(model: Model, n_cases: int, config: BackpatchConfig) -> int:
    """Patched generations of a sweep: cases x positions x cells."""
    return n_cases * len(config.positions) * len(all_cells(model, config))


def minimum_work(
    model: Model,
    cases: Sequence[Case],
    config: BackpatchConfig,
    result: pd.DataFrame | None = None,
) -> WorkCount:
    """The least work of the sweep (module docstring). With the sweep's ``result``, a row
    decodes only as many steps as its generation needed (its tokens, re-encoded, and the
    EOS that ended it if it ended early; none for a screened row); without it, every row
    decodes ``max_new_tokens``."""
    n_layers, most = model.n_layers, config.max_new_tokens - 1
    lengths = {c.id: len(tokenize_prompts(model, [c.prompt]).tokens[0]) for c in cases}
    work = WorkCount()
    for n in lengths.values():  # the clean passes
        work.block_tokens += n_layers * n
        work.attention_pairs += n_layers * n * (n + 1) // 2
    if result is None:
        cells = all_cells(model, config)
        rows = [
            (c.id, position, cell.target, most)
            for c in cases
            for position in config.positions
            for cell in cells
        ]
    else:
        rows = [
            (r.id, r.position, r.target_layer, _steps(model, r.generation, most))
            for r in result.itertuples()
        ]
    by_id = {c.id: c for c in cases}
    for case_id, position, target, steps in rows:
        n, p = lengths[case_id], by_id[case_id].positions[position]
        above = n_layers - 1 - target
        work.block_tokens += above * (n - p) + n_layers * steps
        work.attention_pairs += above * sum(i + 1 for i in range(p, n))
        work.attention_pairs += n_layers * sum(n + j for j in range(1, steps + 1))
        work.unembedded += 1 + steps
    return work


def _steps(model: Model, generation: str | None, most: int) -> int:
    """Decoding steps after the first token that ``generation`` needed."""
    if generation is None:
        return 0
    tokens = len(model.tokenizer(generation, add_special_tokens=False)["input_ids"])
    return min(tokens + 1, most + 1) - 1  # + the EOS that ended it, if it ended early


@dataclass(frozen=True)
class Estimate:
    """A sweep's size and its expected time, from a calibration run on this device."""

    generations: int
    cells_per_s: float

    @property
    def seconds(self) -> float:
        return self.generations / self.cells_per_s

    def __str__(self) -> str:
        minutes = self.seconds / 60
        took = f"~{minutes:.0f} min" if minutes >= 1 else f"~{self.seconds:.0f} s"
        return (
            f"{self.generations:,} patched generations, {took} at {self.cells_per_s:,.1f} "
            "cells/s (calibrated on this device)"
        )


def estimate(
    model: Model, cases: Sequence[Case], config: BackpatchConfig, sample: int = 256
) -> Estimate:
    """Times the fast engine on about ``sample`` rows (cells evenly spread over the sweep's,
    all positions) of the first case, after a one-cell warm-up, and scales to the whole
    sweep. The sample runs in smaller batches than the sweep will, so the estimate errs
    long (measured: 2x on the toy demo, 1.1-1.2x on SmolLM2's full grid)."""
    cells = all_cells(model, config)
    step = max(1, len(cells) // max(1, sample // len(config.positions)))
    trial = replace(config, cells=tuple(cells[::step]), progress=False)
    sweep(model, list(cases[:1]), replace(trial, cells=tuple(cells[:1])))  # first-call costs
    start = time.perf_counter()
    rows = len(sweep(model, list(cases[:1]), trial))
    took = time.perf_counter() - start
    return Estimate(generations(model, len(cases), config), rows / max(took, 1e-9))
