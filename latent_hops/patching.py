"""The one patching primitive: read or write the hidden state at (layer, position).

Every intervention in latent_hops (back-patching, Patchscopes, cross-prompt patching) goes
through ``write_positions`` — as a TransformerLens hook (``patch_hook``) on the prompt pass,
or directly on a residual stream that a resumed forward pass continues from. "Hidden state
of layer l" is ``blocks.{l}.hook_resid_post`` (``backend.hidden_state_hook``); layer -1
is the embedding output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from latent_hops import backend
from latent_hops.backend import EMBEDDINGS, Model

Hook = tuple[str, Callable]


def write_positions(
    resid: Float[torch.Tensor, "batch pos d_model"],
    positions: Int[torch.Tensor, " batch"],
    values: Float[torch.Tensor, "batch d_model"],
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Overwrite ``resid[b, positions[b]]`` with ``values[b]`` for every row b (in place)."""
    rows = torch.arange(resid.shape[0], device=resid.device)
    resid[rows, positions.to(resid.device)] = values.to(resid.device, resid.dtype)
    return resid


def patch_hook(
    layer: int, positions: Int[torch.Tensor, " batch"], values: Float[torch.Tensor, "batch d_model"]
) -> Hook:
    """A forward hook writing ``values`` into the hidden state of ``layer`` at ``positions``.

    Positions index the prompt (left-padded) and so stay valid in a no-cache generation
    loop; with the KV cache the hook is used on the prompt pass only.
    """
    return backend.write_hook(layer, lambda resid: write_positions(resid, positions, values))


def hidden_states_at(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    positions: Int[torch.Tensor, "batch n_positions"],
    layers,
) -> Float[torch.Tensor, "batch n_positions n_layers d_model"]:
    """The clean hidden states of ``layers`` at ``positions`` only."""
    sites = [backend.Site("resid", layer) for layer in backend.check_layers(model, layers)]
    return backend.read_sites(model, tokens, attention_mask, positions, sites)


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
    on_output: Callable[[Sequence[PatchRow], backend.GreedyOutput], None],
    max_new_tokens: int,
    max_rows: int,
    sampler: backend.Sampler | None = None,
    keep: Callable[[Sequence[PatchRow], torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Greedy generation for many single-position patches of one prompt batch, fast.

    The batch's clean forward is walked block by block; at each layer l the rows patching l
    are written into the clean residual (``write_positions``) and resumed from block l + 1.
    On the hooked backend layers <= l are never recomputed (their keys/values are shared);
    the bridge reruns them (``backend.bridge``).
    ``values(chunk)`` gives the patch vectors, ``on_output(chunk, out)`` takes the results;
    decoding is greedy unless a ``sampler`` is given. ``keep(chunk, first_logits)`` screens
    rows after the prompt pass (``backend.greedy_from_layer``).
    Equivalent to one ``patch_hook`` generation per row (tests check it).
    """
    layers = backend.check_layers(model, {r.layer for r in rows})
    by_layer: dict[int, list[PatchRow]] = {layer: [] for layer in layers}
    for r in rows:
        by_layer[r.layer].append(r)
    state = backend.start_prompt(model, tokens, attention_mask, max(layers))
    for layer in range(EMBEDDINGS, max(layers) + 1):
        resid = backend.advance(model, state, layer)
        todo = by_layer.get(layer, [])
        for start in range(0, len(todo), max_rows):
            chunk = todo[start : start + max_rows]
            base = torch.tensor([r.base for r in chunk], device=resid.device)
            cols = torch.tensor([r.position for r in chunk], device=resid.device)
            patched = write_positions(resid[base].clone(), cols, values(chunk))
            mask = attention_mask[base]
            prefix = backend.select_prefix(model, state, base, layer + 1, mask)
            screen = None if keep is None else (lambda logits, chunk=chunk: keep(chunk, logits))
            on_output(
                chunk,
                backend.greedy_from_layer(
                    model, patched, layer + 1, mask, prefix, max_new_tokens, sampler, screen
                ),
            )
