"""The one patching primitive: read or write the hidden state at (layer, position).

Every intervention in latent_hops (back-patching, Patchscopes, cross-prompt patching) goes
through ``write_positions`` — as an edit of the prompt pass (``patch_edit``), or directly on
a residual stream that a resumed forward pass continues from. "Hidden state of layer l" is
``blocks.{l}.hook_resid_post`` (``backend.hidden_state_hook``); layer -1 is the embedding
output.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from latent_hops.backend import Decoding, Edit, GreedyOutput, Model, PromptWalk, Sampler, Site


def write_positions(
    resid: Float[torch.Tensor, "batch pos d_model"],
    positions: Int[torch.Tensor, " batch"],
    values: Float[torch.Tensor, "batch d_model"],
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Overwrite ``resid[b, positions[b]]`` with ``values[b]`` for every row b (in place)."""
    rows = torch.arange(resid.shape[0], device=resid.device)
    resid[rows, positions.to(resid.device)] = values.to(resid.device, resid.dtype)
    return resid


def patch_edit(
    layer: int, positions: Int[torch.Tensor, " batch"], values: Float[torch.Tensor, "batch d_model"]
) -> Edit:
    """An edit writing ``values`` into the hidden state of ``layer`` at ``positions``.

    Positions index the prompt (left-padded) and so stay valid in a no-cache generation
    loop; with the KV cache the edit acts on the prompt pass only.
    """
    return Edit(Site("resid", layer), lambda resid: write_positions(resid, positions, values))


def hidden_states_at(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    positions: Int[torch.Tensor, "batch n_positions"],
    layers: Sequence[int],
) -> Float[torch.Tensor, "batch n_positions n_layers d_model"]:
    """The clean hidden states of ``layers`` at ``positions`` only."""
    sites = [Site("resid", layer) for layer in model.check_layers(layers)]
    return model.read_sites(tokens, attention_mask, positions, sites)


def seeded_direction(key: str, like: torch.Tensor) -> torch.Tensor:
    """A random direction with the norm (and dtype) of ``like``, fixed by ``key``: drawn in
    float32 on the CPU from a generator seeded with the key's CRC-32, so it is the same on any
    device and for any ``like`` of that size (the norm-matched random control)."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    v = torch.randn(like.shape[-1], generator=gen, dtype=torch.float32).to(like.device)
    return (v * (like.float().norm() / v.norm())).to(like.dtype)


@dataclass(frozen=True)
class PatchRow:
    """One patched run: row ``base`` of a prompt batch, hidden state of ``layer`` at column
    ``position`` overwritten; ``key`` is the caller's label for the row."""

    base: int
    position: int
    layer: int
    key: Any = None


@torch.no_grad()
def generate_with_patches(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    rows: Sequence[PatchRow],
    values: Callable[[Sequence[PatchRow]], Float[torch.Tensor, "rows d_model"]],
    on_output: Callable[[Sequence[PatchRow], GreedyOutput], None],
    max_new_tokens: int,
    max_rows: int,
    sampler: Sampler | None = None,
    keep: Callable[[Sequence[PatchRow], torch.Tensor], torch.Tensor] | None = None,
    walk: PromptWalk | None = None,
    stop: Callable[[Sequence[PatchRow], torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Greedy generation for many single-position patches of one prompt batch, fast.

    The batch's clean forward is walked block by block (``model.walk_prompt``); at each
    layer l the rows patching l are written into the clean residual (``write_positions``)
    and join a batch of resumed rows (``ResumedRows``) that grows as the layers rise: every
    row shares its forward passes and its decoding with up to ``max_rows`` rows of any layer
    and prompt. Rows patching the last column and rows patching earlier columns are batched
    apart, so that the former recompute one column only. On the hooked backend layers <= l
    are never recomputed, nor columns before the earliest patched one (their keys/values
    are shared); the bridge reruns them (``capabilities``).
    ``values(chunk)`` gives the patch vectors, ``on_output(chunk, out)`` takes the results
    (one call per batch of rows); decoding is greedy unless a ``sampler`` is given, and then
    each layer's rows are decoded apart, in chunks of ``max_rows``, so that the draws do not
    depend on the other layers' rows. ``keep(chunk, first_logits)`` screens rows after the
    prompt pass, and ``stop(rows, tokens_so_far)`` ends the decoding of rows whose outcome
    is decided (``Decoding``); both get the rows they judge. ``walk``: the batch's walk, if
    the caller has already read clean states off it (it must reach the rows' layers).
    Equivalent to one ``patch_edit`` generation per row (tests check it).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    layers = model.check_layers({r.layer for r in rows})
    if not layers:
        return
    walk = walk or model.walk_prompt(tokens, attention_mask, max(layers))

    def decoding(chunk: Sequence[PatchRow]) -> Decoding:
        def rows_of(index: torch.Tensor) -> list[PatchRow]:
            return [chunk[i] for i in index.tolist()]

        return Decoding(
            max_new_tokens,
            sampler,
            keep=None if keep is None else lambda r, lg: keep(rows_of(r), lg),
            stop=None if stop is None else lambda r, t: stop(rows_of(r), t),
        )

    last = tokens.shape[1] - 1
    for part in ([r for r in rows if r.position == last], [r for r in rows if r.position != last]):
        if not part:
            continue
        start = min(r.position for r in part)
        group, pending = walk.resumed(start), list[PatchRow]()

        def flush() -> None:
            nonlocal group, pending
            if pending:
                on_output(pending, group.finish(decoding(pending)))
                group, pending = walk.resumed(start), []

        by_layer: dict[int, list[PatchRow]] = {}
        for r in part:
            by_layer.setdefault(r.layer, []).append(r)
        for layer, todo in sorted(by_layer.items()):
            resid = walk.hidden(layer)
            while todo:
                if len(pending) == max_rows:
                    flush()
                chunk, todo = todo[: max_rows - len(pending)], todo[max_rows - len(pending) :]
                base = torch.tensor([r.base for r in chunk], device=resid.device)
                cols = torch.tensor([r.position for r in chunk], device=resid.device)
                group.join(base, write_positions(resid[base].clone(), cols, values(chunk)), layer)
                pending += chunk
            if sampler is not None:
                flush()
        flush()
