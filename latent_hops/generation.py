"""Batched greedy generation of text prompts, and the paper's alias scoring.

Prompts are tokenised once (``positions.tokenize_prompts``), grouped by length into
left-padded batches, decoded greedily by ``backend.greedy_generate`` and returned in the
input order; batched results equal unbatched ones (tests check it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from latent_hops.backend import Model
from latent_hops.errors import InputError
from latent_hops.positions import tokenize_prompts

DEFAULT_MAX_NEW_TOKENS = 10


def decode(model: Model, ids: Iterable[int]) -> str:
    """Text of generated token ids, without special tokens (EOS, padding)."""
    return model.tokenizer.decode(list(ids), skip_special_tokens=True)


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (less padding, same results)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def generate(
    model: Model,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 128,
    progress=None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text after the prompt), in input order."""
    lengths = [len(p) for p in prompts]
    texts: list[str] = [""] * len(prompts)
    for idx in length_batches(lengths, batch_size):
        batch = tokenize_prompts(model, [prompts[i] for i in idx])
        out = model.greedy_generate(batch.tokens, batch.attention_mask, max_new_tokens)
        for i, row in zip(idx, out.tokens.tolist()):
            texts[i] = decode(model, row)
        if progress is not None:
            progress.update(len(idx))
    return texts


def alias_match(generation: str, aliases: Iterable[str]) -> bool:
    """The paper's scoring: some alias longer than one character is a case-insensitive
    substring of the generation."""
    text = generation.lower()
    return any(len(a) > 1 and a.lower() in text for a in aliases)
