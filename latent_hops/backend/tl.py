"""What the two TransformerLens backends share: hook names, reads and edits through hook
points, and the facts TransformerLens keeps in ``cfg``.

Both ``HookedTransformer`` (``hooked``) and ``TransformerBridge`` (``bridge``) expose the
same hook names (``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_attn_scores``, ...)
and ``run_with_hooks`` / ``hooks``; what differs between them (logits, KV cache, resuming
from a layer) is in ``hooked.py`` and ``bridge.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

import torch
from jaxtyping import Float, Int

from latent_hops.backend.base import EMBEDDINGS, PER_POSITION, Backend, Edit, Site
from latent_hops.backend.work import ModelShape
from latent_hops.errors import InputError

Hook = tuple[str | Callable[..., Any], Callable[..., Any]]
"""A TransformerLens forward hook: (hook point name, fn(activation, hook))."""


def hook_name(site: Site) -> str:
    """The TransformerLens hook point of a site. The hidden state of layer l is
    ``blocks.{l}.hook_resid_post``; layer -1 is ``blocks.0.hook_resid_pre``."""
    if site.kind == "resid":
        return (
            "blocks.0.hook_resid_pre"
            if site.layer == EMBEDDINGS
            else f"blocks.{site.layer}.hook_resid_post"
        )
    return {
        "attn_out": f"blocks.{site.layer}.hook_attn_out",
        "mlp_out": f"blocks.{site.layer}.hook_mlp_out",
        "attn_scores": f"blocks.{site.layer}.attn.hook_attn_scores",
        "attn_pattern": f"blocks.{site.layer}.attn.hook_pattern",
    }[site.kind]


def hidden_state_hook(layer: int) -> str:
    """Hook name of the hidden state of ``layer`` (see ``hook_name``)."""
    if layer < EMBEDDINGS:
        raise InputError(f"layer must be >= -1 (the embeddings), got {layer}")
    return hook_name(Site("resid", layer))


def as_hooks(edits: Iterable[Edit]) -> list[Hook]:
    """Edits as TransformerLens forward hooks."""
    return [(hook_name(e.site), lambda act, hook, fn=e.fn: fn(act)) for e in edits]


class TransformerLensBackend(Backend):
    """A backend over a TransformerLens model (``cfg``, hook points, ``run_with_hooks``)."""

    @classmethod
    @abc.abstractmethod
    def from_hf(
        cls,
        hf_model: Any,
        tokenizer: Any,
        dtype: torch.dtype,
        device: str,
        spec: str,
        max_context: int | None = None,
        n_devices: int = 1,
    ) -> Self:
        """This backend over a loaded Hugging Face causal LM."""

    @classmethod
    def random(
        cls, hf_config: Any, tokenizer: Any, dtype: torch.dtype, device: str, seed: int = 0
    ) -> Self:
        """A Hugging Face model of ``hf_config``'s shape, its weights drawn from ``seed``, built
        on ``device`` and loaded as any HF model is (``from_hf``): the same network under
        every backend. Benchmarks time the engine on a published shape (a 7B Llama in bf16 on
        a GPU) without downloading it."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        with torch.device(device):
            hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        return cls.from_hf(hf_model, tokenizer, dtype, device, "random")

    @property
    def n_layers(self) -> int:
        return int(self.tl.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.tl.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.tl.cfg.d_vocab)

    @property
    def device(self) -> str:
        return str(self.tl.cfg.device or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.tl.cfg.dtype

    @property
    def context_length(self) -> int:
        return int(self.tl.cfg.n_ctx)

    @property
    def shape(self) -> ModelShape:
        cfg = self.tl.cfg
        return ModelShape(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
            d_head=cfg.d_head,
            d_mlp=cfg.d_mlp or 0,
            gated_mlp=bool(cfg.gated_mlp),
            d_vocab=cfg.d_vocab,
        )

    def bytes_per_patched_row(self, seq_len: int, new_tokens: int) -> int:
        """Its KV cache, live activations and last-position logits."""
        cfg = self.tl.cfg
        kv_width = (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
        per_row = (
            2 * cfg.n_layers * (seq_len + new_tokens) * kv_width  # KV cache
            + 4 * seq_len * (2 * cfg.d_model + (cfg.d_mlp or 0) + cfg.n_heads * seq_len)
            + 4 * cfg.d_vocab  # last-position logits and their log-softmax (256k for Gemma)
        )
        return per_row * torch.finfo(cfg.dtype).bits // 8

    def parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.tl.state_dict().items()

    def unembedding_vectors(self) -> Float[torch.Tensor, "vocab d_model"]:
        return self.tl.W_U.detach().float().cpu().T

    @torch.no_grad()
    def read_sites(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        positions: Int[torch.Tensor, "batch n_positions"],
        sites: Sequence[Site],
    ) -> Float[torch.Tensor, "batch n_positions n_sites d_model"]:
        odd = [site for site in sites if site.kind not in PER_POSITION]
        if odd:
            raise InputError(
                f"read_sites reads per-position vectors ({PER_POSITION}), not {odd}; "
                "see read_attention"
            )
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
        pos = positions.to(tokens.device)
        found: dict[str, torch.Tensor] = {}

        def reader(name: str) -> Callable[..., None]:
            # keyed by the name asked for (the bridge's hook.name is its own, not the alias);
            # gathered on the tokens' device: blocks may live on other GPUs (n_devices > 1)
            def read(act: torch.Tensor, hook: Any) -> None:
                found[name] = act[rows.to(act.device), pos.to(act.device)].to(tokens.device)

            return read

        names = [hook_name(site) for site in sites]
        self.tl.run_with_hooks(
            tokens,
            attention_mask=attention_mask,
            return_type=None,
            fwd_hooks=[(name, reader(name)) for name in dict.fromkeys(names)],
        )
        return torch.stack([found[name] for name in names], dim=2)

    @torch.no_grad()
    def read_attention(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        queries: Int[torch.Tensor, " batch"],
        keys: Int[torch.Tensor, " batch"],
        layers: Sequence[int],
    ) -> Float[torch.Tensor, "batch n_layers heads"]:
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        found: dict[str, torch.Tensor] = {}

        def reader(name: str) -> Callable[..., None]:  # keyed by the name asked for
            def read(pattern: torch.Tensor, hook: Any) -> None:  # [batch, head, query, key]
                r, q, k = (t.to(pattern.device) for t in (rows, queries, keys))
                found[name] = pattern[r, :, q, k].float().to(tokens.device)

            return read

        names = [hook_name(Site("attn_pattern", layer)) for layer in self.check_layers(layers)]
        self.tl.run_with_hooks(
            tokens,
            attention_mask=attention_mask,
            return_type=None,
            fwd_hooks=[(name, reader(name)) for name in names],
        )
        return torch.stack([found[name] for name in names], dim=1)
