"""The ``hooked`` backend: TransformerLens 3.x ``HookedTransformer``.

Weights are converted with TL's own converters (``architectures``), and the back-patching
engine resumes a forward pass from any layer with TL's own KV cache, so layers below a
patch are never recomputed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from latent_hops.backend.architectures import DEFAULT_MAX_CONTEXT, family, tl_config_fields
from latent_hops.backend.decoding import (
    GreedyOutput,
    Sampler,
    argmax,
    greedy_loop,
    recompute_step,
    screened,
    tokenizer_adds_bos,
)

if TYPE_CHECKING:
    from transformer_lens import (
        HookedTransformer,
        HookedTransformerConfig,
        TransformerLensKeyValueCache,
    )


def tl_config_from_hf(
    hf_config: Any,
    dtype: torch.dtype,
    device: str,
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    **overrides: Any,
) -> HookedTransformerConfig:
    """TransformerLens config for a Hugging Face config, read from the config itself (see
    ``architectures``); ``n_ctx`` is capped at ``max_context`` (None: the model's own)."""
    fields = dict(
        init_weights=False,
        model_name=getattr(hf_config, "_name_or_path", "") or hf_config.architectures[0],
    )
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        **tl_config_fields(hf_config, max_context),
        dtype=dtype,
        device=device,
        **{**fields, **overrides},
    )


def hooked_from_hf(
    hf_model: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str,
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    n_devices: int = 1,
) -> HookedTransformer:
    """Convert a loaded HF causal LM with TransformerLens' own weight converters.

    No weight processing (no LayerNorm folding or centering): hidden states are the HF
    model's own, as in the paper's code, and logits match the HF model. BOS follows the
    tokenizer's own convention (TL prepends one by default, which for SmolLM2 drops
    first-hop accuracy from 45% to 4%): tokens equal what the HF tokenizer gives.
    """
    cfg = tl_config_from_hf(hf_model.config, dtype, device, max_context)
    cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
    cfg.n_devices = n_devices
    state_dict = family(cfg.original_architecture or "").convert(hf_model, cfg)
    with warnings.catch_warnings():
        # TL 3.9 warns at construction that HookedTransformer is deprecated in favour of
        # TL 4's TransformerBridge; we pin TL 3 on purpose (see this module's docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer

        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    if n_devices > 1:  # blocks split evenly over cuda:0..n_devices-1 (TL's own placement)
        model.move_model_modules_to_device()
        return model.eval()
    return model.to(device, print_details=False).eval()


def hooked_from_pretrained(
    name: str, dtype: torch.dtype, device: str, n_devices: int = 1
) -> HookedTransformer:
    """A TransformerLens model by its official name, downloaded from the Hugging Face hub."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see hooked_from_hf
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained_no_processing(
            name, dtype=dtype, device=device, n_devices=n_devices
        ).eval()


def official_model_names() -> list[str]:
    """Names (and aliases) that ``HookedTransformer.from_pretrained`` accepts."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    return sorted(make_model_alias_map())


def random_model(
    hf_config: Any, tokenizer: Any, dtype: torch.dtype, device: str, seed: int = 0
) -> HookedTransformer:
    """A randomly initialised model of an HF config's shape, built directly on ``device``
    (e.g. a 7B-shaped Llama in bf16 on a GPU, to time the engine without downloading weights)."""
    cfg = tl_config_from_hf(
        hf_config, dtype, device, seed=seed, init_weights=True, model_name="random"
    )
    cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore", DeprecationWarning)  # see hooked_from_hf
        from transformer_lens import HookedTransformer

        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    return model.eval()


@torch.no_grad()
def project_to_vocab(
    model: HookedTransformer, acts: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... vocab"]:
    """Log-probabilities of ``acts`` read through the final norm and the unembedding (the
    logit lens). The unembedding runs in float32 whatever the model's dtype, so ranks and
    log-probs of a bf16/fp16 model are not rounded to 8/11 bits over a large vocabulary;
    Gemma 2's final logit soft-capping is applied as in the forward pass."""
    shape = acts.shape[:-1]
    flat = acts.reshape(-1, 1, acts.shape[-1]).to(model.cfg.dtype)
    return _unembed(model, flat, fp32=True)[:, 0].log_softmax(-1).reshape(*shape, -1)


def _unembed(model: HookedTransformer, resid: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Final norm, unembedding (in float32 if ``fp32``) and final soft-cap: what the forward
    pass does after the last block, for the residual vectors given."""
    normed = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
    logits = (
        normed.float() @ model.W_U.float() + model.b_U.float() if fp32 else model.unembed(normed)
    )
    cap = model.cfg.output_logits_soft_cap
    return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits


def last_logits(
    model: HookedTransformer, input: torch.Tensor, **kwargs: Any
) -> Float[torch.Tensor, "batch vocab"]:
    """The model's logits at the last position only (``model(input, **kwargs)[:, -1]``).

    TransformerLens unembeds every position; for a 256k vocabulary (Gemma) the prompt pass
    of a batch of 128 would fill gigabytes with logits nobody reads. The blocks run as
    usual (hooks, KV cache); the final norm, unembedding and soft-cap run on one position."""
    resid = model(input, stop_at_layer=model.cfg.n_layers, **kwargs)[:, -1:]
    return _unembed(model, resid)[:, 0]


def _cached_step(model: HookedTransformer, cache: TransformerLensKeyValueCache) -> Callable:
    def step(nxt: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((nxt.shape[0], 1), dtype=torch.long, device=nxt.device)
        return last_logits(model, nxt[:, None], attention_mask=ones, past_kv_cache=cache)

    return step


@torch.no_grad()
def greedy_generate(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    max_new_tokens: int = 10,
    prompt_hooks: Sequence[tuple[str, Callable]] = (),
    use_kv_cache: bool = True,
) -> GreedyOutput:
    """Greedy decoding of left-padded prompts, stopping each row at EOS.

    ``prompt_hooks`` are active on the prompt pass only: with the KV cache they run once
    on the prompt; without it (the exact reference loop) they run on every full forward,
    and must touch prompt positions only, which left padding keeps fixed.
    """
    hooks: list[Any] = list(prompt_hooks)
    if use_kv_cache:
        cache = new_kv_cache(model, tokens.shape[0])
        with model.hooks(fwd_hooks=hooks):
            logits = last_logits(model, tokens, attention_mask=attention_mask, past_kv_cache=cache)
        return greedy_loop(model, logits, _cached_step(model, cache), max_new_tokens)
    with model.hooks(fwd_hooks=hooks):
        logits = last_logits(model, tokens, attention_mask=attention_mask)
    step = recompute_step(model, tokens, attention_mask, hooks, last_logits)
    return greedy_loop(model, logits, step, max_new_tokens)


# ---------------------------------------------------------------------------- resuming from a layer


def new_kv_cache(model: HookedTransformer, batch: int) -> TransformerLensKeyValueCache:
    from transformer_lens import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


@dataclass
class PromptState:
    """A clean prompt pass walked block by block: the residual stream after the last block
    run, and the keys/values of the blocks run so far."""

    cache: TransformerLensKeyValueCache
    attention_mask: torch.Tensor
    tokens: torch.Tensor
    resid: torch.Tensor | None = None


def start_prompt(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    last_layer: int,
) -> PromptState:
    """A clean pass of ``tokens``, ready to be walked with ``advance`` (nothing run yet)."""
    return PromptState(new_kv_cache(model, tokens.shape[0]), attention_mask, tokens)


@torch.no_grad()
def advance(
    model: HookedTransformer, state: PromptState, layer: int
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The clean hidden state of ``layer`` (-1: the embeddings), running block ``layer`` on
    the previous one and appending its keys/values; layers come in order -1, 0, 1, ..."""
    if layer < 0:
        state.resid = model(state.tokens, attention_mask=state.attention_mask, stop_at_layer=0)
    else:
        state.resid = model(
            state.resid,
            start_at_layer=layer,
            stop_at_layer=layer + 1,
            attention_mask=state.attention_mask,
            past_kv_cache=state.cache,
        )
    return state.resid


def select_prefix(
    model: HookedTransformer,
    state: PromptState,
    rows: torch.Tensor,
    n_layers: int,
    attention_mask: torch.Tensor,
) -> TransformerLensKeyValueCache:
    """A cache for ``rows`` of a prompt batch holding the first ``n_layers`` layers' keys and
    values (shared with the clean pass), the later layers empty, ready to resume from there."""
    return select_cache(state.cache, rows, n_layers, attention_mask)


def select_cache(
    cache: TransformerLensKeyValueCache,
    rows: torch.Tensor,
    n_layers: int,
    attention_mask: torch.Tensor,
) -> TransformerLensKeyValueCache:
    """A cache for ``rows`` of a prompt batch holding the first ``n_layers`` layers' keys and
    values (shared with a clean run), the later layers empty, ready to resume from there."""
    entries = []
    for i, entry in enumerate(cache.entries):
        keys, values = (
            (entry.past_keys, entry.past_values)
            if i < n_layers
            else (entry.past_keys[:, :0], entry.past_values[:, :0])
        )
        index = rows.to(keys.device)  # layers may live on different GPUs (n_devices > 1)
        entries.append(type(entry)(past_keys=keys[index], past_values=values[index]))
    from transformer_lens import TransformerLensKeyValueCache

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
    logits = last_logits(
        model, resid, start_at_layer=start_layer, attention_mask=attention_mask, past_kv_cache=cache
    )
    cache.previous_attention_mask = attention_mask  # start_at_layer skips TL's own bookkeeping
    choose = sampler or argmax
    if keep is None:
        return greedy_loop(model, logits, _cached_step(model, cache), max_new_tokens, choose)

    def decode(rows: torch.Tensor) -> torch.Tensor:
        sub = select_cache(cache, rows, len(cache.entries), attention_mask[rows])
        step = _cached_step(model, sub)
        return greedy_loop(model, logits[rows], step, max_new_tokens, choose).tokens

    return screened(model, logits, max_new_tokens, keep, decode)
