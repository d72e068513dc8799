"""The ``bridge`` backend: TransformerLens' ``TransformerBridge`` (TL 4; also in TL 3.9).

The bridge wraps the Hugging Face model itself: its logits are HF's, and the old hook names
(``blocks.L.hook_resid_post``, ``attn.hook_attn_scores``, ...) are aliases of its hook points,
so reading and editing sites is shared with the hooked backend. What differs is here:

- **Resuming from a layer.** ``start_at_layer`` on the bridge still runs blocks 0..k-1 (TL
  4.3), so the engine cannot skip them. Each patched row instead runs the prompt again with
  the hidden state of layer k-1 replaced by the patched one (``greedy_from_layer``): exact,
  but the layers below a patch are recomputed. The clean hidden states are read in one pass.
- **KV cache.** Decoding uses HF's own ``DynamicCache`` through the bridge's
  ``past_key_values``. With transformers 5.24 the bridge's attention ignores it (the
  argument was renamed) and cached decoding is silently wrong, so every model is checked once
  (``kv_cache_works``): cached decoding must equal recomputation, else it decodes without a
  cache (exact, slower) and says so.
- **Attention knockout.** Where the bridge delegates attention to the HF module, an edit of
  ``hook_attn_scores`` is discarded; ``check_attention_edits`` refuses such models.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from latent_hops.backend.decoding import (
    GreedyOutput,
    Sampler,
    argmax,
    greedy_loop,
    probe_tokens,
    recompute_step,
    screened,
    tokenizer_adds_bos,
)
from latent_hops.errors import InputError

# TransformerLens is imported where a model is built; the bridge's class differs between TL
# 3.9 and 4.x, so annotations name it without importing it
TransformerBridge = Any


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerBridge (checked by class name: no import needed)."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def _boot(name: str, **kwargs: Any) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL 3.9 calls the bridge experimental at every boot
        return TransformerBridge.boot_transformers(name, **kwargs)


def bridge_from_hf(
    hf_model: Any, tokenizer: Any, dtype: torch.dtype, device: str, n_devices: int = 1
) -> TransformerBridge:
    """Wrap a loaded HF causal LM in a TransformerBridge (offline: the config is the model's).

    The HF model is wrapped in place: its own ``generate`` then runs through the bridge. BOS
    follows the tokenizer's own convention, as in the hooked backend."""
    if n_devices > 1:
        raise InputError(
            "n_devices > 1 is not supported by the bridge backend here; use --backend hooked"
        )
    name = getattr(hf_model.config, "_name_or_path", "") or hf_model.config.architectures[0]
    model = _boot(name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
    model.cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
    return model.eval()


def bridge_from_pretrained(
    name: str, dtype: torch.dtype, device: str, n_devices: int = 1
) -> TransformerBridge:
    """A model by its Hugging Face hub name, downloaded by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return bridge_from_hf(hf_model, tokenizer, dtype, device, n_devices)


def random_model(
    hf_config: Any, tokenizer: Any, dtype: torch.dtype, device: str, seed: int = 0
) -> TransformerBridge:
    """A randomly initialised HF model of ``hf_config``'s shape, wrapped (for benchmarks)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return bridge_from_hf(hf_model, tokenizer, dtype, device)


def _hf_config(model: TransformerBridge) -> Any:
    return model.original_model.config


def architecture(model: TransformerBridge) -> str:
    return (getattr(_hf_config(model), "architectures", None) or [""])[0]


def supported_architectures() -> tuple[str, ...]:
    """The causal LMs this TransformerLens' bridge has an adapter for."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    causal = ("ForCausalLM", "LMHeadModel")
    return tuple(sorted(a for a in SUPPORTED_ARCHITECTURES if a.endswith(causal)))


# ---------------------------------------------------------------------------- logits


def last_logits(
    model: TransformerBridge, input: torch.Tensor, **kwargs: Any
) -> Float[torch.Tensor, "batch vocab"]:
    """The model's logits at the last position only (HF's ``logits_to_keep=1``)."""
    return model(input, logits_to_keep=1, **kwargs)[:, -1]


@torch.no_grad()
def project_to_vocab(
    model: TransformerBridge, acts: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... vocab"]:
    """Log-probabilities of ``acts`` through the final norm and the unembedding (in float32),
    with the final logit soft-cap of Gemma 2/3, as the HF forward pass does."""
    shape = acts.shape[:-1]
    flat = acts.reshape(-1, 1, acts.shape[-1]).to(model.cfg.dtype)
    logits = model.ln_final(flat).float() @ model.W_U.float() + model.b_U.float()
    cap = getattr(_hf_config(model), "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits[:, 0].log_softmax(-1).reshape(*shape, -1)


# ---------------------------------------------------------------------------- generation


def _new_cache(model: TransformerBridge) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=_hf_config(model))


def _cached_prompt(
    model: TransformerBridge, tokens: torch.Tensor, attention_mask: torch.Tensor, hooks: list
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The prompt pass (``hooks`` active) with HF's KV cache, and the cached decoding step."""
    with model.hooks(fwd_hooks=hooks):
        logits, cache = model(
            tokens,
            attention_mask=attention_mask,
            past_key_values=_new_cache(model),
            return_type="logits_and_cache",
            logits_to_keep=1,
        )
    state = [attention_mask, cache]

    def step(nxt: torch.Tensor) -> torch.Tensor:
        state[0] = torch.cat([state[0], torch.ones_like(nxt[:, None])], 1)
        out, state[1] = model(
            nxt[:, None],
            attention_mask=state[0],
            past_key_values=state[1],
            return_type="logits_and_cache",
            logits_to_keep=1,
        )
        return out[:, -1]

    return logits[:, -1], step


@torch.no_grad()
def kv_cache_works(model: TransformerBridge) -> bool:
    """Whether cached decoding equals recomputation on this model (checked once, on three
    tokens): with transformers 5.24 and TL <= 4.3 it does not (see the module docstring)."""
    known = model.__dict__.get("latent_hops_kv_cache_works")
    if known is None:
        tokens = probe_tokens(model.cfg.d_vocab, model.cfg.device)
        mask = torch.ones_like(tokens)
        _, step = _cached_prompt(model, tokens[:, :2], mask[:, :2], [])
        cached = step(tokens[:, 2])
        full = last_logits(model, tokens, attention_mask=mask)
        known = bool(torch.allclose(cached.float(), full.float(), atol=1e-3, rtol=1e-3))
        if not known:
            warnings.warn(
                "TransformerBridge's KV-cached decoding is wrong with this transformers "
                "version (known: transformers 5.24 with TransformerLens <= 4.3); latent_hops "
                "decodes without a cache on this model (exact, slower). transformers 5.9-5.23 "
                "avoids it.",
                RuntimeWarning,
                stacklevel=2,
            )
        model.__dict__["latent_hops_kv_cache_works"] = known
    return known


def _decode(
    model: TransformerBridge,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    hooks: list,
    max_new_tokens: int,
    choose: Callable = argmax,
    use_kv_cache: bool = True,
) -> GreedyOutput:
    """Prompt pass with ``hooks``, then decoding: cached when the cache works, else by
    recomputation with ``hooks`` kept on (they touch prompt positions only)."""
    if use_kv_cache and kv_cache_works(model):
        logits, step = _cached_prompt(model, tokens, attention_mask, hooks)
    else:
        with model.hooks(fwd_hooks=hooks):
            logits = last_logits(model, tokens, attention_mask=attention_mask)
        step = recompute_step(model, tokens, attention_mask, hooks, last_logits)
    return greedy_loop(model, logits, step, max_new_tokens, choose)


@torch.no_grad()
def greedy_generate(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    max_new_tokens: int = 10,
    prompt_hooks: Sequence[tuple[str, Callable]] = (),
    use_kv_cache: bool = True,
) -> GreedyOutput:
    """Greedy decoding of left-padded prompts, ``prompt_hooks`` on the prompt pass."""
    return _decode(
        model, tokens, attention_mask, list(prompt_hooks), max_new_tokens, argmax, use_kv_cache
    )


# ---------------------------------------------------------------------------- resuming from a layer


@dataclass
class PromptState:
    """A clean prompt pass: its tokens and the hidden states of layers -1..last_layer."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    hidden: dict[int, torch.Tensor]


@dataclass
class Prefix:
    """What a resumed row needs on the bridge: the prompt itself (its lower layers are rerun)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor


@torch.no_grad()
def start_prompt(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    last_layer: int,
) -> PromptState:
    """One clean pass, keeping the hidden states of layers -1..``last_layer``."""
    from latent_hops.backend import hidden_state_hook

    hidden: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable:
        return lambda act, hook: hidden.__setitem__(layer, act.clone())

    hooks = [(hidden_state_hook(layer), keep(layer)) for layer in range(-1, last_layer + 1)]
    model.run_with_hooks(
        tokens,
        attention_mask=attention_mask,
        fwd_hooks=hooks,
        stop_at_layer=last_layer + 1 if last_layer + 1 < model.cfg.n_layers else None,
    )
    return PromptState(tokens, attention_mask, hidden)


def advance(
    model: TransformerBridge, state: PromptState, layer: int
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The clean hidden state of ``layer`` (read by ``start_prompt``)."""
    return state.hidden[layer]


def select_prefix(
    model: TransformerBridge,
    state: PromptState,
    rows: torch.Tensor,
    n_layers: int,
    attention_mask: torch.Tensor,
) -> Prefix:
    """The prompt of ``rows``, to rerun up to the resumed layer."""
    return Prefix(state.tokens[rows.to(state.tokens.device)], attention_mask)


@torch.no_grad()
def greedy_from_layer(
    model: TransformerBridge,
    resid: Float[torch.Tensor, "batch pos d_model"],
    start_layer: int,
    attention_mask: Int[torch.Tensor, "batch pos"],
    prefix: Prefix,
    max_new_tokens: int = 10,
    sampler: Sampler | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GreedyOutput:
    """Finish a prompt pass from block ``start_layer`` on (``resid`` enters it), then decode.

    The bridge cannot skip blocks: the prompt runs from the start with the hidden state of
    layer ``start_layer - 1`` replaced by ``resid`` (the layers below compute exactly what
    the clean pass did, so their keys/values are the clean ones). ``keep`` screens rows
    after the prompt pass; kept rows are decoded again from their prompt."""
    from latent_hops.backend import hidden_state_hook

    choose = sampler or argmax

    def hooks(values: torch.Tensor) -> list:
        def replace(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act[:, : values.shape[1]] = values.to(act.device, act.dtype)
            return act

        return [(hidden_state_hook(start_layer - 1), replace)]

    tokens = prefix.tokens
    if keep is None:
        return _decode(model, tokens, attention_mask, hooks(resid), max_new_tokens, choose)
    with model.hooks(fwd_hooks=hooks(resid)):
        logits = last_logits(model, tokens, attention_mask=attention_mask)

    def decode(rows: torch.Tensor) -> torch.Tensor:
        out = _decode(
            model, tokens[rows], attention_mask[rows], hooks(resid[rows]), max_new_tokens, choose
        )
        return out.tokens

    return screened(model, logits, max_new_tokens, keep, decode)


# ---------------------------------------------------------------------------- attention edits


@torch.no_grad()
def check_attention_edits(model: TransformerBridge) -> None:
    """Refuse attention knockout where the bridge discards edits of attention scores (its
    attention delegated to the HF module): the edit would silently measure nothing. Checked
    once per model by blocking, in every layer, the last token's attention to the others."""
    known = model.__dict__.get("latent_hops_attention_editable")
    if known is None:
        from latent_hops.backend import Site, hook_name

        tokens = probe_tokens(model.cfg.d_vocab, model.cfg.device)
        mask = torch.ones_like(tokens)

        def block(scores: torch.Tensor, hook: Any) -> torch.Tensor:
            edited = scores.clone()
            edited[..., -1, :-1] = float("-inf")
            return edited

        names = [hook_name(Site("attn_scores", layer)) for layer in range(model.cfg.n_layers)]
        clean = last_logits(model, tokens, attention_mask=mask)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with model.hooks(fwd_hooks=[(name, block) for name in names]):
                edited = last_logits(model, tokens, attention_mask=mask)
        discarded = any("discarded" in str(w.message) for w in caught)
        known = not discarded and not torch.allclose(clean, edited)
        model.__dict__["latent_hops_attention_editable"] = known
    if not known:
        arch = (getattr(_hf_config(model), "architectures", None) or ["this model"])[0]
        raise InputError(
            f"attention knockout is not possible on {arch} with the bridge backend: the bridge "
            "leaves its attention to the Hugging Face module, which ignores edits of the "
            "attention scores. Use --backend hooked (TransformerLens 3.x)."
        )
