"""TransformerLens configs and weight converters for Hugging Face architectures, read from
the checkpoint's own ``config.json``.

TL 3.9's ``from_pretrained`` knows these families, but it cannot take a local directory:
for Llama and Gemma it guesses the configuration from the *name* (a path containing
"llama" never reads ``config.json``; Gemma sizes are hard-coded), and it caps or ignores
some fields. Here each family maps its HF config to a ``HookedTransformerConfig`` field by
field, and TL's own converter maps the weights. What TL 3.9 cannot express is refused with
a clear ``UnsupportedArchitecture`` error rather than loaded as a silently different model;
``tests/test_architectures.py`` checks logits and generation against HF for each family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from latent_hops.errors import InputError

# TL allocates an n_ctx x n_ctx causal mask per layer; long-context models (Llama-3.1:
# 131,072) would need gigabytes for it. Prompts here are short; load_model(n_ctx=...) raises it.
DEFAULT_MAX_CONTEXT = 4096


class UnsupportedArchitecture(InputError):
    """A checkpoint whose architecture (or one of its options) TransformerLens cannot express."""

    code = "model"


@dataclass(frozen=True)
class Family:
    """How one HF architecture becomes a TL model: config translation and weight converter."""

    config: Callable[[Any], dict[str, Any]]
    converter: str  # the name of TL's weight converter (imported when a model is loaded)

    def convert(self, hf_model: Any, cfg: Any) -> dict:
        from transformer_lens.pretrained import weight_conversions

        return getattr(weight_conversions, self.converter)(hf_model, cfg)


def _get(hf: Any, name: str, default: Any = None) -> Any:
    # transformers >= 5.15 raises (not AttributeError) for some per-layer fields
    try:
        value = getattr(hf, name, default)
    except Exception:  # noqa: BLE001
        return default
    return default if value is None else value


def _rope(hf: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE parameters (transformers 5: ``rope_parameters``, possibly per layer type;
    transformers 4: ``rope_theta`` + ``rope_scaling``)."""
    params = dict(_get(hf, "rope_parameters", {}) or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])
    scaling = _get(hf, "rope_scaling", {}) or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", _get(hf, "rope_theta", 10000.0))
    merged["rope_type"] = merged.get("rope_type", merged.get("type", "default")) or "default"
    return merged


def _rope_fields(hf: Any, arch: str, allowed: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    rope = _rope(hf)
    kind = rope["rope_type"]
    if kind not in allowed:
        raise UnsupportedArchitecture(
            f"{arch}: RoPE type {kind!r} is not supported by TransformerLens 3.9 here "
            f"(supported: {', '.join(allowed)})"
        )
    fields: dict[str, Any] = {"rotary_base": float(rope["rope_theta"])}
    if kind == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=rope.get(
                "original_max_position_embeddings", hf.max_position_embeddings
            ),
            NTK_by_parts_low_freq_factor=rope.get("low_freq_factor", 1.0),
            NTK_by_parts_high_freq_factor=rope.get("high_freq_factor", 4.0),
            NTK_by_parts_factor=rope.get("factor", 1.0),
        )
    return fields


def _refuse_biases(hf: Any, arch: str) -> None:
    for flag in ("attention_bias", "mlp_bias"):
        if _get(hf, flag, False):
            raise UnsupportedArchitecture(
                f"{arch}: {flag}=True is not supported (TL's converter drops the biases)"
            )


def _head_dim(hf: Any) -> int:
    return int(_get(hf, "head_dim", 0) or hf.hidden_size // hf.num_attention_heads)


def _kv_heads(hf: Any) -> int | None:
    kv = _get(hf, "num_key_value_heads", hf.num_attention_heads)
    return None if kv == hf.num_attention_heads else kv


def _sliding(hf: Any, arch: str) -> dict[str, Any]:
    """Per-layer local (sliding-window) vs global attention, from ``layer_types``."""
    window = _get(hf, "sliding_window", None)
    types = list(_get(hf, "layer_types", []) or [])
    if not types:
        types = ["sliding_attention" if window else "full_attention"] * hf.num_hidden_layers
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedArchitecture(f"{arch}: layer types {sorted(unknown)} are not supported")
    if "sliding_attention" not in types or not window:
        return {}
    return dict(
        use_local_attn=True,
        window_size=int(window),
        attn_types=["local" if t == "sliding_attention" else "global" for t in types],
    )


def _llama_like(hf: Any, arch: str, rope: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    """Pre-norm RMSNorm, rotary, gated MLP: Llama and its descendants."""
    d_head = _head_dim(hf)
    return dict(
        d_model=hf.hidden_size,
        d_head=d_head,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        n_layers=hf.num_hidden_layers,
        n_ctx=hf.max_position_embeddings,
        eps=_get(hf, "rms_norm_eps", 1e-6),
        d_vocab=hf.vocab_size,
        act_fn=_get(hf, "hidden_activation", None) or _get(hf, "hidden_act"),
        n_key_value_heads=_kv_heads(hf),
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        final_rms=True,
        gated_mlp=True,
        **_rope_fields(hf, arch, rope),
    )


def _llama(hf: Any) -> dict[str, Any]:
    _refuse_biases(hf, "LlamaForCausalLM")
    return _llama_like(hf, "LlamaForCausalLM", rope=("default", "llama3"))


def _mistral(hf: Any) -> dict[str, Any]:
    _refuse_biases(hf, "MistralForCausalLM")
    return {**_llama_like(hf, "MistralForCausalLM"), **_sliding(hf, "MistralForCausalLM")}


def _qwen2(hf: Any) -> dict[str, Any]:
    if _get(hf, "use_sliding_window", False):
        raise UnsupportedArchitecture("Qwen2ForCausalLM: use_sliding_window=True is not supported")
    return _llama_like(hf, "Qwen2ForCausalLM")  # QKV biases: TL's qwen2 converter copies them


def _qwen3(hf: Any) -> dict[str, Any]:
    _refuse_biases(hf, "Qwen3ForCausalLM")
    if _get(hf, "use_sliding_window", False):
        raise UnsupportedArchitecture("Qwen3ForCausalLM: use_sliding_window=True is not supported")
    return {**_llama_like(hf, "Qwen3ForCausalLM"), "use_qk_norm": True}


def _phi3(hf: Any) -> dict[str, Any]:
    if _get(hf, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitecture(
            "Phi3ForCausalLM: partial_rotary_factor != 1 is not supported"
        )
    return {**_llama_like(hf, "Phi3ForCausalLM"), **_sliding(hf, "Phi3ForCausalLM")}


def _gemma(hf: Any, arch: str = "GemmaForCausalLM") -> dict[str, Any]:
    """Gemma 1: Llama-like with (1 + w) RMSNorm and sqrt(d_model)-scaled embeddings, both
    handled by TL's converter; GeGLU with the tanh approximation."""
    _refuse_biases(hf, arch)
    fields = _llama_like(hf, arch)
    scalar = _get(hf, "query_pre_attn_scalar", None)
    if scalar is not None:
        fields.update(use_attn_scale=True, attn_scale=math.sqrt(scalar))
    return fields


def _gemma2(hf: Any, arch: str = "Gemma2ForCausalLM") -> dict[str, Any]:
    """Gemma 2: Gemma + norms after attention and MLP, soft-capping, alternating sliding window."""
    fields = _gemma(hf, arch)
    fields.update(
        use_normalization_before_and_after=True,
        **_sliding(hf, arch),
        attn_scores_soft_cap=_get(hf, "attn_logit_softcapping", -1.0),
        output_logits_soft_cap=_get(hf, "final_logit_softcapping", -1.0),
    )
    return fields


def _gemma3(hf: Any) -> dict[str, Any]:
    """Gemma 3: Gemma 2 + qk-norm + its own RoPE base on the sliding-window layers."""
    fields = _gemma2(hf, "Gemma3ForCausalLM")
    fields["use_qk_norm"] = True
    local = _rope(hf, "sliding_attention")
    if local["rope_type"] != "default":
        raise UnsupportedArchitecture(
            f"Gemma3ForCausalLM: local RoPE type {local['rope_type']!r} is not supported"
        )
    theta_local = _get(hf, "rope_local_base_freq", None) or local["rope_theta"]
    fields["rotary_base_local"] = float(theta_local)
    return fields


def _neox(hf: Any) -> dict[str, Any]:
    d_head = hf.hidden_size // hf.num_attention_heads
    pct = _get(hf, "rotary_pct", None) or _rope(hf).get("partial_rotary_factor", 1.0)
    return dict(
        d_model=hf.hidden_size,
        d_head=d_head,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        n_layers=hf.num_hidden_layers,
        n_ctx=hf.max_position_embeddings,
        eps=hf.layer_norm_eps,
        d_vocab=hf.vocab_size,
        act_fn=hf.hidden_act,
        use_attn_scale=True,
        parallel_attn_mlp=_get(hf, "use_parallel_residual", True),
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=round(pct * d_head),
        normalization_type="LN",
        **_rope_fields(hf, "GPTNeoXForCausalLM"),
    )


def _olmo(hf: Any) -> dict[str, Any]:
    """OLMo 1: non-parametric LayerNorm (eps 1e-5, TL's converter sets unit weights), clip_qkv."""
    _refuse_biases(hf, "OlmoForCausalLM")
    fields = _llama_like(hf, "OlmoForCausalLM")
    fields.update(
        normalization_type="LN", eps=1e-5, final_rms=False, clip_qkv=_get(hf, "clip_qkv", None)
    )
    return fields


def _olmo2(hf: Any) -> dict[str, Any]:
    """OLMo 2: post-norm RMSNorm and qk-norm over the whole projection (TL keys both on the
    architecture name)."""
    _refuse_biases(hf, "Olmo2ForCausalLM")
    if _kv_heads(hf) is not None:
        raise UnsupportedArchitecture(
            "Olmo2ForCausalLM: grouped-query attention (num_key_value_heads != "
            "num_attention_heads) is not supported by TL 3.9's OLMo-2 converter"
        )
    return _llama_like(hf, "Olmo2ForCausalLM")


def _gpt2(hf: Any) -> dict[str, Any]:
    return dict(
        d_model=hf.n_embd,
        d_head=hf.n_embd // hf.n_head,
        n_heads=hf.n_head,
        d_mlp=hf.n_inner or 4 * hf.n_embd,
        n_layers=hf.n_layer,
        n_ctx=hf.n_positions,
        eps=hf.layer_norm_epsilon,
        d_vocab=hf.vocab_size,
        act_fn=hf.activation_function,
        use_attn_scale=hf.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=hf.scale_attn_by_inverse_layer_idx,
        normalization_type="LN",
    )


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(_llama, "convert_llama_weights"),
    "MistralForCausalLM": Family(_mistral, "convert_mistral_weights"),
    "Qwen2ForCausalLM": Family(_qwen2, "convert_qwen2_weights"),
    "Qwen3ForCausalLM": Family(_qwen3, "convert_qwen3_weights"),
    "GemmaForCausalLM": Family(_gemma, "convert_gemma_weights"),
    "Gemma2ForCausalLM": Family(_gemma2, "convert_gemma_weights"),
    "Gemma3ForCausalLM": Family(_gemma3, "convert_gemma_weights"),
    "GPTNeoXForCausalLM": Family(_neox, "convert_neox_weights"),
    "OlmoForCausalLM": Family(_olmo, "convert_olmo_weights"),
    "Olmo2ForCausalLM": Family(_olmo2, "convert_olmo2_weights"),
    "Phi3ForCausalLM": Family(_phi3, "convert_phi3_weights"),
    "GPT2LMHeadModel": Family(_gpt2, "convert_gpt2_weights"),
}


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[arch]


def tl_config_fields(
    hf_config: Any, max_context: int | None = DEFAULT_MAX_CONTEXT
) -> dict[str, Any]:
    """HookedTransformerConfig fields for an HF config (without dtype/device)."""
    arch = (_get(hf_config, "architectures", None) or [""])[0]
    fields = family(arch).config(hf_config)
    if max_context is not None:
        fields["n_ctx"] = min(fields["n_ctx"], max_context)
    return {**fields, "original_architecture": arch}
