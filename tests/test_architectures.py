"""Every architecture family loads from a local checkpoint directory and is the HF model:
a tiny random model per family, with the family's distinctive options on (GQA/MQA, tied
embeddings, QKV bias, qk-norm, sliding windows shorter than the prompts, soft-capping,
parallel attention, llama3 RoPE scaling, partial rotary, clip_qkv), saved, loaded through
``load_model``; logits equal HF's on a left-padded batch, greedy generation equals HF
``generate``, and the back-patching fast engine equals the naive reference."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import bpe_tokenizer
from test_positions import QUERIES
from transformers import AutoConfig, AutoModelForCausalLM

from latent_hops import backend, load_model
from latent_hops.analyses.backpatch import (
    BackpatchConfig,
    all_cells,
    prepare_cases,
    sweep,
    sweep_naive,
)
from latent_hops.models import ModelLoadError
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import queries_to_table

WINDOW = 5  # sliding windows shorter than every prompt below, so the window matters
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
# model_type -> (architecture, the family's distinctive options, what the TL config must show)
FAMILIES = {
    "llama": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
              dict(use_NTK_by_parts_rope=True, n_key_value_heads=2)),
    "mistral": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=WINDOW),
                dict(use_local_attn=True, window_size=WINDOW)),
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True), dict(n_key_value_heads=2)),
    "qwen3": ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32), dict(use_qk_norm=True, d_head=32)),
    "gemma": ("GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=32), dict(n_key_value_heads=1)),
    "gemma2": ("Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                         query_pre_attn_scalar=24),
               dict(use_local_attn=True, attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0)),
    "gemma3_text": ("Gemma3ForCausalLM", dict(num_key_value_heads=1, head_dim=32, sliding_window=WINDOW,
                                              query_pre_attn_scalar=24, rope_parameters=GEMMA3_ROPE,
                                              layer_types=["sliding_attention", "sliding_attention",
                                                           "full_attention", "sliding_attention"]),
                    dict(use_qk_norm=True, rotary_base_local=1e4, attn_types=["local", "local", "global", "local"])),
    "gpt_neox": ("GPTNeoXForCausalLM", dict(rotary_pct=0.25, use_parallel_residual=True),
                 dict(parallel_attn_mlp=True, rotary_dim=4)),
    "olmo": ("OlmoForCausalLM", dict(clip_qkv=0.5), dict(clip_qkv=0.5)),
    "olmo2": ("Olmo2ForCausalLM", dict(), dict(normalization_type="RMS")),
    "phi3": ("Phi3ForCausalLM", dict(num_key_value_heads=2), dict(n_key_value_heads=2)),
    "gpt2": ("GPT2LMHeadModel", dict(n_embd=64, n_layer=4, n_head=4, n_positions=128), dict(normalization_type="LN")),
}
PROMPTS = ["the spouse of the performer of Imagine is", "the capital of the country of Paris is Paris and Yoko Ono",
           "the mayor of Saint-Étienne is"]


def save_family(model_type: str, path, **overrides):
    """A tiny random checkpoint of one family (4 layers, d_model 64) with a trained tokenizer."""
    tok = bpe_tokenizer("gpt2")
    arch, options, _ = FAMILIES[model_type]
    sizes = {} if model_type == "gpt2" else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                 num_attention_heads=4, max_position_embeddings=128)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), initializer_range=0.2, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               **{**sizes, **options, **overrides})
    cfg.architectures = [arch]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


HOOKED = backend.hooked_available()
BACKENDS = ["hooked", "bridge"] if HOOKED else ["bridge"]


@pytest.fixture(scope="module", params=[(f, b) for f in FAMILIES for b in BACKENDS], ids="-".join)
def family(request, tmp_path_factory):
    """Every family on every backend available (the bridge wraps the HF model in place, so
    the HF reference is its own instance)."""
    name, backend_name = request.param
    path = save_family(name, tmp_path_factory.mktemp(name))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    return name, hf, load_model(path, device="cpu", backend=backend_name)


def test_config_is_read_from_config_json(family):
    name, hf, model = family
    if model.name == "bridge":
        pytest.skip("the hooked backend's own config (the bridge reads HF's)")
    assert model.architecture == FAMILIES[name][0]
    for field, value in FAMILIES[name][2].items():
        assert getattr(model.tl.cfg, field) == value, field


def test_logits_equal_hugging_face_on_a_left_padded_batch(family):
    name, hf, model = family
    batch = tokenize_prompts(model, PROMPTS)
    assert batch.attention_mask.sum(1).min() > WINDOW and (batch.attention_mask == 0).any()
    # positions count real tokens only, as HF generate does (GPT-2's absolute positions need it)
    position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(batch.tokens, attention_mask=batch.attention_mask, position_ids=position_ids).logits
        ours = model.tl(batch.tokens, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    assert (ref - ours)[real].abs().max() <= 1e-4


def test_greedy_generation_equals_hugging_face(family):
    name, hf, model = family
    batch = tokenize_prompts(model, PROMPTS)
    ref = hf.generate(batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=8, do_sample=False,
                      pad_token_id=model.tokenizer.pad_token_id)[:, batch.tokens.shape[1]:]
    ours = model.greedy_generate(batch.tokens, batch.attention_mask, 8).tokens
    eos = model.tokenizer.eos_token_id
    for r, o in zip(ref.tolist(), ours.tolist()):
        cut = lambda ids: ids[: ids.index(eos) + 1] if eos in ids else ids  # noqa: E731
        assert cut(o) == cut(r)


def test_fast_backpatch_engine_equals_naive(family):
    name, hf, model = family
    config = BackpatchConfig(source_layers=(1, 3), target_layers=(0, 2), include_embeddings=False, batch_rows=5)
    cases, skipped = prepare_cases(model, queries_to_table(QUERIES), config)
    assert skipped.empty
    naive, fast = sweep_naive(model, cases, config), sweep(model, cases, config)
    assert len(fast) == len(cases) * 2 * len(all_cells(model, config)) > 0
    pd.testing.assert_frame_equal(naive.drop(columns="e3_logprob"), fast.drop(columns="e3_logprob"))
    torch.testing.assert_close(torch.tensor(naive.e3_logprob.values), torch.tensor(fast.e3_logprob.values),
                               atol=1e-4, rtol=0, equal_nan=True)


@pytest.mark.parametrize("model_type, options, message", [
    ("olmo2", dict(num_key_value_heads=2), "grouped-query attention"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW), "use_sliding_window"),
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "RoPE type 'yarn'"),
])
@pytest.mark.skipif(not HOOKED, reason="the hooked backend needs TransformerLens 3.x")
def test_what_transformer_lens_cannot_express_is_refused(tmp_path, model_type, options, message):
    path = save_family(model_type, tmp_path / model_type, **options)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path, device="cpu", backend="hooked")


@pytest.mark.skipif(not HOOKED, reason="the hooked backend's n_ctx (the bridge leaves context to HF)")
def test_long_contexts_are_capped_and_can_be_raised(tmp_path):
    path = save_family("llama", tmp_path / "long", max_position_embeddings=131072)
    assert load_model(path, device="cpu").context_length == 4096
    assert load_model(path, device="cpu", max_context=8192).context_length == 8192
