"""Decoding shared by every backend: the greedy (or sampled) loop over a step function, and
what it returns. Each backend supplies the step (its own KV cache, or none)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from jaxtyping import Bool, Float, Int


class Step(Protocol):
    """One decoding step of a batch: the logits of the following position."""

    def __call__(
        self,
        next_ids: Int[torch.Tensor, " batch"],
        kept: Int[torch.Tensor, " kept"] | None = None,
        /,
    ) -> Float[torch.Tensor, "kept vocab"]:
        """``kept`` (ascending indices into the previous call's rows), when given: the other
        rows have left the batch, and the step drops them (their caches) first."""
        ...


Rows = Int[torch.Tensor, " rows"]
Keep = Callable[[Rows, Float[torch.Tensor, "rows vocab"]], Bool[torch.Tensor, " rows"]]
"""``keep(rows, first_logits) -> kept``: which rows (indices into the decoded batch) are
decoded after the prompt pass (screening)."""

Stop = Callable[[Rows, Int[torch.Tensor, "rows new"]], Bool[torch.Tensor, " rows"]]
"""``stop(rows, tokens_so_far) -> decided``: which of the rows still decoding (indices into
the decoded batch) need no more tokens: their outcome is decided."""


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


@dataclass(frozen=True)
class Decoding:
    """How resumed rows are decoded: ``max_new_tokens`` tokens, greedy unless ``sampler``.
    ``keep`` screens rows after the prompt pass: only kept rows are decoded, the others get
    padding only. ``stop`` ends a row's decoding once its outcome is decided (its later
    tokens: padding); with it, rows that ended (EOS or decided) leave the batch, so the
    steps after run on fewer rows (greedy only: a sampler's draws would depend on which rows
    remain). Both see a row by its index in the batch first given (``of_rows``)."""

    max_new_tokens: int
    sampler: Sampler | None = None
    keep: Keep | None = None
    stop: Stop | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop is not None and self.sampler is not None:
            raise ValueError("stopping decided rows is for greedy decoding, not with a sampler")

    @property
    def choose(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.sampler or argmax

    def of_rows(self, rows: Int[torch.Tensor, " part"]) -> Decoding:
        """The decoding of the part ``rows`` of the batch, run on its own."""
        keep, stop = self.keep, self.stop
        return replace(
            self,
            keep=None if keep is None else lambda r, lg: keep(rows[r.to(rows.device)], lg),
            stop=None if stop is None else lambda r, t: stop(rows[r.to(rows.device)], t),
        )


def greedy_loop(
    eos: int | None,
    pad: int,
    logits: torch.Tensor,
    step: Step,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor] = argmax,
    stop: Stop | None = None,
) -> GreedyOutput:
    """Decoding from the prompt pass's last logits (greedy unless ``choose`` samples); rows
    that produced ``eos`` get ``pad`` from then on. With ``stop``, so do rows it declares
    decided, and every row that ended leaves the batch (``Step``'s ``kept``)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, device = logits.shape[0], logits.device
    first_logits = logits.float()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)  # rows still in the batch (with ``stop``)
    for i in range(max_new_tokens):
        nxt = choose(logits)
        out[active, i] = torch.where(finished, pad, nxt)
        finished |= nxt == eos
        if stop is not None:
            finished |= stop(active, out[active, : i + 1]).to(device)
        if i + 1 == max_new_tokens or bool(finished.all()):
            break
        if stop is not None and bool(finished.any()):
            kept = (~finished).nonzero()[:, 0]
            active, nxt, finished = active[kept], nxt[kept], finished[kept]
            logits = step(nxt, kept)
        else:
            logits = step(nxt)
    return GreedyOutput(out, first_logits)


def screened(
    pad: int,
    logits: torch.Tensor,
    decoding: Decoding,
    decode: Callable[[Int[torch.Tensor, " kept"], Decoding], torch.Tensor],
) -> GreedyOutput:
    """Screening after a prompt pass: rows that ``decoding.keep`` keeps are decoded by
    ``decode(rows, their decoding) -> tokens``; the others get padding only. Without a
    screen, every row is decoded."""
    every = torch.arange(logits.shape[0], device=logits.device)
    if decoding.keep is None:
        return GreedyOutput(decode(every, decoding), logits.float())
    kept = decoding.keep(every, logits).nonzero()[:, 0]
    padding = torch.full(
        (logits.shape[0], decoding.max_new_tokens), pad, dtype=torch.long, device=logits.device
    )
    out = GreedyOutput(padding, logits.float())
    if len(kept):
        out.tokens[kept] = decode(kept, replace(decoding.of_rows(kept), keep=None))
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
    fixed). Exact, and the reference the cached steps are tested against. Rows that left the
    batch (``kept``) stay in the sequence, fed padding, because the edits are written for
    the whole batch; only the kept rows' logits are returned."""
    seq = [tokens, attention_mask]
    rows = torch.arange(tokens.shape[0], device=tokens.device)  # the rows still decoding

    def step(nxt: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        nonlocal rows
        if kept is not None:
            rows = rows[kept.to(rows.device)]
        every = torch.zeros(seq[0].shape[0], dtype=seq[0].dtype, device=seq[0].device)
        every[rows] = nxt.to(every.device)
        seq[0] = torch.cat([seq[0], every[:, None]], 1)
        seq[1] = torch.cat([seq[1], torch.ones_like(every[:, None])], 1)
        return logits_of(seq[0], seq[1])[rows]

    return step
