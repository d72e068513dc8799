"""Logit lens (reference §1, the cheap estimate): every layer's hidden state at t1 and t2
read through the final norm and unembedding; rank and probability of e2 and e3.

Resolution layers from it: first hop = min layer with e2 at rank 0 at t1; second hop =
min layer with e3 at rank <= k at t2. The logit lens underestimates early layers (a probe
reads more), so Patchscopes gives the paper's estimate beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from latent_hops.analysis import (
    DECODED_MEASURES,
    Analysis,
    Context,
    StageMeasure,
    decoded_layers,
    first_layer,
    option,
    register,
    runtime,
)
from latent_hops.backend import EMBEDDINGS, Model
from latent_hops.cases import POSITIONS, Case, case_batches
from latent_hops.patching import hidden_states_at
from latent_hops.ranks import best_rank
from latent_hops.tables import (
    E2_RANK,
    E3_RANK,
    HIDDEN_LAYER,
    ID,
    POSITION,
    Column,
    TableSchema,
    rank_or_null,
)

TABLE = TableSchema(
    "logit_lens.parquet",
    "a case x position x hidden-state layer",
    (
        ID,
        POSITION,
        HIDDEN_LAYER,
        E2_RANK,
        Column("e2_prob", "float", "probability of e2's best first token (NaN: none known)"),
        E3_RANK,
        Column("e3_prob", "float", "probability of e3's best first token (NaN: none known)"),
        Column("top_token", "int", "id of the top token"),
    ),
)
COLUMNS = TABLE.names


@torch.no_grad()
def logit_lens(
    model: Model,
    cases: Sequence[Case],
    positions: Sequence[str] = POSITIONS,
    include_embeddings: bool = True,
    batch_size: int = 64,
) -> pd.DataFrame:
    """One row per case x position x layer: ranks/probabilities of e2 and e3, top token."""
    layers = list(range(EMBEDDINGS if include_embeddings else 0, model.n_layers))
    rows = []
    for b in case_batches(model, cases, batch_size, positions):
        logprobs = model.project_to_vocab(
            hidden_states_at(model, b.tok.tokens, b.tok.attention_mask, b.columns, layers)
        )
        top = logprobs.argmax(-1)
        for qi, case in enumerate(b.cases):
            r2, lp2 = best_rank(logprobs[qi], case.first_tokens["e2"])
            r3, lp3 = best_rank(logprobs[qi], case.first_tokens["e3"])
            for pi, position in enumerate(positions):
                for li, layer in enumerate(layers):
                    rows.append(
                        (
                            case.id,
                            position,
                            layer,
                            rank_or_null(int(r2[pi, li])),
                            float(lp2[pi, li].exp()),
                            rank_or_null(int(r3[pi, li])),
                            float(lp3[pi, li].exp()),
                            int(top[qi, pi, li]),
                        )
                    )
    if not rows:
        return TABLE.empty()
    return pd.DataFrame(rows, columns=COLUMNS).astype({"e2_rank": "Int64", "e3_rank": "Int64"})


def resolution_layers(lens: pd.DataFrame, second_hop_k: int = 0) -> pd.DataFrame:
    """Per case: first-hop layer (e2 rank 0 at t1), e2 decoded at t2 (rank 0), second-hop
    layer (e3 rank <= k at t2)."""

    def decoded(rows: pd.DataFrame, entity: str) -> pd.Series:
        return rows[f"{entity}_rank"] <= (second_hop_k if entity == "e3" else 0)

    return decoded_layers(lens, decoded, "hidden_layer")


def onset_layer(lens: pd.DataFrame, k: int = 10) -> pd.Series:
    """Second-hop onset per case: the first layer from which e3's rank at t2 is <= k and
    stays <= k up to the last layer (missing if e3 never settles in the top k)."""
    t2 = lens[lens.position == "t2"].sort_values(["id", "hidden_layer"])
    inside = (t2.e3_rank <= k).fillna(False).astype(bool)  # null: no known token
    # a layer counts if it and every later layer are inside: reverse cumulative AND per case
    stays = inside[::-1].groupby(t2["id"][::-1]).cummin()[::-1]
    return first_layer(t2, stays.astype(bool), "second_hop_onset_layer", "hidden_layer")


@dataclass(frozen=True)
class LogitLensConfig:
    positions: tuple[str, ...] = POSITIONS
    include_embeddings: bool = True
    onset_k: int = option(
        10, "second-hop onset (stage table): e3's logit-lens rank at t2 stays <= k", minimum=0
    )
    batch_size: int = runtime(64)


def _run(context: Context, config: LogitLensConfig) -> pd.DataFrame:
    return logit_lens(
        context.model, context.cases, config.positions, config.include_embeddings, config.batch_size
    )


def _stage_layers(lens: pd.DataFrame, config: LogitLensConfig) -> pd.DataFrame:
    """Decoded layers (first hop, e2 at t2, second hop) and the second-hop onset."""
    return resolution_layers(lens).set_index("id").join(onset_layer(lens, config.onset_k))


register(
    Analysis(
        name="logit_lens",
        aliases=("logit-lens",),
        title="Logit lens",
        order=20,
        help="each layer's hidden state at t1/t2 through the unembedding: ranks of e2, e3 "
        "-> logit_lens.parquet",
        config=LogitLensConfig,
        run=_run,
        stage_measures=(
            *DECODED_MEASURES,
            StageMeasure(
                "second_hop_onset_layer",
                "second_hop_onset",
                "e3 never stays in the logit lens' top k at t2",
            ),
        ),
        stage_layers=_stage_layers,
        note=lambda config: (
            "Each layer's hidden state at t1 and t2 read through the final norm and the "
            "unembedding (float32)."
        ),
        schema=TABLE,
    )
)
