"""Decoding shared by every backend: the greedy (or sampled) loop over a step function, and
what it returns. Each backend supplies the step (its own KV cache, or none)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

Step = Callable[[torch.Tensor], torch.Tensor]
"""``step(next_ids [batch]) -> logits [batch, vocab]`` of the following position."""


@dataclass
class GreedyOutput:
    """Greedy continuation of a batch: new token ids (``pad_id`` after EOS) and first-step
    logits."""

    tokens: Int[torch.Tensor, "batch new"]
    first_logits: Float[torch.Tensor, "batch vocab"]


class Sampler:
    """Seeded sampling at a temperature, to use instead of greedy decoding."""

    def __init__(self, seed: int, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.seed, self.temperature = seed, temperature
        self.generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        probs = (logits.float() / self.temperature).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def greedy_loop(
    eos: int | None,
    pad: int,
    logits: torch.Tensor,
    step: Step,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor] = argmax,
) -> GreedyOutput:
    """Decoding from the prompt pass's last logits (greedy unless ``choose`` samples); rows
    that produced ``eos`` get ``pad`` from then on."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, device = logits.shape[0], logits.device
    first_logits = logits.float()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        nxt = choose(logits)
        out[:, i] = torch.where(finished, pad, nxt)
        finished |= nxt == eos
        if i + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = step(nxt)
    return GreedyOutput(out, first_logits)


def screened(
    pad: int,
    logits: torch.Tensor,
    max_new_tokens: int,
    keep: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
) -> GreedyOutput:
    """Screening after a prompt pass: rows where ``keep(logits)`` holds are decoded by
    ``decode(rows) -> tokens``; the others get padding only."""
    rows = keep(logits).nonzero()[:, 0]
    padding = torch.full(
        (logits.shape[0], max_new_tokens), pad, dtype=torch.long, device=logits.device
    )
    out = GreedyOutput(padding, logits.float())
    if len(rows):
        out.tokens[rows] = decode(rows)
    return out


def probe_tokens(vocab: int, device: str | torch.device) -> torch.Tensor:
    """Three token ids (1, 2, 3) for a backend's one-off self-checks on a model."""
    return torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]], device=device)


def recompute_step(
    tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Step:
    """A decoding step without a KV cache: ``logits_of(sequence, mask)`` on the whole sequence
    again (edits it keeps on must touch prompt positions only, which left padding keeps
    fixed). Exact, and the reference the cached steps are tested against."""
    seq = [tokens, attention_mask]

    def step(nxt: torch.Tensor) -> torch.Tensor:
        seq[0] = torch.cat([seq[0], nxt[:, None]], 1)
        seq[1] = torch.cat([seq[1], torch.ones_like(nxt[:, None])], 1)
        return logits_of(seq[0], seq[1])

    return step
