"""The ``bridge`` backend: TransformerLens' ``TransformerBridge`` (TL 4; also in TL 3.9).

The bridge wraps the Hugging Face model itself: its logits are HF's, and the old hook names
(``blocks.L.hook_resid_post``, ``attn.hook_attn_scores``, ...) are aliases of its hook points,
so reading and editing sites is shared with the hooked backend (``tl.py``). What differs:

- **Resuming from a layer.** ``start_at_layer`` on the bridge still runs blocks 0..k-1 (TL
  4.3), so the engine cannot skip them. Each patched row instead runs the prompt again with
  the hidden state of layer k-1 replaced by the patched one (``BridgeWalk.resume``): exact,
  but the layers below a patch are recomputed. The clean hidden states are read in one pass.
- **KV cache.** Decoding uses HF's own ``DynamicCache`` through the bridge's
  ``past_key_values``. With transformers 5.24 the bridge's attention ignores it (the
  argument was renamed) and cached decoding is silently wrong, so every model is checked once
  (``capabilities.exact_kv_cache``): cached decoding must equal recomputation, else it
  decodes without a cache (exact, slower) and says so.
- **Attention knockout.** Where the bridge delegates attention to the HF module, an edit of
  ``hook_attn_scores`` is discarded; ``capabilities.attention_edits`` is then False and
  ``block_attention`` refuses.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int

from latent_hops.backend.base import Capabilities, Edit, PromptWalk, Site, tokenizer_adds_bos
from latent_hops.backend.decoding import (
    Decoding,
    GreedyOutput,
    Step,
    probe_tokens,
    recompute_step,
    screened,
)
from latent_hops.backend.tl import TransformerLensBackend, as_hooks, hook_name
from latent_hops.errors import InputError

logger = logging.getLogger(__name__)


def _boot(name: str, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL 3.9 calls the bridge experimental at every boot
        return TransformerBridge.boot_transformers(name, **kwargs)


class BridgeBackend(TransformerLensBackend):
    """TransformerLens' ``TransformerBridge`` around the Hugging Face model."""

    name = "bridge"

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        tokenizer: Any,
        dtype: torch.dtype,
        device: str,
        spec: str,
        max_context: int | None = None,
        n_devices: int = 1,
    ) -> BridgeBackend:
        """Wrap a loaded HF causal LM in a TransformerBridge (offline: the config is the
        model's). The HF model is wrapped in place: its own ``generate`` then runs through the
        bridge. BOS follows the tokenizer's own convention, as in the hooked backend."""
        if n_devices > 1:
            raise InputError(
                "n_devices > 1 is not supported by the bridge backend here; use --backend hooked",
                code="model",
            )
        name = getattr(hf_model.config, "_name_or_path", "") or hf_model.config.architectures[0]
        model = _boot(name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
        model.cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
        return cls(model.eval(), tokenizer, spec)

    @classmethod
    def from_pretrained(
        cls, name: str, dtype: torch.dtype, device: str, spec: str, n_devices: int = 1
    ) -> BridgeBackend:
        """A model by its Hugging Face hub name, downloaded by transformers."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        return cls.from_hf(hf_model, tokenizer, dtype, device, spec, n_devices=n_devices)

    @staticmethod
    def known_names() -> list[str] | None:
        return None  # any hub name

    @staticmethod
    def supported_architectures() -> tuple[str, ...]:
        """The causal LMs this TransformerLens' bridge has an adapter for."""
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES,
        )

        causal = ("ForCausalLM", "LMHeadModel")
        return tuple(sorted(a for a in SUPPORTED_ARCHITECTURES if a.endswith(causal)))

    # ------------------------------------------------------------------ facts

    @property
    def _hf_config(self) -> Any:
        return self.tl.original_model.config

    @property
    def architecture(self) -> str:
        return (getattr(self._hf_config, "architectures", None) or [""])[0]

    @functools.cached_property
    def capabilities(self) -> Capabilities:
        """Checked once per model, on three tokens (module docstring)."""
        return Capabilities(
            attention_edits=self._attention_edits_work(),
            exact_kv_cache=self._kv_cache_works(),
            resume_skips_lower_layers=False,
        )

    @torch.no_grad()
    def _kv_cache_works(self) -> bool:
        tokens = probe_tokens(self.d_vocab, self.device)
        mask = torch.ones_like(tokens)
        _, step = self._cached_prompt(tokens[:, :2], mask[:, :2], [])
        cached = step(tokens[:, 2])
        full = self._logits(tokens, attention_mask=mask)
        works = bool(torch.allclose(cached.float(), full.float(), atol=1e-3, rtol=1e-3))
        if not works:
            warnings.warn(
                "TransformerBridge's KV-cached decoding is wrong with this transformers version "
                "(known: transformers 5.24 with TransformerLens <= 4.3); latent_hops decodes "
                "without a cache on this model (exact, slower). transformers 5.9-5.23 avoids it.",
                RuntimeWarning,
                stacklevel=3,
            )
        return works

    @torch.no_grad()
    def _attention_edits_work(self) -> bool:
        """Blocking, in every layer, the last token's attention to the others must change the
        output, and TL must not say the edit was discarded."""
        tokens = probe_tokens(self.d_vocab, self.device)
        mask = torch.ones_like(tokens)

        def block(scores: torch.Tensor, hook: Any) -> torch.Tensor:
            edited = scores.clone()
            edited[..., -1, :-1] = float("-inf")
            return edited

        names = [hook_name(Site("attn_scores", layer)) for layer in range(self.n_layers)]
        clean = self._logits(tokens, attention_mask=mask)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self.tl.hooks(fwd_hooks=[(name, block) for name in names]):
                edited = self._logits(tokens, attention_mask=mask)
        discarded = any("discarded" in str(w.message) for w in caught)
        return not discarded and not torch.allclose(clean, edited)

    # ------------------------------------------------------------------ logits

    def _logits(self, input: torch.Tensor, **kwargs: Any) -> Float[torch.Tensor, "batch vocab"]:
        """Logits at the last position only (HF's ``logits_to_keep=1``)."""
        return self.tl(input, logits_to_keep=1, **kwargs)[:, -1]

    @torch.no_grad()
    def last_logits(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        edits: Sequence[Edit] = (),
    ) -> Float[torch.Tensor, "batch vocab"]:
        with self.tl.hooks(fwd_hooks=as_hooks(edits)):
            return self._logits(tokens, attention_mask=attention_mask)

    @torch.no_grad()
    def project_to_vocab(
        self, acts: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... vocab"]:
        """In float32, with the final logit soft-cap of Gemma 2/3, as HF's forward pass does."""
        shape = acts.shape[:-1]
        flat = acts.reshape(-1, 1, acts.shape[-1]).to(self.dtype)
        tl = self.tl
        logits = tl.ln_final(flat).float() @ tl.W_U.float() + tl.b_U.float()
        cap = getattr(self._hf_config, "final_logit_softcapping", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits[:, 0].log_softmax(-1).reshape(*shape, -1)

    # ------------------------------------------------------------------ generation

    def _cached_prompt(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, hooks: list
    ) -> tuple[torch.Tensor, Step]:
        """The prompt pass (``hooks`` active) with HF's KV cache, and the cached step."""
        from transformers import DynamicCache

        with self.tl.hooks(fwd_hooks=hooks):
            logits, cache = self.tl(
                tokens,
                attention_mask=attention_mask,
                past_key_values=DynamicCache(config=self._hf_config),
                return_type="logits_and_cache",
                logits_to_keep=1,
            )
        state = [attention_mask, cache]

        def step(nxt: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
            if kept is not None:
                state[0] = state[0][kept]
                state[1].batch_select_indices(kept)
            state[0] = torch.cat([state[0], torch.ones_like(nxt[:, None])], 1)
            out, state[1] = self.tl(
                nxt[:, None],
                attention_mask=state[0],
                past_key_values=state[1],
                return_type="logits_and_cache",
                logits_to_keep=1,
            )
            return out[:, -1]

        return logits[:, -1], step

    @torch.no_grad()
    def _decode(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        edits: Sequence[Edit],
        decoding: Decoding,
        use_kv_cache: bool = True,
    ) -> GreedyOutput:
        """Prompt pass with ``edits``, then decoding: cached when the cache is exact, else by
        recomputation with the edits kept on (they touch prompt positions only)."""
        if use_kv_cache and self.capabilities.exact_kv_cache:
            logits, step = self._cached_prompt(tokens, attention_mask, as_hooks(edits))
        else:
            logits = self.last_logits(tokens, attention_mask, edits)
            step = recompute_step(
                tokens, attention_mask, lambda t, m: self.last_logits(t, m, edits)
            )
        choose, stop = decoding.choose, decoding.stop
        return self.decode_loop(logits, step, decoding.max_new_tokens, choose, stop)

    def greedy_generate(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        max_new_tokens: int = 10,
        edits: Sequence[Edit] = (),
        use_kv_cache: bool = True,
    ) -> GreedyOutput:
        return self._decode(tokens, attention_mask, edits, Decoding(max_new_tokens), use_kv_cache)

    @torch.no_grad()
    def walk_prompt(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        last_layer: int,
    ) -> PromptWalk:
        """One clean pass, keeping the hidden states of layers -1..``last_layer``."""
        hidden: dict[int, torch.Tensor] = {}

        def keeper(layer: int) -> Callable[..., None]:
            return lambda act, hook: hidden.__setitem__(layer, act.clone())

        hooks = [
            (hook_name(Site("resid", layer)), keeper(layer)) for layer in range(-1, last_layer + 1)
        ]
        self.tl.run_with_hooks(
            tokens,
            attention_mask=attention_mask,
            fwd_hooks=hooks,
            stop_at_layer=last_layer + 1 if last_layer + 1 < self.n_layers else None,
        )
        return BridgeWalk(self, tokens, attention_mask, hidden)


class BridgeWalk(PromptWalk):
    """A clean prompt pass read in one go (its hidden states); a resumed row reruns its
    prompt with the hidden state of the patched layer replaced."""

    def __init__(
        self,
        model: BridgeBackend,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden: dict[int, torch.Tensor],
    ):
        self.model, self.tokens, self.attention_mask, self._hidden = (
            model,
            tokens,
            attention_mask,
            hidden,
        )

    def hidden(self, layer: int) -> Float[torch.Tensor, "batch pos d_model"]:
        return self._hidden[layer]

    def resume(
        self,
        rows: Int[torch.Tensor, " rows"],
        resid: Float[torch.Tensor, "rows pos d_model"],
        layer: int,
        decoding: Decoding,
    ) -> GreedyOutput:
        """The layers below ``layer`` compute exactly what the clean pass did, so their
        keys/values are the clean ones; ``decoding.keep``'s kept rows are decoded again from
        their prompt."""
        model = self.model
        index = rows.to(self.tokens.device)
        tokens, mask = self.tokens[index], self.attention_mask[index]

        def replace(values: torch.Tensor) -> list[Edit]:
            def write(act: torch.Tensor) -> torch.Tensor:
                act[:, : values.shape[1]] = values.to(act.device, act.dtype)
                return act

            return [Edit(Site("resid", layer), write)]

        if decoding.keep is None:
            return model._decode(tokens, mask, replace(resid), decoding)
        logits = model.last_logits(tokens, mask, replace(resid))

        def decode(kept: torch.Tensor, decoding: Decoding) -> torch.Tensor:
            return model._decode(tokens[kept], mask[kept], replace(resid[kept]), decoding).tokens

        return screened(model.pad_id, logits, decoding, decode)
