"""Everything that depends on the TransformerLens version lives here, and only here.

latent_hops targets TransformerLens 3.x (``HookedTransformer``). TL 4 replaced it with
``TransformerBridge`` (and, measured with transformers 5.24, its KV-cached generation was
silently wrong and ``start_at_layer`` saved no compute), so a TL 4 backend must re-implement
the functions of this module, and nothing else: the analyses talk to the model only through
the TransformerLens surface (``cfg``, ``to_tokens``, ``run_with_hooks``, ``run_with_cache``,
``hooks()``, ``blocks``, ``ln_final``, ``unembed``) and the functions below.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer, HookedTransformerConfig, TransformerLensKeyValueCache
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "GPT2LMHeadModel")


def _rope_theta(hf_config: Any) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def tl_config_from_hf(hf_config: Any, dtype: torch.dtype, device: str) -> HookedTransformerConfig:
    """TransformerLens config for a Hugging Face config (Llama or GPT-2 architecture).

    Read from the config itself: TL 3.9's own local-path loader guesses the architecture
    from the directory name (a path containing "llama" never reads config.json).
    """
    arch = (hf_config.architectures or [""])[0]
    if arch == "LlamaForCausalLM":
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"Llama rope scaling {rope!r} is not supported yet (only the default RoPE)")
        kv = hf_config.num_key_value_heads
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        cfg = dict(
            d_model=hf_config.hidden_size, d_head=d_head, n_heads=hf_config.num_attention_heads,
            d_mlp=hf_config.intermediate_size, n_layers=hf_config.num_hidden_layers,
            n_ctx=hf_config.max_position_embeddings, eps=hf_config.rms_norm_eps,
            d_vocab=hf_config.vocab_size, act_fn=hf_config.hidden_act,
            n_key_value_heads=kv if kv != hf_config.num_attention_heads else None,
            normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
            rotary_dim=d_head, rotary_base=_rope_theta(hf_config), final_rms=True, gated_mlp=True,
        )
    elif arch == "GPT2LMHeadModel":
        cfg = dict(
            d_model=hf_config.n_embd, d_head=hf_config.n_embd // hf_config.n_head, n_heads=hf_config.n_head,
            d_mlp=hf_config.n_inner or 4 * hf_config.n_embd, n_layers=hf_config.n_layer,
            n_ctx=hf_config.n_positions, eps=hf_config.layer_norm_epsilon, d_vocab=hf_config.vocab_size,
            act_fn=hf_config.activation_function, use_attn_scale=hf_config.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=hf_config.scale_attn_by_inverse_layer_idx,
            normalization_type="LN",
        )
    else:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return HookedTransformerConfig(
        **cfg, original_architecture=arch, dtype=dtype, device=device, init_weights=False,
        model_name=getattr(hf_config, "_name_or_path", "") or arch,
    )


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the Hugging Face tokenizer itself starts its encodings with the BOS token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def hooked_from_hf(hf_model: Any, tokenizer: Any, dtype: torch.dtype, device: str) -> HookedTransformer:
    """Convert a loaded HF causal LM with TransformerLens' own weight converters.

    No weight processing (no LayerNorm folding or centering): hidden states are the HF
    model's own, as in the paper's code, and logits match the HF model. BOS follows the
    tokenizer's own convention (TL prepends one by default, which for SmolLM2 drops
    first-hop accuracy from 45% to 4%): tokens equal what the HF tokenizer gives.
    """
    cfg = tl_config_from_hf(hf_model.config, dtype, device)
    cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
    convert = convert_llama_weights if cfg.original_architecture == "LlamaForCausalLM" else convert_gpt2_weights
    state_dict = convert(hf_model, cfg)
    with warnings.catch_warnings():
        # TL 3.9 warns at construction that HookedTransformer is deprecated in favour of
        # TL 4's TransformerBridge; we pin TL 3 on purpose (see this module's docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return model.to(device, print_details=False).eval()


def hooked_from_pretrained(name: str, dtype: torch.dtype, device: str) -> HookedTransformer:
    """A TransformerLens model by its official name, downloaded from the Hugging Face hub."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see hooked_from_hf
        return HookedTransformer.from_pretrained_no_processing(name, dtype=dtype, device=device).eval()


def official_model_names() -> list[str]:
    """Names (and aliases) that ``HookedTransformer.from_pretrained`` accepts."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    return sorted(make_model_alias_map())


# ---------------------------------------------------------------------------- generation

HookList = list[tuple[str, Callable]]


@dataclass
class GreedyOutput:
    """Greedy continuation of a batch: new token ids (``pad_id`` after EOS) and first-step logits."""

    tokens: Int[torch.Tensor, "batch new"]
    first_logits: Float[torch.Tensor, "batch vocab"]


class Sampler:
    """Seeded sampling at a temperature, to use instead of greedy decoding."""

    def __init__(self, seed: int, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.seed, self.temperature = seed, temperature
        self.generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        probs = (logits.float() / self.temperature).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _pad_id(model: HookedTransformer) -> int:
    """What fills generated positions after EOS (the pad token, else EOS)."""
    pad = model.tokenizer.pad_token_id
    return model.tokenizer.eos_token_id if pad is None else pad


def _greedy_loop(model: HookedTransformer, logits: torch.Tensor, step: Callable, max_new_tokens: int,
                 choose: Callable = _argmax) -> GreedyOutput:
    """Decoding from the prompt pass's last logits (greedy unless ``choose`` samples);
    ``step(next_ids)`` gives the next logits."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = model.tokenizer.eos_token_id, _pad_id(model)
    batch, device = logits.shape[0], logits.device
    first_logits = logits.float()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        nxt = choose(logits)
        out[:, i] = torch.where(finished, pad, nxt)
        finished |= nxt == eos
        if i + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = step(nxt)
    return GreedyOutput(out, first_logits)


def _cached_step(model: HookedTransformer, cache: TransformerLensKeyValueCache) -> Callable:
    def step(nxt: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((nxt.shape[0], 1), dtype=torch.long, device=nxt.device)
        return model(nxt[:, None], attention_mask=ones, past_kv_cache=cache)[:, -1]

    return step


@torch.no_grad()
def greedy_generate(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    max_new_tokens: int = 10,
    prompt_hooks: HookList = (),
    use_kv_cache: bool = True,
) -> GreedyOutput:
    """Greedy decoding of left-padded prompts, stopping each row at EOS.

    ``prompt_hooks`` are active on the prompt pass only: with the KV cache they run once
    on the prompt; without it (the exact reference loop) they run on every full forward,
    and must touch prompt positions only, which left padding keeps fixed.
    """
    hooks = list(prompt_hooks)
    if use_kv_cache:
        cache = new_kv_cache(model, tokens.shape[0])
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens, attention_mask=attention_mask, past_kv_cache=cache)[:, -1]
        return _greedy_loop(model, logits, _cached_step(model, cache), max_new_tokens)
    seq = [tokens, attention_mask]

    def step(nxt: torch.Tensor) -> torch.Tensor:
        seq[0] = torch.cat([seq[0], nxt[:, None]], 1)
        seq[1] = torch.cat([seq[1], torch.ones_like(nxt[:, None])], 1)
        with model.hooks(fwd_hooks=hooks):
            return model(seq[0], attention_mask=seq[1])[:, -1]

    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=attention_mask)[:, -1]
    return _greedy_loop(model, logits, step, max_new_tokens)


# ---------------------------------------------------------------------------- resuming from a layer


def new_kv_cache(model: HookedTransformer, batch: int) -> TransformerLensKeyValueCache:
    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


@torch.no_grad()
def embed(model: HookedTransformer, tokens: Int[torch.Tensor, "batch pos"],
          attention_mask: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
    """The residual stream entering block 0 (``blocks.0.hook_resid_pre``)."""
    return model(tokens, attention_mask=attention_mask, stop_at_layer=0)


@torch.no_grad()
def run_block(model: HookedTransformer, resid: torch.Tensor, layer: int, attention_mask: torch.Tensor,
              cache: TransformerLensKeyValueCache) -> Float[torch.Tensor, "batch pos d_model"]:
    """Block ``layer`` on a prompt's residual stream, appending its keys/values to ``cache``."""
    return model(resid, start_at_layer=layer, stop_at_layer=layer + 1, attention_mask=attention_mask,
                 past_kv_cache=cache)


def select_cache(cache: TransformerLensKeyValueCache, rows: torch.Tensor, n_layers: int,
                 attention_mask: torch.Tensor) -> TransformerLensKeyValueCache:
    """A cache for ``rows`` of a prompt batch holding the first ``n_layers`` layers' keys and
    values (shared with a clean run), the later layers empty, ready to resume from there."""
    entries = []
    for i, entry in enumerate(cache.entries):
        keys, values = (entry.past_keys, entry.past_values) if i < n_layers else (
            entry.past_keys[:, :0], entry.past_values[:, :0])
        entries.append(type(entry)(past_keys=keys[rows], past_values=values[rows]))
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=attention_mask)


@torch.no_grad()
def greedy_from_layer(
    model: HookedTransformer,
    resid: Float[torch.Tensor, "batch pos d_model"],
    start_layer: int,
    attention_mask: Int[torch.Tensor, "batch pos"],
    cache: TransformerLensKeyValueCache,
    max_new_tokens: int = 10,
    sampler: Sampler | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GreedyOutput:
    """Finish a prompt pass from block ``start_layer`` on (``resid`` enters it), then decode
    greedily with the KV cache. ``cache`` must hold the layers below ``start_layer``
    (``select_cache``); layers below are not recomputed. ``sampler`` samples instead.

    ``keep(first_logits) -> bool[batch]`` screens rows after the prompt pass: only kept rows
    are decoded (the others get padding only), the rest of the batch costs nothing more."""
    logits = model(resid, start_at_layer=start_layer, attention_mask=attention_mask, past_kv_cache=cache)[:, -1]
    cache.previous_attention_mask = attention_mask  # start_at_layer skips TL's own bookkeeping
    choose = sampler or _argmax
    if keep is None:
        return _greedy_loop(model, logits, _cached_step(model, cache), max_new_tokens, choose)
    rows = keep(logits).nonzero()[:, 0]
    out = GreedyOutput(torch.full((logits.shape[0], max_new_tokens), _pad_id(model), dtype=torch.long, device=logits.device),
                       logits.float())
    if len(rows):
        sub = select_cache(cache, rows, len(cache.entries), attention_mask[rows])
        out.tokens[rows] = _greedy_loop(model, logits[rows], _cached_step(model, sub), max_new_tokens, choose).tokens
    return out
