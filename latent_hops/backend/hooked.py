"""The ``hooked`` backend: TransformerLens 3.x ``HookedTransformer``.

Weights are converted with TL's own converters (``architectures``), and the back-patching
engine resumes a forward pass from any layer with TL's own KV cache, so layers below a
patch are never recomputed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from latent_hops.backend.architectures import (
    DEFAULT_MAX_CONTEXT,
    FAMILIES,
    family,
    tl_config_fields,
)
from latent_hops.backend.base import Capabilities, Edit, PromptWalk, tokenizer_adds_bos
from latent_hops.backend.decoding import (
    GreedyOutput,
    Sampler,
    Step,
    argmax,
    recompute_step,
    screened,
)
from latent_hops.backend.tl import TransformerLensBackend, as_hooks

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


def _new_hooked(cfg: HookedTransformerConfig, tokenizer: Any) -> HookedTransformer:
    with warnings.catch_warnings():
        # TL 3.9 warns at construction that HookedTransformer is deprecated in favour of
        # TL 4's TransformerBridge; we pin TL 3 on purpose (see this module's docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer

        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


class HookedBackend(TransformerLensBackend):
    """TransformerLens' ``HookedTransformer``: resumes from any layer without recomputing the
    layers below (TL's own KV cache)."""

    name = "hooked"
    tl: HookedTransformer

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        tokenizer: Any,
        dtype: torch.dtype,
        device: str,
        spec: str,
        max_context: int | None = DEFAULT_MAX_CONTEXT,
        n_devices: int = 1,
    ) -> HookedBackend:
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
        model = _new_hooked(cfg, tokenizer)
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
        else:
            model = model.to(device, print_details=False)
        return cls(model.eval(), tokenizer, spec)

    @classmethod
    def from_pretrained(
        cls, name: str, dtype: torch.dtype, device: str, spec: str, n_devices: int = 1
    ) -> HookedBackend:
        """A TransformerLens model by its official name, downloaded from the Hugging Face hub."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see _new_hooked
            from transformer_lens import HookedTransformer

            model = HookedTransformer.from_pretrained_no_processing(
                name, dtype=dtype, device=device, n_devices=n_devices
            )
        return cls(model.eval(), model.tokenizer, spec)

    @classmethod
    def random(
        cls, hf_config: Any, tokenizer: Any, dtype: torch.dtype, device: str, seed: int = 0
    ) -> HookedBackend:
        """A randomly initialised model of an HF config's shape, built directly on ``device``
        (e.g. a 7B-shaped Llama in bf16 on a GPU, to time the engine without downloading)."""
        cfg = tl_config_from_hf(
            hf_config, dtype, device, seed=seed, init_weights=True, model_name="random"
        )
        cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
        with torch.device(device):
            model = _new_hooked(cfg, tokenizer)
        return cls(model.eval(), tokenizer, "random")

    @staticmethod
    def known_names() -> list[str] | None:
        """Names (and aliases) that ``HookedTransformer.from_pretrained`` accepts."""
        from transformer_lens.loading_from_pretrained import make_model_alias_map

        return sorted(make_model_alias_map())

    @staticmethod
    def supported_architectures() -> tuple[str, ...]:
        return tuple(FAMILIES)

    # ------------------------------------------------------------------ facts

    @property
    def architecture(self) -> str:
        return self.tl.cfg.original_architecture or ""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            attention_edits=True, exact_kv_cache=True, resume_skips_lower_layers=True
        )

    # ------------------------------------------------------------------ logits

    @torch.no_grad()
    def project_to_vocab(
        self, acts: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... vocab"]:
        """The unembedding runs in float32 whatever the model's dtype, so ranks and log-probs
        of a bf16/fp16 model are not rounded to 8/11 bits over a large vocabulary; Gemma 2's
        final logit soft-capping is applied as in the forward pass."""
        shape = acts.shape[:-1]
        flat = acts.reshape(-1, 1, acts.shape[-1]).to(self.dtype)
        return self._unembed(flat, fp32=True)[:, 0].log_softmax(-1).reshape(*shape, -1)

    def _unembed(self, resid: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Final norm, unembedding (in float32 if ``fp32``) and final soft-cap: what the
        forward pass does after the last block, for the residual vectors given."""
        tl = self.tl
        normed = tl.ln_final(resid) if tl.cfg.normalization_type is not None else resid
        logits = normed.float() @ tl.W_U.float() + tl.b_U.float() if fp32 else tl.unembed(normed)
        cap = tl.cfg.output_logits_soft_cap
        return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits

    def _logits(self, input: torch.Tensor, **kwargs: Any) -> Float[torch.Tensor, "batch vocab"]:
        """Logits at the last position only: TransformerLens unembeds every position, which
        for a 256k vocabulary (Gemma) would fill gigabytes nobody reads. The blocks run as
        usual (hooks, KV cache); norm, unembedding and soft-cap run on one position."""
        resid = self.tl(input, stop_at_layer=self.n_layers, **kwargs)[:, -1:]
        return self._unembed(resid)[:, 0]

    @torch.no_grad()
    def last_logits(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        edits: Sequence[Edit] = (),
    ) -> Float[torch.Tensor, "batch vocab"]:
        with self.tl.hooks(fwd_hooks=as_hooks(edits)):
            return self._logits(tokens, attention_mask=attention_mask)

    # ------------------------------------------------------------------ generation

    def _new_cache(self, batch: int) -> TransformerLensKeyValueCache:
        from transformer_lens import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache.init_cache(self.tl.cfg, self.tl.cfg.device, batch)

    def _cached_step(self, cache: TransformerLensKeyValueCache) -> Step:
        def step(nxt: torch.Tensor) -> torch.Tensor:
            ones = torch.ones((nxt.shape[0], 1), dtype=torch.long, device=nxt.device)
            return self._logits(nxt[:, None], attention_mask=ones, past_kv_cache=cache)

        return step

    @torch.no_grad()
    def greedy_generate(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        max_new_tokens: int = 10,
        edits: Sequence[Edit] = (),
        use_kv_cache: bool = True,
    ) -> GreedyOutput:
        hooks = as_hooks(edits)
        if use_kv_cache:
            cache = self._new_cache(tokens.shape[0])
            with self.tl.hooks(fwd_hooks=hooks):
                logits = self._logits(tokens, attention_mask=attention_mask, past_kv_cache=cache)
            return self.decode_loop(logits, self._cached_step(cache), max_new_tokens)
        logits = self.last_logits(tokens, attention_mask, edits)
        step = recompute_step(tokens, attention_mask, lambda t, m: self.last_logits(t, m, edits))
        return self.decode_loop(logits, step, max_new_tokens)

    def walk_prompt(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        last_layer: int,
    ) -> PromptWalk:
        return HookedWalk(self, tokens, attention_mask, self._new_cache(tokens.shape[0]))


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


class HookedWalk(PromptWalk):
    """A clean prompt pass walked block by block: the residual stream after the last block
    run, and the keys/values of the blocks run so far (which resumed rows share)."""

    def __init__(
        self,
        model: HookedBackend,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: TransformerLensKeyValueCache,
    ):
        self.model, self.tokens, self.attention_mask, self.cache = (
            model,
            tokens,
            attention_mask,
            cache,
        )
        self.resid: torch.Tensor | None = None

    @torch.no_grad()
    def hidden(self, layer: int) -> Float[torch.Tensor, "batch pos d_model"]:
        """Runs block ``layer`` on the previous hidden state, appending its keys/values."""
        tl = self.model.tl
        if layer < 0:
            self.resid = tl(self.tokens, attention_mask=self.attention_mask, stop_at_layer=0)
        else:
            self.resid = tl(
                self.resid,
                start_at_layer=layer,
                stop_at_layer=layer + 1,
                attention_mask=self.attention_mask,
                past_kv_cache=self.cache,
            )
        assert self.resid is not None
        return self.resid

    @torch.no_grad()
    def resume(
        self,
        rows: Int[torch.Tensor, " rows"],
        resid: Float[torch.Tensor, "rows pos d_model"],
        layer: int,
        max_new_tokens: int,
        sampler: Sampler | None = None,
        keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> GreedyOutput:
        model, start = self.model, layer + 1
        mask = self.attention_mask[rows]
        cache = select_cache(self.cache, rows, start, mask)
        logits = model._logits(
            resid, start_at_layer=start, attention_mask=mask, past_kv_cache=cache
        )
        cache.previous_attention_mask = mask  # start_at_layer skips TL's own bookkeeping
        choose = sampler or argmax
        if keep is None:
            return model.decode_loop(logits, model._cached_step(cache), max_new_tokens, choose)

        def decode(kept: torch.Tensor) -> torch.Tensor:
            sub = select_cache(cache, kept, len(cache.entries), mask[kept])
            step = model._cached_step(sub)
            return model.decode_loop(logits[kept], step, max_new_tokens, choose).tokens

        return screened(model.pad_id, logits, max_new_tokens, keep, decode)
