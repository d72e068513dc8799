"""Reading a residual-stream vector as a distribution over the vocabulary, and the rank of
an answer in it (best over the answer's first tokens)."""

from __future__ import annotations

import torch
from jaxtyping import Float

from latent_hops.backend import project_to_vocab

__all__ = ["best_rank", "project_to_vocab"]


def best_rank(
    logprobs: Float[torch.Tensor, "... vocab"], token_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top) and log-probability of the best of ``token_ids``; rank -1 without tokens."""
    if not token_ids:
        shape = logprobs.shape[:-1]
        return torch.full(shape, -1, dtype=torch.long), torch.full(shape, float("nan"))
    best = logprobs[..., token_ids].max(-1).values
    return (logprobs > best[..., None]).sum(-1), best
