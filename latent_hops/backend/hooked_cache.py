"""The hooked backend's KV cache for decoding (TransformerLens 3.x attention).

TL 3.9's cache entry concatenates the whole cache with each step's keys and values, its
attention copies the cache into the layout of the score and value products at every step,
and rotary attention rotates every cached key again. ``KVEntry`` has room for the tokens to
come (a step writes its keys and values in place), stores them in the layout the products
read (no copy per step), and keeps its keys rotated (``reuse_rotated_keys``: each key is
rotated once). The numbers are TL's entries' own: every product sees operands that BLAS runs
with the same kernel as TL's copies (tests compare logits, hooks and generations with TL's
entries and attention, bit for bit).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, TransformerLensKeyValueCache

Keys = Float[torch.Tensor, "batch pos kv_head d_head"]

# Storage order of a [batch, pos, kv_head, d_head] buffer, by batch size. For a batch of
# several rows the products read keys as [batch, kv_head, d_head, pos] and values as
# [batch, kv_head, pos, d_head]: stored so, each is a strided view that BLAS reads in place.
# A one-row batch keeps TL's order: there TL's own products read the cache in place, as
# transposed operands, and so do ours (the same kernel, the same bits).
KEY_ORDER = (0, 2, 3, 1)
VALUE_ORDER = (0, 2, 1, 3)
TL_ORDER = (0, 1, 2, 3)


def _buffer(batch: int, capacity: int, like: torch.Tensor, order: tuple[int, ...]) -> Keys:
    """An empty [batch, capacity, kv_head, d_head] tensor, stored so that
    ``.permute(order)`` is contiguous."""
    shape = (batch, capacity, *like.shape[2:])
    stored = like.new_empty([shape[i] for i in order])
    return stored.permute(sorted(range(4), key=order.__getitem__))


def _upto(buffer: Keys, end: int) -> Keys:
    """Positions ``:end`` of a buffer; of a one-row buffer, with the strides of TL's own
    contiguous tensor (a size-one dimension's stride is free, and BLAS calls follow it)."""
    view = buffer[:, :end]
    if len(buffer) == 1:
        view = view.as_strided(view.shape, (end * view.stride(1), *view.stride()[1:]))
    return view


class KVEntry:
    """One block's keys and values ([batch, pos, kv_head, d_head], as TL's
    ``TransformerLensKeyValueCacheEntry``), with room for ``room`` more positions; grows if
    it runs out. ``keys``/``values``: parts of the batch, their rows in turn; ``rotated``:
    the rotated keys of the first positions, if already known."""

    frozen = False

    def __init__(
        self,
        keys: Sequence[Keys],
        values: Sequence[Keys],
        room: int,
        rotated: Keys | None = None,
    ):
        batch, self.n = sum(len(k) for k in keys), keys[0].shape[1]
        capacity = self.n + max(room, 1)
        self._key_order = KEY_ORDER if batch > 1 else TL_ORDER
        self._keys = _buffer(batch, capacity, keys[0], self._key_order)
        self._values = _buffer(batch, capacity, values[0], VALUE_ORDER if batch > 1 else TL_ORDER)
        start = 0
        for k, v in zip(keys, values):
            self._keys[start : start + len(k), : self.n] = k
            self._values[start : start + len(k), : self.n] = v
            start += len(k)
        self._rotated: Keys | None = None  # rotary models: rotated keys, as self._keys
        self.rotated_n = 0  # positions whose rotated keys self._rotated holds
        if rotated is not None:
            self._rotated_room()[:, : rotated.shape[1]] = rotated
            self.rotated_n = rotated.shape[1]
        self.appended: Keys | None = None  # the keys the last append returned

    @property
    def past_keys(self) -> Keys:
        return _upto(self._keys, self.n)

    @property
    def past_values(self) -> Keys:
        return _upto(self._values, self.n)

    def append(self, new_keys: Keys, new_values: Keys) -> tuple[Keys, Keys]:
        """TL's ``append``: the keys and values with the new ones after them (kept unless
        frozen), written in place."""
        n, end = self.n, self.n + new_keys.shape[1]
        if end > self._keys.shape[1]:
            self._grow(end)
        self._keys[:, n:end] = new_keys
        self._values[:, n:end] = new_values
        if not self.frozen:
            self.n = end
        self.appended = _upto(self._keys, end)
        return self.appended, _upto(self._values, end)

    def rotate(self, keys: Keys, rotate: Callable[[Keys, int], Keys]) -> Keys:
        """``keys`` (what ``append`` returned) rotated: the positions rotated before are
        reused, the others rotated by ``rotate(keys from position p, p)``."""
        done, end = self.rotated_n, keys.shape[1]
        rotated = self._rotated_room()
        rotated[:, done:end] = rotate(keys[:, done:], done)
        if not self.frozen:
            self.rotated_n = end
        return _upto(rotated, end)

    def _rotated_room(self) -> Keys:
        if self._rotated is None:
            batch, capacity = self._keys.shape[:2]
            self._rotated = _buffer(batch, capacity, self._keys, self._key_order)
        return self._rotated

    def select(self, rows: Int[torch.Tensor, " rows"]) -> KVEntry:
        """The entry of rows ``rows`` of the batch, with the same room left."""
        rows = rows.to(self._keys.device)  # blocks may live on other GPUs
        room = self._keys.shape[1] - self.n
        rotated = None
        if self._rotated is not None and self.rotated_n:
            rotated = self._rotated[rows, : self.rotated_n]
        return KVEntry([self.past_keys[rows]], [self.past_values[rows]], room, rotated)

    def _grow(self, size: int) -> None:
        room = max(size, 2 * self._keys.shape[1]) - self.n
        rotated = None if self._rotated is None else self._rotated[:, : self.rotated_n]
        grown = KVEntry([self.past_keys], [self.past_values], room, rotated)
        self._keys, self._values, self._rotated = grown._keys, grown._values, grown._rotated


def cache_rows(
    cache: TransformerLensKeyValueCache, rows: Int[torch.Tensor, " kept"]
) -> TransformerLensKeyValueCache:
    """The keys/values (and attention mask) of ``rows`` of a cache's batch."""
    entries: list[Any] = []
    for entry in cache.entries:
        if isinstance(entry, KVEntry):
            entries.append(entry.select(rows))
        else:  # TL's own entry
            index = rows.to(entry.past_keys.device)
            entries.append(type(entry)(entry.past_keys[index], entry.past_values[index]))
    mask = cache.previous_attention_mask[rows.to(cache.previous_attention_mask.device)]
    return type(cache)(entries=entries, previous_attention_mask=mask)


def _forward_noting_cache(attn: Any, *args: Any, **kwargs: Any) -> Any:
    """The attention's forward, with the KV cache entry it appends to at hand for
    ``_rotate_new_keys`` while it runs."""
    attn._appending = kwargs.get("past_kv_cache_entry")
    try:
        return type(attn).forward(attn, *args, **kwargs)
    finally:
        attn._appending = None


def _rotate_new_keys(
    attn: Any,
    x: Float[torch.Tensor, "batch pos head d_head"],
    past_kv_pos_offset: int = 0,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """``apply_rotary`` that rotates only the keys a cached step appended to a ``KVEntry``.
    TL 3.9 caches keys unrotated and rotates the whole cache at every decoding step; a key's
    rotation depends on its own position only, so the entry keeps the rotated keys and
    rotates the new ones at their positions: the same numbers, element by element."""
    rotate = type(attn).apply_rotary
    entry = attn._appending
    if not isinstance(entry, KVEntry) or past_kv_pos_offset != 0 or x is not entry.appended:
        return rotate(attn, x, past_kv_pos_offset, attention_mask)  # queries, or no KVEntry
    return entry.rotate(x, lambda new, offset: rotate(attn, new, offset, attention_mask))


def reuse_rotated_keys(model: HookedTransformer) -> None:
    """Rotary attention that rotates each key cached in a ``KVEntry`` once, instead of the
    whole cache at every decoding step (5-15% of a SmolLM2 sweep's time), its numbers
    bitwise the same. One forward at a time per model, as with TL's hooks."""
    if model.cfg.positional_embedding_type != "rotary":
        return
    for block in model.blocks:
        attn = block.attn
        vars(attn)["_appending"] = None  # a plain attribute (nn.Module types its own)
        attn.forward = types.MethodType(_forward_noting_cache, attn)  # type: ignore[method-assign]
        attn.apply_rotary = types.MethodType(_rotate_new_keys, attn)  # type: ignore[method-assign]
