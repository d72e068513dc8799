"""Reading a residual-stream vector as a distribution over the vocabulary, and the rank of
an answer in it (best over the answer's first tokens)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer


@torch.no_grad()
def project_to_vocab(model: HookedTransformer, acts: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... vocab"]:
    """Log-probabilities of ``acts`` read through the final norm and unembedding (the logit lens)."""
    shape = acts.shape[:-1]
    flat = acts.reshape(-1, 1, acts.shape[-1]).to(model.cfg.dtype)
    normed = model.ln_final(flat) if model.cfg.normalization_type is not None else flat
    return model.unembed(normed)[:, 0].float().log_softmax(-1).reshape(*shape, -1)


def best_rank(logprobs: Float[torch.Tensor, "... vocab"], token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top) and log-probability of the best of ``token_ids``; rank -1 without tokens."""
    if not token_ids:
        shape = logprobs.shape[:-1]
        return torch.full(shape, -1, dtype=torch.long), torch.full(shape, float("nan"))
    best = logprobs[..., token_ids].max(-1).values
    return (logprobs > best[..., None]).sum(-1), best
