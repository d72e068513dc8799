"""Sublayer projection (reference §3): at t2, each layer's attention output and MLP output
read through the final norm and unembedding; ranks of e2, e3 and the model's prediction.

Per case: the min layer whose attention output ranks e2 first (one of the information-
propagation measures), and "prediction extracted" = the min layer whose MLP output ranks
the model's own prediction first.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from latent_hops import backend
from latent_hops.cases import Case
from latent_hops.generation import length_batches
from latent_hops.patching import activations_at
from latent_hops.positions import tokenize_prompts
from latent_hops.ranks import best_rank, project_to_vocab

SUBLAYERS = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}
COLUMNS = ["id", "layer", "sublayer", "e2_rank", "e3_rank", "prediction_rank", "prediction"]


@torch.no_grad()
def sublayer_projection(model: HookedTransformer, cases: Sequence[Case], batch_size: int = 64) -> pd.DataFrame:
    """One row per case x layer x sublayer (attn / mlp), at t2."""
    names = [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers) for hook in SUBLAYERS.values()]
    rows = []
    for idx in length_batches([len(c.prompt) for c in cases], batch_size):
        batch = [cases[i] for i in idx]
        tok = tokenize_prompts(model, [c.prompt for c in batch])
        last = torch.full((len(batch), 1), tok.tokens.shape[1] - 1)
        acts = activations_at(model, tok.tokens, tok.attention_mask, last, names)[:, 0]  # [q, hooks, d]
        logprobs = project_to_vocab(model, acts)
        prediction = backend.last_logits(model, tok.tokens, attention_mask=tok.attention_mask).argmax(-1)
        for qi, case in enumerate(batch):
            r2, _ = best_rank(logprobs[qi], case.first_tokens["e2"])
            r3, _ = best_rank(logprobs[qi], case.first_tokens["e3"])
            rp, _ = best_rank(logprobs[qi], [int(prediction[qi])])
            for hi, name in enumerate(names):
                layer, sub = int(name.split(".")[1]), "attn" if name.endswith("attn_out") else "mlp"
                rows.append((case.id, layer, sub, int(r2[hi]), int(r3[hi]), int(rp[hi]), int(prediction[qi])))
    return pd.DataFrame(rows, columns=COLUMNS)


def projection_layers(projection: pd.DataFrame) -> pd.DataFrame:
    """Per case: min layer whose attention output ranks e2 first; prediction extracted."""
    attn, mlp = projection[projection.sublayer == "attn"], projection[projection.sublayer == "mlp"]
    out = pd.concat([
        attn[attn.e2_rank == 0].groupby("id")["layer"].min().rename("attn_e2_layer"),
        mlp[mlp.prediction_rank == 0].groupby("id")["layer"].min().rename("prediction_extracted_layer"),
    ], axis=1)
    return out.reindex(projection["id"].unique()).rename_axis("id").reset_index()
