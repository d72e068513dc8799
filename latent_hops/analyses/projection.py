"""Sublayer projection (reference §3): at t2, each layer's attention output and MLP output
read through the final norm and unembedding; ranks of e2, e3 and the model's prediction.

Per case: the min layer whose attention output ranks e2 first (one of the information-
propagation measures), and "prediction extracted" = the min layer whose MLP output ranks
the model's own prediction first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from latent_hops.analysis import Analysis, StageMeasure, first_layer, register, runtime
from latent_hops.backend import Model, Site
from latent_hops.cases import Case, case_batches
from latent_hops.ranks import best_rank
from latent_hops.tables import BLOCK, E2_RANK, E3_RANK, ID, Column, TableSchema, rank_or_null

SUBLAYERS = {"attn": "attn_out", "mlp": "mlp_out"}  # table label -> site kind
TABLE = TableSchema(
    "projection.parquet",
    "a case x block x sublayer, at t2",
    (
        ID,
        BLOCK,
        Column("sublayer", "str", "attn or mlp: the block's attention or MLP output at t2"),
        E2_RANK,
        E3_RANK,
        Column("prediction_rank", "int", "rank of the model's own prediction"),
        Column("prediction", "int", "token id the model predicts at t2"),
    ),
)
COLUMNS = TABLE.names


@torch.no_grad()
def sublayer_projection(model: Model, cases: Sequence[Case], batch_size: int = 64) -> pd.DataFrame:
    """One row per case x layer x sublayer (attn / mlp), at t2."""
    sites = [
        (layer, label, Site(kind, layer))
        for layer in range(model.n_layers)
        for label, kind in SUBLAYERS.items()
    ]
    rows = []
    for b in case_batches(model, cases, batch_size, ("t2",)):
        acts = model.read_sites(
            b.tok.tokens, b.tok.attention_mask, b.columns, [s for *_, s in sites]
        )
        logprobs = model.project_to_vocab(acts[:, 0])  # [q, sites, vocab]
        prediction = model.last_logits(b.tok.tokens, b.tok.attention_mask).argmax(-1)
        for qi, case in enumerate(b.cases):
            r2, _ = best_rank(logprobs[qi], case.first_tokens["e2"])
            r3, _ = best_rank(logprobs[qi], case.first_tokens["e3"])
            rp, _ = best_rank(logprobs[qi], [int(prediction[qi])])
            for si, (layer, label, _) in enumerate(sites):
                rows.append(
                    (
                        case.id,
                        layer,
                        label,
                        rank_or_null(int(r2[si])),
                        rank_or_null(int(r3[si])),
                        int(rp[si]),
                        int(prediction[qi]),
                    )
                )
    if not rows:
        return TABLE.empty()
    return pd.DataFrame(rows, columns=COLUMNS).astype({"e2_rank": "Int64", "e3_rank": "Int64"})


def projection_layers(projection: pd.DataFrame) -> pd.DataFrame:
    """Per case: min layer whose attention output ranks e2 first; prediction extracted."""
    attn, mlp = projection[projection.sublayer == "attn"], projection[projection.sublayer == "mlp"]
    out = pd.concat(
        [
            first_layer(attn, attn.e2_rank == 0, "attn_e2_layer", "block"),
            first_layer(mlp, mlp.prediction_rank == 0, "prediction_extracted_layer", "block"),
        ],
        axis=1,
    )
    return out.reindex(projection["id"].unique()).rename_axis("id").reset_index()


@dataclass(frozen=True)
class ProjectionConfig:
    batch_size: int = runtime(64)


register(
    Analysis(
        name="projection",
        aliases=("project",),
        title="Sublayer projection",
        order=30,
        help="each block's attention and MLP output at t2 through the unembedding: ranks of "
        "e2, e3 and the prediction -> projection.parquet",
        config=ProjectionConfig,
        schema=TABLE,
        run=lambda context, config: sublayer_projection(
            context.model, context.cases, config.batch_size
        ),
        stage_measures=(
            StageMeasure(
                "attn_e2_layer",
                "info_propagation",
                "no attention output at t2 ranks e2 first",
                "attn_e2",
            ),
            StageMeasure(
                "prediction_extracted_layer",
                "prediction_extracted",
                "no MLP output at t2 ranks the prediction first",
            ),
        ),
        stage_layers=lambda table, config: projection_layers(table).set_index("id"),
        uses_positions=lambda config: ("t1", "t2"),
        note=lambda config: (
            "At t2, each block's attention output and MLP output read through the final norm and "
            "the unembedding: ranks of e2, e3 and the model's own prediction."
        ),
    )
)
