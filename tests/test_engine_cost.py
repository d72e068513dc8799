"""What the fast engine executes and what the protocol needs: the work counter against
forward passes of known shape, the engine's executed work against the protocol's minimum
plus its known overhead, the weight layout that leaves every number unchanged, rows that
share passes across layers, the pre-sweep estimate and the benchmark script."""

import contextlib
import copy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import load_script, save_tiny

from latent_hops.analyses.backpatch import (
    BackpatchConfig,
    Cell,
    all_cells,
    estimate,
    minimum_work,
    prepare_cases,
    sweep,
)
from latent_hops.backend import Decoding
from latent_hops.backend.hooked import _unembed, lay_out_weights
from latent_hops.backend.work import (
    ModelShape,
    WorkCount,
    matmul_flops_per_s,
    projection_flops_per_s,
)
from latent_hops.models import load_model
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import load_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_cases(toy):
    data = load_dataset("toy")
    cases, skipped = prepare_cases(toy, data[data.split == "test_id"].iloc[:3])
    assert skipped.empty
    return cases


def test_count_work_on_a_prompt_pass_and_cached_decoding(tiny_llama):
    tokens = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    mask = (tokens != 0).long()
    n = tiny_llama.n_layers
    with tiny_llama.count_work() as work:
        tiny_llama.last_logits(tokens, mask)
    assert (work.block_tokens, work.attention_pairs, work.unembedded) == (n * 10, n * 2 * 25, 2)
    with tiny_llama.count_work() as work:
        out = tiny_llama.greedy_generate(tokens, mask, max_new_tokens=3)
    assert out.tokens.shape == (2, 3)
    # the prompt (5 x 5 pairs per row), then two steps of one token over 6 and 7 keys
    assert work.block_tokens == n * (10 + 2 + 2)
    assert work.attention_pairs == n * (2 * 25 + 2 * 6 + 2 * 7)
    assert work.unembedded == 2 + 2 + 2
    assert work.block_calls == n * 3 and work.rows_per_product == 14 / 3  # 10, 2, 2 rows
    with tiny_llama.count_work() as work:  # counting stops with the context
        pass
    tiny_llama.last_logits(tokens, mask)
    assert work == WorkCount()


def test_flops_from_shape_by_hand():
    shape = ModelShape(n_layers=2, d_model=4, n_heads=2, n_kv_heads=1, d_head=2, d_mlp=8,
                       gated_mlp=True, d_vocab=10)  # fmt: skip
    # q and out: 2 * 4*4; k and v: 2 * 4*2; gated MLP: 3 * 4*8; x2 for multiply-add
    assert shape.block_flops_per_token == 2 * (32 + 16 + 96)
    assert shape.flops_per_attention_pair == 4 * 2 * 2
    assert WorkCount(3, 5, 7).flops(shape) == 3 * 288 + 5 * 16 + 7 * 80


def test_the_engine_executes_the_minimum_but_the_masked_scores(toy, toy_cases):
    """One case, one cell at t2 (the last column): the engine runs exactly the protocol's
    least work; beyond it only the clean pass's masked half of its n x n attention scores
    (the source states are read off the same clean pass the patched row resumes from)."""
    case, target = toy_cases[0], 2
    config = BackpatchConfig(positions=("t2",), cells=(Cell(5, target, "back"),))
    with toy.count_work() as executed:
        result = sweep(toy, [case], config)
    need = minimum_work(toy, [case], config, result)
    n, layers = len(tokenize_prompts(toy, [case.prompt]).tokens[0]), toy.n_layers
    assert executed.block_tokens == need.block_tokens
    assert executed.attention_pairs == need.attention_pairs + layers * (n * n - n * (n + 1) // 2)
    assert executed.unembedded == need.unembedded
    # without the result, every row decodes max_new_tokens: the toy's answers end sooner
    assert minimum_work(toy, [case], config).block_tokens > need.block_tokens


def test_work_efficiency_of_a_sweep_is_high_and_never_above_one(toy, toy_cases):
    config = BackpatchConfig(source_layers="every:2", target_layers="every:2")
    with toy.count_work() as executed:
        result = sweep(toy, toy_cases, config)
    efficiency = minimum_work(toy, toy_cases, config, result).flops(toy.shape) / executed.flops(toy.shape)
    assert 0.8 < efficiency <= 1.0


def test_weight_layout_changes_no_number_and_removes_the_copies(tiny_llama, tiny_gpt2):
    for model in (tiny_llama, tiny_gpt2):
        plain = copy.deepcopy(model.tl)
        for param in plain.parameters():
            param.data = param.data.contiguous()  # TransformerLens' own layout
        tokens = torch.tensor([[3, 4, 5, 6, 7, 8]])
        with torch.no_grad():
            laid_out, before = model.tl(tokens), plain(tokens)
            lay_out_weights(plain)
            after = plain(tokens)
        assert torch.equal(laid_out, before) and torch.equal(after, before)
    block = tiny_llama.tl.blocks[0]
    assert block.mlp.W_gate.T.is_contiguous() and tiny_llama.tl.W_U.T.is_contiguous()


@pytest.mark.parametrize("chunk", [16, 48, 10**6])
def test_unembedding_skips_only_a_bias_of_zeros(tiny_llama_dir, chunk):
    """Logits equal TL's unembedding's, hooks included: without its bias of zeros, and with
    a bias where there is one; in one product and in chunks of the vocabulary (160 rows:
    ten chunks of 16, or 48, 48 and 64)."""
    tl = load_model(tiny_llama_dir, device="cpu").tl
    assert tl.cfg.d_vocab == 160
    resid = torch.randn(6, 1, tl.cfg.d_model, generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.no_grad(), tl.hooks(fwd_hooks=[("unembed.hook_out", lambda x, hook: seen.append(x))]):
        assert not tl.b_U.any() and torch.equal(_unembed(tl, resid, chunk), tl.unembed(resid))
        tl.unembed.b_U += torch.linspace(-1, 1, tl.cfg.d_vocab)
        assert torch.equal(_unembed(tl, resid, chunk), tl.unembed(resid))
    assert len(seen) == 4


OVERRIDES = ("calculate_attention_scores", "calculate_z_scores", "forward", "apply_rotary")


@contextlib.contextmanager
def tl_own_attention(model):
    """The model's attention and KV cache as TransformerLens wrote them: the backend's
    shortcuts (shared key/value heads, keys rotated once, entries with room laid out for the
    products) taken off for the duration."""
    saved = [{k: vars(b.attn).pop(k) for k in OVERRIDES if k in vars(b.attn)} for b in model.tl.blocks]
    model.kv_entries = False
    try:
        yield
    finally:
        del model.kv_entries
        for block, methods in zip(model.tl.blocks, saved):
            vars(block.attn).update(methods)


def step_logits(model, tokens, mask):
    """The logits of a cached prompt pass and of four decoding steps fed fixed tokens; of
    several rows, all but the last leave the batch after two steps, one by one."""
    cache = model._new_cache(len(tokens), tokens.shape[1] + 5)
    with torch.no_grad():
        out = [model._logits(tokens, attention_mask=mask, past_kv_cache=cache)]
        step, rows = model._cached_step(cache), len(tokens)
        for i in range(4):
            kept = torch.arange(1, rows) if i >= 2 and rows > 1 else None
            rows = rows if kept is None else len(kept)
            out.append(step(torch.full((rows,), 5 + i), kept))
    return out


@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_attention_shortcuts_change_no_number(tmp_path, soft_cap):
    """Grouped-query attention without TL's per-query-head copies of keys and values, and
    cached keys rotated once: the logits, what the attention hooks see, and generations
    (left-padded, cached, rows leaving the batch) equal TL's own attention bit for bit, with
    Gemma 2's score soft-cap too."""
    path = save_tiny("llama", tmp_path / "gqa", style="sentencepiece", kv_heads=2)
    model = load_model(path, device="cpu")
    if soft_cap:
        model.tl.cfg.attn_scores_soft_cap = soft_cap
    assert {"calculate_z_scores", "apply_rotary"} <= set(vars(model.tl.blocks[0].attn))  # in use
    tok = tokenize_prompts(model, ["Paris is the capital of", "Rome", "the spouse of the performer of"])
    names = ("pattern", "z", "attn_scores", "rot_k")

    def stop(rows, tokens):  # rows leave the batch at different steps
        return (tokens[:, -1] + rows) % 3 == 0

    def outputs():
        with torch.no_grad():
            logits, cache = model.tl.run_with_cache(tok.tokens, attention_mask=tok.attention_mask,
                                                     names_filter=lambda n: n.endswith(names))
        generated = model.greedy_generate(tok.tokens, tok.attention_mask, 6)
        steps = [*step_logits(model, tok.tokens, tok.attention_mask),
                 *step_logits(model, tok.tokens[2:], tok.attention_mask[2:])]  # fmt: skip
        walk = model.walk_prompt(tok.tokens, tok.attention_mask, 1)
        rows = torch.tensor([0, 1, 2, 0, 1, 2])
        resumed = walk.resume(rows, walk.hidden(1)[rows], 1, Decoding(6, stop=stop))
        return [logits, *cache.values(), generated.tokens, generated.first_logits, *steps,
                resumed.tokens]  # fmt: skip

    ours = outputs()
    with tl_own_attention(model):
        theirs = outputs()
    assert len(ours) == len(theirs) == 1 + model.n_layers * len(names) + 3 + 2 * 5
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_rows_join_in_order_of_layers(tiny_llama):
    tokens = torch.tensor([[5, 6, 7, 8]])
    walk = tiny_llama.walk_prompt(tokens, torch.ones_like(tokens), 2)
    group = walk.resumed(0)
    group.join(torch.tensor([0]), walk.hidden(2).clone(), 2)
    with pytest.raises(ValueError, match="order of layers"):
        group.join(torch.tensor([0]), walk.hidden(1).clone(), 1)


def test_rows_of_many_layers_share_passes_and_equal_rows_resumed_alone(tiny_llama):
    """Rows joined at layers -1, 0 and 2, from column 2 on, finished together, equal each
    resumed on its own from the whole prompt."""
    tokens = torch.tensor([[0, 5, 6, 7, 8], [9, 4, 3, 2, 1]])
    mask = (tokens != 0).long()
    walk = tiny_llama.walk_prompt(tokens, mask, 2)
    group, alone = walk.resumed(2), []
    for layer, row, column in [(-1, 0, 3), (0, 1, 2), (0, 0, 4), (2, 1, 4)]:
        resid = walk.hidden(layer)[[row]].clone()
        resid[0, column] = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(layer + 2))
        group.join(torch.tensor([row]), resid, layer)
        alone.append(tiny_llama.walk_prompt(tokens, mask, 2).resume(torch.tensor([row]), resid, layer, Decoding(4)))
    together = group.finish(Decoding(4))
    assert len(group) == 4
    assert torch.equal(together.tokens, torch.cat([o.tokens for o in alone]))
    torch.testing.assert_close(together.first_logits, torch.cat([o.first_logits for o in alone]))


def test_estimate_counts_the_sweep_and_times_a_sample(toy, toy_cases):
    config = BackpatchConfig(kinds=("back",))
    found = estimate(toy, toy_cases, config, sample=8)
    assert found.generations == len(toy_cases) * 2 * len(all_cells(toy, config))
    assert found.cells_per_s > 0 and found.seconds == found.generations / found.cells_per_s
    assert f"{found.generations:,} patched generations" in str(found)


def test_matmul_rate_is_measured():
    assert 1e8 < matmul_flops_per_s("cpu", torch.float32, size=256, seconds=0.05) < 1e14
    assert 1e7 < projection_flops_per_s(3, 64, 96, "cpu", torch.float32, seconds=0.05) < 1e14


def test_bench_prints_one_table_with_every_engine(tmp_path):
    """The toy, one case: fast equals naive, the baseline (this commit's engine, from git)
    runs too, and the efficiency columns are filled."""
    out = subprocess.run(
        [sys.executable, "scripts/bench_backpatch.py", "--threads", "1", "--cases", "1",
         "--layers", "0,3,7", "--naive", "--baseline", "HEAD", "--csv", str(tmp_path / "t.csv")],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    table = pd.read_csv(tmp_path / "t.csv").set_index("engine")
    assert list(table.index) == ["fast", "naive", "fast@HEAD"]
    assert table.loc["fast", "identical"] == "18/18"  # 1 case x 2 positions x 9 cells
    assert 0.5 < table.loc["fast", "work efficiency"] <= 1.0
    assert 0 < table.loc["fast", "MFU"] < 1
    assert 0 < table.loc["fast", "rows/product"] and 0 < table.loc["fast", "MFU at its rows"]
    assert "fast@HEAD / fast" in out and "work efficiency" in out


def test_bench_splits_the_shape_ratio_into_work_device_and_engine(monkeypatch):
    """The dearest workload's cost per cell over the cheapest's is the product of its three
    factors (work per cell, the device's product rate at the two row counts, the engine's
    MFU at its rows), each read off the table."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bench = load_script("bench_backpatch")
    executed, generations = [0.171, 7.3], [55, 2610]
    rate, mfu = [120.0, 170.0], [0.62, 0.65]  # the device's GFLOP/s at the rows, the engine's share
    ms = [1e3 * e * 1e12 / g / (m * r * 1e9) for e, g, r, m in zip(executed, generations, rate, mfu)]
    fast = pd.DataFrame(
        {
            "workload": ["small", "full"],
            "generations": generations,
            "ms/cell": ms,
            "executed TFLOP": executed,
            "rows/product": [60.0, 347.0],
            "GFLOP/s at its rows": rate,
            "MFU at its rows": mfu,
        }
    )
    line = bench.shape_ratio(fast)
    work = (0.171 / 55) / (7.3 / 2610)
    device, engine = 170.0 / 120.0, 0.65 / 0.62
    assert line.startswith(f"{ms[0] / ms[1]:.2f}x (small / full) = {work:.2f}x the work per cell")
    assert f"x {device:.2f}x this device's product rate at 60 vs 347 rows" in line
    assert f"x {engine:.2f}x the engine's own (MFU at its rows 62% vs 65%)" in line
    uncounted = fast.assign(**{"GFLOP/s at its rows": [None, None]})
    assert bench.shape_ratio(uncounted) == f"{ms[0] / ms[1]:.2f}x"


def test_bench_on_a_random_shape_builds_one_network_for_both_backends(tmp_path):
    """``--random`` (the GPU target's path, gpu_checks.sh): a seeded HF model of a published
    shape's kind, loaded by each backend as any HF model is, so the bridge's generations
    equal the hooked engine's, and the naive reference's, cell by cell."""
    subprocess.run(
        [sys.executable, "scripts/bench_backpatch.py", "--random", "llama-tiny", "--device", "cpu",
         "--threads", "1", "--cases", "1", "--layers", "0,3", "--naive", "--no-count",
         "--backend", "hooked,bridge", "--csv", str(tmp_path / "t.csv")],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    table = pd.read_csv(tmp_path / "t.csv").set_index("engine")
    assert list(table.index) == ["fast", "naive", "fast[bridge]"]
    assert set(table["identical"]) == {"6/6"}  # 1 case x 2 positions x (1 back + 2 controls)
