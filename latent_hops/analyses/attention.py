"""Attention from t2 to t1: how much the last position reads e1's last token, per layer and
head, on the clean prompt (post-softmax weights). A cheap, correlational companion to the
attention knockout (which measures what blocking that edge changes): information about the
bridge entity has to travel from t1 to t2 through some layer's attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from latent_hops.analysis import Analysis, ReportInput, register, runtime
from latent_hops.backend import Model
from latent_hops.cases import Case, case_batches
from latent_hops.tables import BLOCK, ID, Column, TableSchema

TABLE = TableSchema(
    "attention.parquet",
    "a case x block x head",
    (
        ID,
        BLOCK,
        Column("head", "int", "attention head"),
        Column("weight", "float", "attention weight from t2 to t1 (post-softmax)"),
    ),
)


@torch.no_grad()
def attention_to_t1(model: Model, cases: Sequence[Case], batch_size: int = 64) -> pd.DataFrame:
    """One row per case x layer x head: the weight t2 puts on t1."""
    layers = list(range(model.n_layers))
    rows = []
    for b in case_batches(model, cases, batch_size, ("t1", "t2")):
        weights = model.read_attention(
            b.tok.tokens, b.tok.attention_mask, b.columns[:, 1], b.columns[:, 0], layers
        )  # [case, layer, head]
        for qi, case in enumerate(b.cases):
            for li, layer in enumerate(layers):
                rows += [
                    (case.id, layer, h, float(w)) for h, w in enumerate(weights[qi, li].tolist())
                ]
    return pd.DataFrame(rows, columns=TABLE.names) if rows else TABLE.empty()


@dataclass(frozen=True)
class AttentionConfig:
    batch_size: int = runtime(64)


def _report(section: ReportInput) -> str:
    """Mean and max-over-heads weight per layer, correct vs incorrect cases."""
    data = section.table.merge(section.evaluation[["id", "subset"]], on="id")
    per_case = (
        data.groupby(["subset", "id", "block"])["weight"].agg(mean="mean", max="max").reset_index()
    )
    table = per_case.groupby(["block", "subset"])[["mean", "max"]].mean().unstack("subset")
    return section.html_table((100 * table).round(1))


register(
    Analysis(
        name="attention",
        title="Attention from t2 to t1",
        order=45,
        help="attention weight from t2 to t1 per layer and head (clean prompt) "
        "-> attention.parquet",
        config=AttentionConfig,
        schema=TABLE,
        report=_report,
        uses_positions=lambda config: ("t1", "t2"),
        run=lambda context, config: attention_to_t1(
            context.model, context.cases, config.batch_size
        ),
        note=lambda config: (
            "Post-softmax attention weight from t2 (the last token) to t1 (e1's last token) on "
            "the clean prompt, per block: the mean over heads and the largest head, in % "
            "(averaged over cases). Correlational; the knockout measures what the edge does."
        ),
    )
)
