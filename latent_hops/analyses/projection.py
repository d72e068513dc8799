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

from latent_hops import backend
from latent_hops.analysis import Analysis, Column, first_layer, register, runtime
from latent_hops.backend import Model, Site
from latent_hops.cases import Case, case_batches
from latent_hops.ranks import best_rank, project_to_vocab

SUBLAYERS = {"attn": "attn_out", "mlp": "mlp_out"}  # table label -> site kind
TABLE = (
    Column("id", "query id"),
    Column("layer", "block"),
    Column("sublayer", "attn or mlp (its output at t2)"),
    Column("e2_rank", "best rank of e2's first tokens (0 = top; -1 = no known token)"),
    Column("e3_rank", "as e2_rank, for e3"),
    Column("prediction_rank", "rank of the model's own prediction"),
    Column("prediction", "token id the model predicts at t2"),
)
COLUMNS = [c.name for c in TABLE]


@torch.no_grad()
def sublayer_projection(model: Model, cases: Sequence[Case], batch_size: int = 64) -> pd.DataFrame:
    """One row per case x layer x sublayer (attn / mlp), at t2."""
    sites = [
        (layer, label, Site(kind, layer))
        for layer in range(backend.n_layers(model))
        for label, kind in SUBLAYERS.items()
    ]
    rows = []
    for b in case_batches(model, cases, batch_size, ("t2",)):
        acts = backend.read_sites(
            model, b.tok.tokens, b.tok.attention_mask, b.columns, [s for *_, s in sites]
        )
        logprobs = project_to_vocab(model, acts[:, 0])  # [q, sites, vocab]
        prediction = backend.last_logits(
            model, b.tok.tokens, attention_mask=b.tok.attention_mask
        ).argmax(-1)
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
                        int(r2[si]),
                        int(r3[si]),
                        int(rp[si]),
                        int(prediction[qi]),
                    )
                )
    return pd.DataFrame(rows, columns=COLUMNS)


def projection_layers(projection: pd.DataFrame) -> pd.DataFrame:
    """Per case: min layer whose attention output ranks e2 first; prediction extracted."""
    attn, mlp = projection[projection.sublayer == "attn"], projection[projection.sublayer == "mlp"]
    out = pd.concat(
        [
            first_layer(attn, attn.e2_rank == 0, "attn_e2_layer"),
            first_layer(mlp, mlp.prediction_rank == 0, "prediction_extracted_layer"),
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
        help="sublayer projection at t2 -> projection.parquet",
        config=ProjectionConfig,
        columns=TABLE,
        run=lambda context, config: sublayer_projection(
            context.model, context.cases, config.batch_size
        ),
        stage_layers=lambda table, stages: projection_layers(table).set_index("id"),
        uses_positions=lambda config: ("t1", "t2"),
        note=lambda config: (
            "At t2, each block's attention output and MLP output read through the final norm and "
            "the unembedding: ranks of e2, e3 and the model's own prediction."
        ),
    )
)
