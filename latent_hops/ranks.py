"""The rank of an answer in a distribution over the vocabulary (best over the answer's first
tokens). Vectors are read as such distributions by ``Model.project_to_vocab``."""

from __future__ import annotations

import torch
from jaxtyping import Float


def best_rank(
    logprobs: Float[torch.Tensor, "... vocab"], token_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top) and log-probability of the best of ``token_ids``; rank -1 without tokens."""
    if not token_ids:
        shape = logprobs.shape[:-1]
        return torch.full(shape, -1, dtype=torch.long), torch.full(shape, float("nan"))
    best = logprobs[..., token_ids].max(-1).values
    return (logprobs > best[..., None]).sum(-1), best
