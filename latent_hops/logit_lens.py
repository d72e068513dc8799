"""Logit lens (reference §1, the cheap estimate): every layer's hidden state at t1 and t2
read through the final norm and unembedding; rank and probability of e2 and e3.

Resolution layers from it: first hop = min layer with e2 at rank 0 at t1; second hop =
min layer with e3 at rank <= k at t2. The logit lens underestimates early layers (a probe
reads more), so Patchscopes gives the paper's estimate beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from latent_hops.cases import POSITIONS, Case
from latent_hops.generation import length_batches
from latent_hops.patching import hidden_states_at
from latent_hops.positions import EMBEDDINGS, tokenize_prompts
from latent_hops.ranks import best_rank, project_to_vocab

COLUMNS = ["id", "position", "layer", "e2_rank", "e2_prob", "e3_rank", "e3_prob", "top_token"]


@torch.no_grad()
def logit_lens(
    model: HookedTransformer,
    cases: Sequence[Case],
    positions: Sequence[str] = POSITIONS,
    include_embeddings: bool = True,
    batch_size: int = 64,
) -> pd.DataFrame:
    """One row per case x position x layer: ranks/probabilities of e2 and e3, top token."""
    layers = list(range(EMBEDDINGS if include_embeddings else 0, model.cfg.n_layers))
    rows = []
    for idx in length_batches([len(c.prompt) for c in cases], batch_size):
        batch = [cases[i] for i in idx]
        tok = tokenize_prompts(model, [c.prompt for c in batch])
        cols = torch.tensor([[n + c.positions[p] for p in positions] for c, n in zip(batch, tok.n_pad)])
        logprobs = project_to_vocab(model, hidden_states_at(model, tok.tokens, tok.attention_mask, cols, layers))
        top = logprobs.argmax(-1)
        for qi, case in enumerate(batch):
            r2, lp2 = best_rank(logprobs[qi], case.first_tokens["e2"])
            r3, lp3 = best_rank(logprobs[qi], case.first_tokens["e3"])
            for pi, position in enumerate(positions):
                for li, layer in enumerate(layers):
                    rows.append((case.id, position, layer, int(r2[pi, li]), float(lp2[pi, li].exp()),
                                 int(r3[pi, li]), float(lp3[pi, li].exp()), int(top[qi, pi, li])))
    return pd.DataFrame(rows, columns=COLUMNS)


def min_layer(table: pd.DataFrame, condition: pd.Series, name: str) -> pd.Series:
    """Per case, the smallest ``layer`` where ``condition`` holds (missing where never)."""
    return table[condition].groupby("id")["layer"].min().rename(name)


def resolution_layers(lens: pd.DataFrame, second_hop_k: int = 0) -> pd.DataFrame:
    """Per case: first-hop layer (e2 rank 0 at t1), e2 decoded at t2 (rank 0), second-hop
    layer (e3 rank <= k at t2)."""
    t1, t2 = lens[lens.position == "t1"], lens[lens.position == "t2"]
    out = pd.concat([
        min_layer(t1, t1.e2_rank == 0, "first_hop_layer"),
        min_layer(t2, t2.e2_rank == 0, "e2_at_t2_layer"),
        min_layer(t2, (t2.e3_rank >= 0) & (t2.e3_rank <= second_hop_k), "second_hop_layer"),
    ], axis=1)
    return out.reindex(lens["id"].unique()).rename_axis("id").reset_index()


def onset_layer(lens: pd.DataFrame, k: int = 10) -> pd.Series:
    """Second-hop onset per case: the first layer from which e3's rank at t2 is <= k and
    stays <= k up to the last layer (missing if e3 never settles in the top k)."""
    t2 = lens[lens.position == "t2"].sort_values(["id", "layer"])
    inside = (t2.e3_rank >= 0) & (t2.e3_rank <= k)
    # a layer counts if it and every later layer are inside: reverse cumulative AND per case
    stays = inside[::-1].groupby(t2["id"][::-1]).cummin()[::-1]
    onset = t2[stays.astype(bool)].groupby("id")["layer"].min()
    return onset.rename("second_hop_onset_layer").reindex(t2["id"].unique())
