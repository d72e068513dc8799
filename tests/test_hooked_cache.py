"""The hooked backend's KV cache entry: TL's entry semantics, with room and the products'
layout (its numbers against TL's own entries: test_engine_cost)."""

import pytest
import torch

pytest.importorskip("transformer_lens")
from transformer_lens import TransformerLensKeyValueCacheEntry  # noqa: E402

from latent_hops.backend.hooked_cache import KVEntry  # noqa: E402


def keys(batch, pos, seed):
    return torch.randn(batch, pos, 3, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
def test_appends_equal_tl_entry_and_grow_past_the_room(batch):
    ours = KVEntry([keys(batch, 5, 0)], [keys(batch, 5, 1)], room=2)
    theirs = TransformerLensKeyValueCacheEntry(keys(batch, 5, 0), keys(batch, 5, 1))
    for step, new in enumerate([1, 1, 3, 1]):  # the third overflows the room
        k, v = keys(batch, new, 10 + step), keys(batch, new, 20 + step)
        for got, want in zip(ours.append(k, v), theirs.append(k, v)):
            assert torch.equal(got, want)
    assert torch.equal(ours.past_keys, theirs.past_keys)
    assert torch.equal(ours.past_values, theirs.past_values)
    theirs.frozen = ours.frozen = True  # frozen: returned, not kept
    k, v = keys(batch, 2, 30), keys(batch, 2, 31)
    assert torch.equal(ours.append(k, v)[0], theirs.append(k, v)[0])
    assert ours.past_keys.shape[1] == theirs.past_keys.shape[1] == 11


def test_rows_are_stored_as_the_products_read_them():
    """Several rows: keys [batch, kv_head, d_head, pos] and values [batch, kv_head, pos,
    d_head] in memory; one row: TL's own contiguous layout."""
    several = KVEntry([keys(2, 5, 0)], [keys(2, 5, 1)], room=3)
    assert several.past_keys.permute(0, 2, 3, 1).stride()[-1] == 1
    assert several.past_values.permute(0, 2, 1, 3).stride()[-1] == 1
    assert several.past_keys.stride(1) == 1  # positions adjacent: no copy to read them so
    one = KVEntry([keys(1, 5, 0)], [keys(1, 5, 1)], room=3)
    assert one.past_keys.is_contiguous() and one.past_keys.stride() == keys(1, 5, 0).stride()


def test_parts_stack_in_order_and_selected_rows_keep_rotations_and_room():
    a, b = keys(2, 4, 0), keys(1, 4, 1)
    entry = KVEntry([a, b], [a + 1, b + 1], room=4)
    assert torch.equal(entry.past_keys, torch.cat([a, b]))
    appended, _ = entry.append(keys(3, 1, 2), keys(3, 1, 3))
    calls = []

    def rotate(new, offset):  # a stand-in rotation: records which positions it was given
        calls.append((new.shape[1], offset))
        return new * 2

    rotated = entry.rotate(appended, rotate)
    assert calls == [(5, 0)] and torch.equal(rotated, appended * 2)
    picked = entry.select(torch.tensor([2, 0]))
    assert torch.equal(picked.past_keys, entry.past_keys[[2, 0]])
    again, _ = picked.append(keys(2, 1, 4), keys(2, 1, 5))
    assert torch.equal(picked.rotate(again, rotate), torch.cat([rotated[[2, 0]], again[:, 5:] * 2], 1))
    assert calls[-1] == (1, 5)  # only the new position was rotated
    assert picked._keys.shape[1] == entry._keys.shape[1]  # the same room
