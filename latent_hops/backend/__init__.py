"""Everything that depends on TransformerLens lives here, and only here.

Two backends implement the same functions (``hooked``: TL 3.x ``HookedTransformer``;
``bridge``: TL 4's ``TransformerBridge``, also in TL 3.9), chosen by ``load_model(backend=)``.
The analyses talk to the model only through the functions of this module; what is common
(sites and hook names, reading and editing them) is written here once, what differs is
dispatched on the model's type to ``hooked`` or ``bridge``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from latent_hops.backend import bridge, hooked
from latent_hops.backend.architectures import (  # noqa: F401 -- UnsupportedArchitecture is re-exported
    DEFAULT_MAX_CONTEXT,
    FAMILIES,
    UnsupportedArchitecture,
    family,
    tl_config_fields,
)
from latent_hops.backend.decoding import (  # noqa: F401 -- re-exported
    GreedyOutput,
    Sampler,
    tokenizer_adds_bos,
    tokenizer_of,
)
from latent_hops.errors import InputError

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

# TransformerLens is imported where a model is built or run, not at import time: the CLI's
# parser (`latent-hops --help`) needs the analyses' configs, not TransformerLens
if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    Model = HookedTransformer  # or a TransformerBridge: the same surface, as far as we use it
else:
    Model = Any
"""What the analyses hold: the model as its backend represents it."""

# ---------------------------------------------------------------------------- sites

EMBEDDINGS = -1
"""Layer index of the embedding output (the residual stream entering block 0)."""

SITE_KINDS = ("resid", "attn_out", "mlp_out", "attn_scores", "attn_pattern")
PER_POSITION = (
    "resid",
    "attn_out",
    "mlp_out",
)  # sites with one vector per position (``read_sites``)


@dataclass(frozen=True)
class Site:
    """A place in the model the analyses read or edit, in their own vocabulary: the hidden
    state of a layer (``"resid"``; layer -1 = the embeddings), a block's attention or MLP
    output, or its attention scores (pre-softmax) or pattern (post-softmax)."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise InputError(f"unknown site {self.kind!r}; use {SITE_KINDS}")
        if self.layer < (EMBEDDINGS if self.kind == "resid" else 0):
            raise InputError(f"{self.kind} has no layer {self.layer}")


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


def n_layers(model: Model) -> int:
    return model.cfg.n_layers


def d_model(model: Model) -> int:
    return model.cfg.d_model


def device_of(model: Model) -> str:
    return str(model.cfg.device or "cpu")


def prepends_bos(model: Model) -> bool:
    """Whether prompts start with BOS (the model's own tokenizer's convention)."""
    return bool(model.cfg.default_prepend_bos)


def context_length(model: Model) -> int:
    return model.cfg.n_ctx


def architecture(model: Model) -> str:
    """The Hugging Face architecture the model was built from (``"LlamaForCausalLM"``)."""
    if bridge.is_bridge(model):
        return bridge.architecture(model)
    return model.cfg.original_architecture or ""


def supported_architectures(backend: str) -> tuple[str, ...]:
    """Hugging Face architectures ``backend`` can load."""
    return bridge.supported_architectures() if backend == "bridge" else SUPPORTED_ARCHITECTURES


def model_spec(model: Model) -> str:
    """The spec ``load_model`` was given (``"toy"``, a path, a name), or the model's name."""
    return getattr(model, "latent_hops_spec", None) or model.cfg.model_name


def unembedding_vectors(model: Model) -> Float[torch.Tensor, "vocab d_model"]:
    """The unembedding matrix as one row per token (float32, CPU)."""
    return model.W_U.detach().float().cpu().T


def check_layers(model: Model, layers) -> list[int]:
    """``layers`` as a list, each checked to lie in [-1, n_layers - 1]."""
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not EMBEDDINGS <= x < n_layers(model)]
    if bad:
        raise InputError(
            f"layers {bad} out of range: this model has layers -1 (embeddings) "
            f"to {n_layers(model) - 1}"
        )
    return layers


@torch.no_grad()
def read_sites(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    positions: Int[torch.Tensor, "batch n_positions"],
    sites: Sequence[Site],
) -> Float[torch.Tensor, "batch n_positions n_sites d_model"]:
    """Clean activations of ``sites`` at ``positions`` only (never a full cache)."""
    odd = [site for site in sites if site.kind not in PER_POSITION]
    if odd:
        raise InputError(
            f"read_sites reads per-position vectors ({PER_POSITION}), not {odd}; see read_attention"
        )
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    pos = positions.to(tokens.device)
    found: dict[str, torch.Tensor] = {}

    def reader(name: str) -> Callable:
        # keyed by the name asked for (the bridge's hook.name is its own, not the alias);
        # gathered on the tokens' device: blocks may live on other GPUs (n_devices > 1)
        def read(act: torch.Tensor, hook) -> None:
            found[name] = act[rows.to(act.device), pos.to(act.device)].to(tokens.device)

        return read

    names = [hook_name(site) for site in sites]
    model.run_with_hooks(
        tokens,
        attention_mask=attention_mask,
        return_type=None,
        fwd_hooks=[(name, reader(name)) for name in dict.fromkeys(names)],
    )
    return torch.stack([found[name] for name in names], dim=2)


@torch.no_grad()
def read_attention(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    queries: Int[torch.Tensor, " batch"],
    keys: Int[torch.Tensor, " batch"],
    layers: Sequence[int],
) -> Float[torch.Tensor, "batch n_layers heads"]:
    """Attention weight (post-softmax) from column ``queries[b]`` to column ``keys[b]`` in every
    head of ``layers``, one row per prompt; the full patterns are never kept."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    found: dict[str, torch.Tensor] = {}

    def reader(name: str) -> Callable:  # keyed by the name asked for (see read_sites)
        def read(pattern: torch.Tensor, hook) -> None:  # [batch, head, query, key]
            r, q, k = (t.to(pattern.device) for t in (rows, queries, keys))
            found[name] = pattern[r, :, q, k].float().to(tokens.device)

        return read

    names = [hook_name(Site("attn_pattern", layer)) for layer in check_layers(model, layers)]
    model.run_with_hooks(
        tokens,
        attention_mask=attention_mask,
        return_type=None,
        fwd_hooks=[(name, reader(name)) for name in names],
    )
    return torch.stack([found[name] for name in names], dim=1)


def write_hook(layer: int, write: Callable[[torch.Tensor], torch.Tensor]) -> tuple[str, Callable]:
    """An edit of the hidden state of ``layer``: ``write(resid) -> resid`` on each pass."""
    return hidden_state_hook(layer), lambda resid, hook: write(resid)


def block_attention(
    model: Model, layers: Sequence[int], mask: Bool[torch.Tensor, "batch query key"]
) -> list[tuple[str, Callable]]:
    """An edit blocking attention where ``mask[b, q, k]``: pre-softmax scores set to -inf in
    every head of ``layers`` (attention knockout). Refused (InputError) on a model whose
    attention scores cannot be edited (some architectures on the bridge backend)."""
    if bridge.is_bridge(model):
        bridge.check_attention_edits(model)

    def hook(scores: torch.Tensor, hook) -> torch.Tensor:
        # prompt positions only: a decoding loop without a KV cache reruns longer sequences
        q, k = scores.shape[-2:]
        edges = mask[:, :q, :k].to(scores.device)
        edges = torch.nn.functional.pad(edges, (0, k - edges.shape[-1], 0, q - edges.shape[-2]))
        return scores.masked_fill(edges[:, None], float("-inf"))

    return [(hook_name(Site("attn_scores", layer)), hook) for layer in layers]


def bytes_per_patched_row(model: Model, seq_len: int, new_tokens: int) -> int:
    """Memory of one row of the fast engine: its KV cache, live activations and logits."""
    cfg = model.cfg
    kv_width = (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
    per_row = (
        2 * cfg.n_layers * (seq_len + new_tokens) * kv_width  # KV cache
        + 4
        * seq_len
        * (2 * cfg.d_model + (cfg.d_mlp or 0) + cfg.n_heads * seq_len)  # live activations
        + 4 * cfg.d_vocab
    )  # last-position logits and their log-softmax (256k for Gemma)
    return per_row * torch.finfo(cfg.dtype).bits // 8


# ---------------------------------------------------------------------------- backends

BACKENDS = ("hooked", "bridge")


def backend_of(model: Model) -> str:
    """``"bridge"`` for a TransformerBridge, else ``"hooked"``."""
    return "bridge" if bridge.is_bridge(model) else "hooked"


def _impl(model: Model) -> Any:
    return bridge if bridge.is_bridge(model) else hooked


def transformer_lens_version() -> str:
    from importlib.metadata import version

    return version("transformer_lens")


def hooked_available() -> bool:
    """Whether this TransformerLens has ``HookedTransformer`` (3.x; TL 4 removed it)."""
    return int(transformer_lens_version().split(".")[0]) < 4


def resolve_backend(name: str) -> str:
    """``"auto"`` -> ``"hooked"`` on TransformerLens 3.x, ``"bridge"`` on 4.x; a name is
    checked against what the installed TransformerLens offers."""
    if name not in ("auto", *BACKENDS):
        raise InputError(f"unknown backend {name!r}; use auto, {', '.join(BACKENDS)}")
    if name == "auto":
        return "hooked" if hooked_available() else "bridge"
    if name == "hooked" and not hooked_available():
        raise InputError(
            f"the hooked backend needs TransformerLens 3.x (HookedTransformer); this is "
            f"TransformerLens {transformer_lens_version()}: use backend='bridge' (or 'auto')"
        )
    return name


def from_hf(
    backend: str,
    hf_model: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str,
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    n_devices: int = 1,
) -> Model:
    """A loaded HF causal LM as a model of ``backend`` (``"hooked"`` or ``"bridge"``)."""
    if backend == "bridge":
        return bridge.bridge_from_hf(hf_model, tokenizer, dtype, device, n_devices)
    return hooked.hooked_from_hf(hf_model, tokenizer, dtype, device, max_context, n_devices)


def from_pretrained(backend: str, name: str, dtype: torch.dtype, device: str, n_devices: int = 1):
    """A model by name, downloaded: a TransformerLens name (hooked) or a hub name (bridge)."""
    if backend == "bridge":
        return bridge.bridge_from_pretrained(name, dtype, device, n_devices)
    return hooked.hooked_from_pretrained(name, dtype, device, n_devices)


def known_model_names(backend: str) -> list[str] | None:
    """Names ``from_pretrained`` accepts (None: any hub name, as on the bridge)."""
    return None if backend == "bridge" else hooked.official_model_names()


def random_model(
    hf_config: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    backend: str = "hooked",
) -> Model:
    """A randomly initialised model of an HF config's shape, built directly on ``device``
    (e.g. a 7B-shaped Llama in bf16 on a GPU, to time the engine without downloading weights)."""
    impl = bridge if backend == "bridge" else hooked
    return impl.random_model(hf_config, tokenizer, dtype, device, seed)


def project_to_vocab(
    model: Model, acts: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... vocab"]:
    """Log-probabilities of ``acts`` read through the final norm and the unembedding (the
    logit lens), in float32 whatever the model's dtype, with the final soft-cap (Gemma 2)."""
    return _impl(model).project_to_vocab(model, acts)


def last_logits(
    model: Model, input: torch.Tensor, **kwargs: Any
) -> Float[torch.Tensor, "batch vocab"]:
    """The model's logits at the last position only (``model(input, **kwargs)[:, -1]``),
    without unembedding every position (a 256k vocabulary would fill gigabytes)."""
    return _impl(model).last_logits(model, input, **kwargs)


def greedy_generate(
    model: Model,
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
    return _impl(model).greedy_generate(
        model, tokens, attention_mask, max_new_tokens, prompt_hooks, use_kv_cache
    )


# ---------------------------------------------------------------------------- resuming from a layer
# The fast back-patching engine (``patching.generate_with_patches``) walks a clean prompt
# pass layer by layer (``start_prompt``, ``advance``) and finishes patched rows from the
# layer after the patch (``select_prefix``, ``greedy_from_layer``). The hooked backend
# shares the lower layers' keys/values; the bridge reruns them (see ``bridge``).


def start_prompt(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    last_layer: int,
) -> Any:
    """A clean pass of ``tokens`` to walk with ``advance`` up to ``last_layer``."""
    return _impl(model).start_prompt(model, tokens, attention_mask, last_layer)


def advance(model: Model, state: Any, layer: int) -> Float[torch.Tensor, "batch pos d_model"]:
    """The clean hidden state of ``layer``; layers are visited in order -1, 0, 1, ..."""
    return _impl(model).advance(model, state, layer)


def select_prefix(
    model: Model, state: Any, rows: torch.Tensor, n_layers: int, attention_mask: torch.Tensor
) -> Any:
    """What ``rows`` of the prompt batch need to resume after their first ``n_layers`` layers."""
    return _impl(model).select_prefix(model, state, rows, n_layers, attention_mask)


def greedy_from_layer(
    model: Model,
    resid: Float[torch.Tensor, "batch pos d_model"],
    start_layer: int,
    attention_mask: Int[torch.Tensor, "batch pos"],
    prefix: Any,
    max_new_tokens: int = 10,
    sampler: Sampler | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GreedyOutput:
    """Finish a prompt pass from block ``start_layer`` on (``resid`` enters it), then decode
    (greedy unless ``sampler``). ``keep(first_logits) -> bool[batch]`` screens rows after
    the prompt pass: only kept rows are decoded, the others get padding only."""
    return _impl(model).greedy_from_layer(
        model, resid, start_layer, attention_mask, prefix, max_new_tokens, sampler, keep
    )


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """A SHA-256 over every parameter's name, shape, dtype and ``samples`` evenly strided
    values: two checkpoints that differ anywhere in a sampled value differ here, and a 7B
    model is fingerprinted in well under a second (hashing every byte would take minutes)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
        digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def free_memory_mb(device: str | torch.device) -> float | None:
    """Free memory of a CUDA device in MiB (None on CPU, where a fixed budget applies)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**20
