"""Tokenisation with character offsets, and the two positions every analysis uses.

Conventions (written once, used everywhere):
- t1 = the last token of e1's mention inside the composition prompt;
- t2 = the last token of the prompt;
- "hidden state of layer l" = ``blocks.{l}.hook_resid_post`` (see ``backend.hidden_state_hook``).

Prompts are left-padded, so t2 is always the last column of a batch. t1 is found from the
tokenizer's character offsets, not by searching token subsequences, so it is right whether
or not a BOS is prepended, for leading-space BPE, SentencePiece and word-level tokenizers,
and when an entity tokenises differently in context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Int

from latent_hops.backend import EMBEDDINGS, Model
from latent_hops.errors import InputError
from latent_hops.queries import PROMPT_SUFFIX, TwoHopQuery, e1_span_in_composition

Span = tuple[int, int]


GRID_HELP = "layer grid: all (default), '0,3,7', a range 'a:b:k', or 'every:k' (+ the last layer)"


def _spans(layers: Sequence[int]) -> str:
    """``layer 9`` / ``layers 8..98`` / ``layers -3, 8..10``: runs of consecutive layers as
    ranges (a grid '0:99' on an 8-layer model names two numbers, not ninety-one)."""
    runs: list[list[int]] = []
    for x in sorted(set(layers)):
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)
    return f"layer {text}" if len(runs) == 1 and len(runs[0]) == 1 else f"layers {text}"


def parse_layers(spec, n_layers: int, first: int = 0) -> tuple[int, ...] | None:
    """A layer grid: ``None``/``"all"`` (every layer), a list, ``"a:b:k"`` (Python range), or
    ``"every:k"`` (every k-th layer from ``first``, plus the last layer, whose state holds
    the model's answer). Checked against the model's layers."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return None
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if text.startswith("every:"):
                every = int(text.split(":", 1)[1])
                if every < 1:
                    raise ValueError
                layers = sorted(set(range(first, n_layers, every)) | {n_layers - 1})
            elif ":" in text:
                parts = [int(x) if x else None for x in text.split(":")]
                if len(parts) > 3:
                    raise ValueError
                start, stop, step = (parts + [None, None])[:3]
                layers = list(
                    range(
                        first if start is None else start,
                        n_layers if stop is None else stop,
                        step or 1,
                    )
                )
            else:
                layers = [int(x) for x in text.split(",") if x.strip()]
        except (ValueError, TypeError):
            raise InputError(
                f"layer grid {spec!r}: use 'all', a list '0,3,7', a range 'a:b:k' or 'every:k'"
            ) from None
    else:
        layers = [int(x) for x in spec]
    if not layers:
        raise InputError(f"layer grid {spec!r} selects no layer")
    bad = [x for x in layers if not EMBEDDINGS <= x < n_layers]
    if bad:
        raise InputError(
            f"layer grid {spec!r}: {_spans(bad)} out of range: this model has layers "
            f"-1 (embeddings) to {n_layers - 1}"
        )
    return tuple(sorted(set(layers)))


@dataclass
class TokenizedPrompts:
    """Padded token ids of a batch of prompts, with per-token character offsets.

    The analyses use left padding (t2 is then the last column); right padding is
    supported for callers that need it.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    offsets: list[list[Span]]  # per prompt, per real token; (0, 0) for BOS
    padding_side: str = "left"

    @property
    def n_pad(self) -> list[int]:
        """Column of each prompt's first real token (its number of left padding tokens)."""
        if self.padding_side == "right":
            return [0] * len(self.offsets)
        return [self.tokens.shape[1] - len(o) for o in self.offsets]

    def last_position(self) -> list[int]:
        """t2 of each prompt, as a column index of ``tokens``."""
        return [n + len(o) - 1 for n, o in zip(self.n_pad, self.offsets)]

    def overlapping(self, row: int, span: Span) -> list[int]:
        """Unpadded indices of the tokens of prompt ``row`` that overlap the character ``span``."""
        start, end = span
        return [i for i, (s, e) in enumerate(self.offsets[row]) if e > s and s < end and e > start]

    def char_span_position(self, row: int, span: Span) -> int | None:
        """Column index of the last token overlapping the character ``span``, or None."""
        hits = self.overlapping(row, span)
        return self.n_pad[row] + hits[-1] if hits else None


def tokenize_prompts(
    model: Model, prompts: list[str], prepend_bos: bool | None = None, padding_side: str = "left"
) -> TokenizedPrompts:
    """Tokenise like ``model.to_tokens`` does, but padded (left by default) and with
    character offsets. BOS is prepended when ``prepend_bos`` (default: the model's own
    tokenizer's convention, ``model.prepends_bos``).
    """
    if not prompts:
        raise InputError("no prompts to tokenise")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = model.tokenizer
    bos = model.prepends_bos if prepend_bos is None else prepend_bos
    enc = tokenizer(list(prompts), add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [list(map(tuple, o)) for o in enc["offset_mapping"]]
    if bos:
        ids = [[tokenizer.bos_token_id] + row for row in ids]
        offsets = [[(0, 0)] + row for row in offsets]
    empty = [p for p, row in zip(prompts, ids) if not row]
    if empty:
        raise InputError(f"prompt tokenises to nothing: {empty[0]!r}")
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    device = model.device
    return TokenizedPrompts(tokens.to(device), mask.to(device), offsets, padding_side)


def context_problems(model: Model, prompts: list[str], new_tokens: int = 0) -> list[str | None]:
    """For each prompt, why it cannot run (its tokens plus ``new_tokens`` generated ones
    exceed the model's context ``n_ctx``), or None. TransformerLens would fail deep in its
    positional code, and fail the whole batch with it."""
    tokenizer, bos = model.tokenizer, int(model.prepends_bos)
    lengths = [
        len(ids) + bos for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ]
    n_ctx = model.context_length
    generated = f" + {new_tokens} generated" if new_tokens else ""
    return [
        None
        if n + new_tokens <= n_ctx
        else f"prompt of {n} tokens{generated} exceeds the model's context of {n_ctx} tokens"
        for n in lengths
    ]


def answer_first_tokens(model: Model, prompt: str, aliases) -> list[int]:
    """First token of each alias as it would be generated right after ``prompt``.

    Found by tokenising ``prompt + " " + alias`` and taking the first token past the
    prompt's own tokens, so leading-space BPE and SentencePiece pieces come out right.
    Where a tokenizer merges across that boundary, the alias is tokenised on its own.
    """
    tokenizer = model.tokenizer
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    firsts = []
    for alias in aliases:
        ids = tokenizer(f"{prompt} {alias}", add_special_tokens=False)["input_ids"]
        if len(ids) > len(base) and ids[: len(base)] == base:
            firsts.append(ids[len(base)])
        else:
            alone = tokenizer(f" {alias}", add_special_tokens=False)["input_ids"]
            firsts += alone[:1]
    return list(dict.fromkeys(firsts))


def resolve_positions(
    model: Model, queries: Sequence[TwoHopQuery], suffix: str = PROMPT_SUFFIX
) -> pd.DataFrame:
    """t1 and t2 of each composition prompt as unpadded token indices, or the reason why not.

    Columns: ``id``, ``t1``, ``t2`` (nullable ints), ``skip_reason`` (null when resolved).
    """
    rows = []
    for q in queries:
        span = e1_span_in_composition(q, suffix)
        prompt = q.composition_prompt(suffix)
        tok = tokenize_prompts(model, [prompt])
        t1 = tok.char_span_position(0, span) if isinstance(span, tuple) else None
        if isinstance(span, str):
            reason: str | None = span
        elif t1 is None:
            reason = f"no token overlaps e1's characters {span} in {prompt!r}"
        else:
            reason = None
        n = tok.tokens.shape[1]
        rows.append({"id": q.id, "t1": t1, "t2": n - 1, "skip_reason": reason})
    out = pd.DataFrame(rows, columns=["id", "t1", "t2", "skip_reason"])
    out["t1"] = out["t1"].astype("Int64")
    out["t2"] = out["t2"].astype("Int64")
    return out
