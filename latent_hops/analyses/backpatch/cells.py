"""Back-patching's configuration and cells: which (source, target, kind) cells a sweep runs.

A cell (s, t, kind) writes, at target layer t, the clean run's hidden state of source
layer s (``kind="back"``: s > t, the paper's patch; ``"forward"``: s < t, a control) or a
random direction with the norm of that source state (``"random"``: s > t, a control).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from latent_hops.analysis import option, runtime
from latent_hops.backend import EMBEDDINGS, Model
from latent_hops.cases import POSITIONS, Case
from latent_hops.cases import prepare_cases as cases_for
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS
from latent_hops.positions import GRID_HELP, parse_layers
from latent_hops.queries import PROMPT_SUFFIX
from latent_hops.tables import (
    ALIAS_MATCH,
    E3_RANK,
    GENERATION,
    ID,
    POSITION,
    SOURCE_LAYER,
    TARGET_LAYER,
    Column,
    TableSchema,
)

KINDS = ("back", "forward", "random")
Kind = Literal["back", "forward", "random"]
Position = Literal["t1", "t2"]
TABLE = TableSchema(
    "backpatch.parquet",
    "a case x position x cell (source layer, target layer, kind)",
    (
        ID,
        POSITION.described("t1 or t2: where the state is read and written"),
        SOURCE_LAYER,
        TARGET_LAYER,
        Column(
            "kind",
            "str",
            "back (s > t), forward (s < t, control) or random (s > t, a random direction with "
            "the source state's norm, control)",
        ),
        GENERATION.described(
            "greedy generation of the patched run (null: screened; with --stop-when-decided, "
            "cut after the token that completed an e3 alias)"
        ),
        ALIAS_MATCH.renamed("alias_match").described(
            "an e3 alias is in the generation (false when screened: a screened cell counts as "
            "no success)"
        ),
        E3_RANK.described(
            "rank (0 = top) of e3's best first token at the first generated position (null: "
            "no known first token)"
        ),
        Column("e3_logprob", "float", "its log-probability (NaN: no known first token)"),
        Column(
            "screened",
            "bool",
            "not decoded: the first-step e3 rank is beyond --screen (counts as no success)",
        ),
    ),
)
RESULT_COLUMNS = TABLE.names


@dataclass(frozen=True)
class Cell:
    source: int
    target: int
    kind: str


CPU_MEMORY_BUDGET_MB = 1024.0


@dataclass(frozen=True)
class BackpatchConfig:
    positions: tuple[Position, ...] = option(POSITIONS, "comma-separated: t1,t2")
    kinds: tuple[Kind, ...] = option(KINDS, "comma-separated: back,forward,random")
    include_embeddings: bool = option(False, "layer -1 (embeddings) as source and target")
    cells: tuple[Cell, ...] | None = None  # explicit cells instead of all pairs of ``kinds``
    source_layers: tuple[int, ...] | str | None = option(None, GRID_HELP)  # None: all
    target_layers: tuple[int, ...] | str | None = option(None, GRID_HELP)
    max_new_tokens: int = option(
        DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt", minimum=1
    )
    memory_budget_mb: float | None = option(
        None,
        "memory for the fast engine's batches (default: half the free CUDA memory; 1024 on CPU)",
        runtime=True,
        minimum=1,
    )
    batch_rows: int | None = option(
        None,
        "patched rows per forward (default: from the memory budget; Patchscopes: 512)",
        runtime=True,
        minimum=1,
    )
    seed: int = 0  # random-direction control
    screen: int | None = option(
        None,
        "decode only cells whose first-step e3 rank is <= K (the rest: screened, not successes)",
        minimum=0,
    )
    stop_when_decided: bool = option(
        False,
        "end a cell's generation once an e3 alias has appeared: the same successes and ranks, "
        "faster; the generation column ends there",
    )
    suffix: str = PROMPT_SUFFIX
    progress: bool = runtime(False)


def all_cells(model: Model, config: BackpatchConfig) -> list[Cell]:
    """The cells of a sweep: every (s, t) pair of each kind, or the configured ones."""
    first = EMBEDDINGS if config.include_embeddings else 0
    n = model.n_layers
    layers = range(first, n)
    if config.cells is not None:
        for c in config.cells:
            model.check_layers([c.source, c.target])
        return list(config.cells)
    unknown = set(config.kinds) - set(KINDS)
    if unknown:
        raise InputError(f"unknown patch kinds {sorted(unknown)}; use {KINDS}")
    sources = parse_layers(config.source_layers, n, first) or layers
    targets = parse_layers(config.target_layers, n, first) or layers
    return [
        Cell(s, t, kind)
        for kind in config.kinds
        for t in targets
        for s in sources
        if (s < t if kind == "forward" else s > t)
    ]


def prepare_cases(
    model: Model, table: pd.DataFrame, config: BackpatchConfig = BackpatchConfig()
) -> tuple[list[Case], pd.DataFrame]:
    """Cases for the queries of ``table`` at the configured positions, and the skipped ones."""
    return cases_for(model, table, config.positions, config.suffix, config.max_new_tokens)
