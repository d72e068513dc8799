"""The two TransformerLens backends give the same results. ``hooked`` (HookedTransformer,
TL 3.x) and ``bridge`` (TransformerBridge, TL 4; also in TL 3.9) are compared directly where
both exist (the main environment), on the shipped toys and on tiny random Llama / GPT-2 /
Qwen2 / Gemma2 models: log-probs within 1e-4, identical generations, ranks and tables. In the
TL 4 environment (``make test-tl4``) the bridge is compared with Hugging Face itself and with
the hooked backend's table for ``latent-hops backpatch --model toy --limit 40`` (stored)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_architectures import PROMPTS, save_family
from test_positions import QUERIES
from transformers import AutoModelForCausalLM

from latent_hops import backend, load_model
from latent_hops.analyses.backpatch import BackpatchConfig, prepare_cases, sweep, sweep_naive
from latent_hops.analyses.knockout import KnockoutConfig, attention_knockout
from latent_hops.analyses.logit_lens import logit_lens
from latent_hops.analyses.patchscopes import PatchscopeConfig, patchscope
from latent_hops.backend import Decoding, Site
from latent_hops.backend.tl import hook_name
from latent_hops.cli import main
from latent_hops.errors import InputError
from latent_hops.models import ModelLoadError, toy_checkpoint_dir
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import load_dataset, queries_to_table

HOOKED = backend.hooked_available()
BACKENDS = ["hooked", "bridge"] if HOOKED else ["bridge"]
both = pytest.mark.skipif(not HOOKED, reason="the hooked backend needs TransformerLens 3.x")
GOLDEN = Path(__file__).parent / "data" / "backpatch_toy_limit40_hooked.parquet"
MODELS = ["toy", "toy-gpt2", "llama", "gpt2", "qwen2", "gemma2"]
LOGPROB = dict(atol=1e-4, rtol=0)


def _path(name: str, tmp_path_factory) -> Path:
    if name.startswith("toy"):
        return toy_checkpoint_dir(name)
    return save_family(name, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module", params=MODELS)
def models(request, tmp_path_factory):
    """name -> {backend: model}, and a separate Hugging Face instance (the bridge wraps the
    HF model it is given in place)."""
    path = _path(request.param, tmp_path_factory)
    loaded = {b: load_model(path, device="cpu", backend=b) for b in BACKENDS}
    return request.param, loaded, AutoModelForCausalLM.from_pretrained(path).eval()


def _prompts(name: str, model) -> list[str]:
    if name.startswith("toy"):  # the toys' own vocabulary: prompts of the toy dataset
        return [c.prompt for c in prepare_cases(model, load_dataset("toy").iloc[:3])[0]]
    return PROMPTS


def _cut(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_logprobs_and_hidden_states_agree(models):
    name, loaded, hf = models
    outputs = {}
    for b, model in loaded.items():
        tok = tokenize_prompts(model, _prompts(name, model))
        cols = torch.arange(tok.tokens.shape[1]).expand(len(tok.tokens), -1)
        sites = [Site("resid", layer) for layer in range(-1, model.n_layers)]
        states = model.read_sites(tok.tokens, tok.attention_mask, cols, sites)
        logprobs = model.last_logits(tok.tokens, tok.attention_mask)
        outputs[b] = (tok, states, logprobs.log_softmax(-1))
    tok = outputs[BACKENDS[0]][0]
    position_ids = (tok.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(tok.tokens, attention_mask=tok.attention_mask, position_ids=position_ids).logits
    for b, (_, states, logprobs) in outputs.items():
        torch.testing.assert_close(logprobs, ref[:, -1].log_softmax(-1), **LOGPROB)
        torch.testing.assert_close(loaded[b].project_to_vocab(states[:, -1, -1]), logprobs, **LOGPROB)
    if HOOKED:
        real = tok.attention_mask.bool()
        torch.testing.assert_close(outputs["bridge"][1][real], outputs["hooked"][1][real], atol=1e-4, rtol=1e-4)


def test_generation_agrees_with_hugging_face(models):
    name, loaded, hf = models
    model = loaded[BACKENDS[0]]
    tok = tokenize_prompts(model, _prompts(name, model))
    eos = model.tokenizer.eos_token_id
    ref = hf.generate(tok.tokens, attention_mask=tok.attention_mask, max_new_tokens=8, do_sample=False,
                      pad_token_id=model.tokenizer.pad_token_id)[:, tok.tokens.shape[1]:]
    expected = [_cut(r, eos) for r in ref.tolist()]
    for b, m in loaded.items():
        for use_kv_cache in (True, False):
            out = m.greedy_generate(tok.tokens, tok.attention_mask, 8, use_kv_cache=use_kv_cache).tokens
            assert [_cut(o, eos) for o in out.tolist()] == expected, (b, use_kv_cache)


def test_bridge_decodes_without_the_cache_where_the_cache_is_wrong(models):
    """The bridge's fallback (a broken KV cache, as with transformers 5.24) is exact."""
    name, loaded, _ = models
    model = loaded["bridge"]
    tok = tokenize_prompts(model, _prompts(name, model))
    cached = model.greedy_generate(tok.tokens, tok.attention_mask, 6, use_kv_cache=False).tokens
    saved = model.capabilities
    model.__dict__["capabilities"] = dataclasses.replace(saved, exact_kv_cache=False)  # the check's answer
    try:
        fallback = model.greedy_generate(tok.tokens, tok.attention_mask, 6).tokens
    finally:
        model.__dict__["capabilities"] = saved
    assert torch.equal(fallback, cached)


def test_stopped_rows_get_the_tokens_they_had_so_far(models):
    """Rows that a ``stop`` ends leave the batch (the KV cache, or the recomputed sequence,
    drops them): every row's tokens are its full generation's, cut where it was decided."""
    name, loaded, _ = models
    for b, model in loaded.items():
        tok = tokenize_prompts(model, _prompts(name, model))
        walk = model.walk_prompt(tok.tokens, tok.attention_mask, 1)
        rows = torch.arange(len(tok.tokens)).repeat(2)  # twice, so that rows of both kinds decode together
        resid = walk.hidden(1)[rows]
        full = walk.resume(rows, resid, 1, Decoding(6)).tokens

        def stop(r, t):  # decided: arbitrary, but a function of the row and its tokens only
            return (t[:, -1] + r) % 2 == 0

        cut = walk.resume(rows, resid, 1, Decoding(6, stop=stop)).tokens
        for r, (c, f) in enumerate(zip(cut.tolist(), full.tolist())):
            eos = model.tokenizer.eos_token_id
            ended = next((i for i, x in enumerate(f) if (x + r) % 2 == 0 or x == eos), len(f) - 1)
            assert c == f[: ended + 1] + [model.pad_id] * (len(f) - ended - 1), (b, r)
        assert (cut == model.pad_id).sum() > (full == model.pad_id).sum()  # some row was cut


def _backpatch_tables(name: str, loaded: dict) -> dict[str, pd.DataFrame]:
    config = BackpatchConfig(positions=("t1", "t2"), kinds=("back", "forward", "random"),
                             source_layers=(1, 2), target_layers=(0, 1), include_embeddings=True, batch_rows=4)
    table = load_dataset("toy").iloc[:4] if name.startswith("toy") else queries_to_table(QUERIES)
    tables = {}
    for b, model in loaded.items():
        cases, _ = prepare_cases(model, table, config)
        fast = sweep(model, cases, config)
        naive = sweep_naive(model, cases, config)
        pd.testing.assert_frame_equal(fast.drop(columns="e3_logprob"), naive.drop(columns="e3_logprob"))
        torch.testing.assert_close(torch.tensor(fast.e3_logprob.values), torch.tensor(naive.e3_logprob.values),
                                   equal_nan=True, **LOGPROB)
        tables[b] = fast
    return tables


def test_backpatching_fast_engine_equals_naive_and_agrees_across_backends(models):
    name, loaded, _ = models
    tables = _backpatch_tables(name, loaded)
    assert len(tables[BACKENDS[0]]) > 0
    if HOOKED:
        a, b = tables["hooked"], tables["bridge"]
        pd.testing.assert_frame_equal(a.drop(columns="e3_logprob"), b.drop(columns="e3_logprob"))
        torch.testing.assert_close(torch.tensor(a.e3_logprob.values), torch.tensor(b.e3_logprob.values),
                                   equal_nan=True, **LOGPROB)


@both
@pytest.mark.parametrize("models", ["toy", "llama"], indirect=True)
def test_screened_and_stopped_sweeps_agree_across_backends(models):
    """The screen and early stop see each row by its place in the batch on both backends
    (the bridge resumes each join on its own, so its rows are renumbered per join)."""
    name, loaded, _ = models
    table = load_dataset("toy").iloc[:4] if name.startswith("toy") else queries_to_table(QUERIES)
    config = BackpatchConfig(source_layers=(1, 2), target_layers=(0, 1), include_embeddings=True, batch_rows=7)
    cases, _ = prepare_cases(loaded["hooked"], table, config)
    median = int(sweep(loaded["hooked"], cases, config).e3_rank.median())  # screens about half
    config = dataclasses.replace(config, screen=median, stop_when_decided=True)
    tables = {}
    for b, model in loaded.items():
        cases, _ = prepare_cases(model, table, config)
        tables[b] = sweep(model, cases, config)
    assert tables["hooked"].screened.any() and not tables["hooked"].screened.all()
    _assert_tables_agree(tables)


def _assert_tables_agree(tables: dict[str, pd.DataFrame]) -> None:
    a, b = tables["hooked"], tables["bridge"]
    floats = [c for c in a.columns if a[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
    for c in floats:
        torch.testing.assert_close(torch.tensor(a[c].values), torch.tensor(b[c].values), equal_nan=True,
                                   atol=1e-4, rtol=1e-4, msg=c)


@both
@pytest.mark.parametrize("models", ["toy", "llama"], indirect=True)
def test_logit_lens_knockout_and_patchscopes_agree_across_backends(models):
    name, loaded, _ = models
    table = load_dataset("toy").iloc[:4] if name == "toy" else queries_to_table(QUERIES)
    cases = {b: prepare_cases(m, table)[0] for b, m in loaded.items()}
    _assert_tables_agree({b: logit_lens(m, cases[b]) for b, m in loaded.items()})
    config = KnockoutConfig(window=1)
    _assert_tables_agree({b: attention_knockout(m, cases[b], config) for b, m in loaded.items()})
    if name == "toy":  # the default target prompt is the toy's vocabulary
        scope = PatchscopeConfig(layer_pairs=None, source_layers=(1, 2), target_layers=(0, 1), max_new_tokens=4)
        _assert_tables_agree({b: patchscope(m, cases[b], scope) for b, m in loaded.items()})


def test_knockout_is_refused_where_attention_edits_are_discarded(tiny_llama_dir, monkeypatch):
    """A bridge model whose attention-score edits change nothing (attention delegated to the
    HF module) must refuse knockout rather than measure nothing."""
    model = load_model(tiny_llama_dir, device="cpu", backend="bridge")
    mask = torch.zeros((1, 4, 4), dtype=torch.bool)
    assert model.capabilities.attention_edits and len(model.block_attention([0], mask)) == 1
    fresh = load_model(tiny_llama_dir, device="cpu", backend="bridge")
    monkeypatch.setattr(fresh.tl, "hooks", lambda **kwargs: contextlib.nullcontext())  # edits vanish
    assert not fresh.capabilities.attention_edits
    with pytest.raises(InputError, match="attention knockout is not possible") as caught:
        fresh.block_attention([0], mask)
    assert caught.value.code == "capability"
    assert hook_name(Site("attn_scores", 0)) == "blocks.0.attn.hook_attn_scores"


def test_backend_names_are_checked():
    assert backend.resolve_backend("auto") == ("hooked" if HOOKED else "bridge")
    assert backend.resolve_backend("bridge") == "bridge"
    with pytest.raises(ModelLoadError, match="unknown backend 'tl5'"):
        load_model("toy", device="cpu", backend="tl5")
    if not HOOKED:
        with pytest.raises(ModelLoadError, match="needs TransformerLens 3.x"):
            load_model("toy", device="cpu", backend="hooked")


def _cli_table(tmp_path: Path, name: str) -> pd.DataFrame:
    out = tmp_path / name
    assert main(["backpatch", "--model", "toy", "--limit", "40", "--backend", name, "--out", str(out),
                 "--source-layers", "1,7", "--target-layers", "0,4"]) == 0
    table = pd.read_parquet(out / "backpatch.parquet")
    return table.sort_values(list(table.columns[:6])).reset_index(drop=True).astype({"alias_match": bool})


def _stored() -> pd.DataFrame:
    """The hooked backend's table, stored from the main environment (regenerate: write
    ``_cli_table(tmp_path, "hooked")`` there)."""
    return pd.read_parquet(GOLDEN)


@pytest.mark.slow
def test_cli_backpatch_table_is_the_same_under_both_backends(tmp_path):
    """`latent-hops backpatch --model toy --limit 40` (2-cell grid): the same table under both
    backends (generations identical, log-probs within 1e-4); the TL 4 environment compares the
    bridge's with the hooked table stored from the main environment, by value."""
    tables = {b: _cli_table(tmp_path, b) for b in BACKENDS}
    if HOOKED:
        _assert_tables_agree({"hooked": tables["hooked"], "bridge": _stored()})  # the stored table is current
    else:
        tables["hooked"] = _stored()
    _assert_tables_agree(tables)
