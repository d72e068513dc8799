"""Everything that depends on the TransformerLens version lives here, and only here.

latent_hops targets TransformerLens 3.x (``HookedTransformer``). TL 4 replaced it with
``TransformerBridge`` (and, measured with transformers 5.24, its KV-cached generation was
silently wrong and ``start_at_layer`` saved no compute), so a TL 4 backend must re-implement
the functions of this module, and nothing else: the analyses talk to the model only through
the TransformerLens surface (``cfg``, ``to_tokens``, ``run_with_hooks``, ``run_with_cache``,
``hooks()``, ``blocks``, ``ln_final``, ``unembed``) and the functions below.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from latent_hops.backend.architectures import (  # noqa: F401 -- UnsupportedArchitecture is re-exported
    DEFAULT_MAX_CONTEXT,
    FAMILIES,
    UnsupportedArchitecture,
    family,
    tl_config_fields,
)
from latent_hops.errors import InputError

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

# TransformerLens is imported where a model is built or run, not at import time: the CLI's
# parser (`latent-hops --help`) needs the analyses' configs, not TransformerLens
if TYPE_CHECKING:
    from transformer_lens import (
        HookedTransformer,
        HookedTransformerConfig,
        TransformerLensKeyValueCache,
    )

    Model = HookedTransformer
else:
    Model = Any
"""What the analyses hold: the model as this backend represents it."""

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

    def read(act: torch.Tensor, hook) -> None:
        # gathered on the tokens' device: blocks may live on other GPUs (n_devices > 1)
        found[hook.name] = act[rows.to(act.device), pos.to(act.device)].to(tokens.device)

    names = [hook_name(site) for site in sites]
    model.run_with_hooks(
        tokens,
        attention_mask=attention_mask,
        return_type=None,
        fwd_hooks=[(name, read) for name in dict.fromkeys(names)],
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

    def read(pattern: torch.Tensor, hook) -> None:  # [batch, head, query, key]
        r, q, k = (t.to(pattern.device) for t in (rows, queries, keys))
        found[hook.name] = pattern[r, :, q, k].float().to(tokens.device)

    names = [hook_name(Site("attn_pattern", layer)) for layer in check_layers(model, layers)]
    model.run_with_hooks(
        tokens,
        attention_mask=attention_mask,
        return_type=None,
        fwd_hooks=[(name, read) for name in names],
    )
    return torch.stack([found[name] for name in names], dim=1)


def write_hook(layer: int, write: Callable[[torch.Tensor], torch.Tensor]) -> tuple[str, Callable]:
    """An edit of the hidden state of ``layer``: ``write(resid) -> resid`` on each pass."""
    return hidden_state_hook(layer), lambda resid, hook: write(resid)


def block_attention(
    layers: Sequence[int], mask: Bool[torch.Tensor, "batch query key"]
) -> list[tuple[str, Callable]]:
    """An edit blocking attention where ``mask[b, q, k]``: pre-softmax scores set to -inf in
    every head of ``layers`` (attention knockout)."""

    def hook(scores: torch.Tensor, hook) -> torch.Tensor:
        q, k = scores.shape[-2:]
        return scores.masked_fill(mask[:, None, :q, :k], float("-inf"))

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


def tokenizer_of(model: HookedTransformer) -> Any:
    """The model's Hugging Face tokenizer (every model ``load_model`` returns has one)."""
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; latent_hops needs the model's own tokenizer")
    return model.tokenizer


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the Hugging Face tokenizer itself starts its encodings with the BOS token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


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


# ---------------------------------------------------------------------------- generation

HookList = list[tuple[str, Callable]]


@dataclass
class GreedyOutput:
    """Greedy continuation of a batch: new token ids (``pad_id`` after EOS) and first-step
    logits."""

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


def last_logits(
    model: HookedTransformer, input: torch.Tensor, **kwargs: Any
) -> Float[torch.Tensor, "batch vocab"]:
    """The model's logits at the last position only (``model(input, **kwargs)[:, -1]``).

    TransformerLens unembeds every position; for a 256k vocabulary (Gemma) the prompt pass
    of a batch of 128 would fill gigabytes with logits nobody reads. The blocks run as
    usual (hooks, KV cache); the final norm, unembedding and soft-cap run on one position."""
    resid = model(input, stop_at_layer=model.cfg.n_layers, **kwargs)[:, -1:]
    return _unembed(model, resid)[:, 0]


def _pad_id(model: HookedTransformer) -> int:
    """What fills generated positions after EOS (the pad token, else EOS)."""
    pad = tokenizer_of(model).pad_token_id
    return tokenizer_of(model).eos_token_id if pad is None else pad


def _greedy_loop(
    model: HookedTransformer,
    logits: torch.Tensor,
    step: Callable,
    max_new_tokens: int,
    choose: Callable = _argmax,
) -> GreedyOutput:
    """Decoding from the prompt pass's last logits (greedy unless ``choose`` samples);
    ``step(next_ids)`` gives the next logits."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = tokenizer_of(model).eos_token_id, _pad_id(model)
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
        return _greedy_loop(model, logits, _cached_step(model, cache), max_new_tokens)
    seq = [tokens, attention_mask]

    def step(nxt: torch.Tensor) -> torch.Tensor:
        seq[0] = torch.cat([seq[0], nxt[:, None]], 1)
        seq[1] = torch.cat([seq[1], torch.ones_like(nxt[:, None])], 1)
        with model.hooks(fwd_hooks=hooks):
            return last_logits(model, seq[0], attention_mask=seq[1])

    with model.hooks(fwd_hooks=hooks):
        logits = last_logits(model, tokens, attention_mask=attention_mask)
    return _greedy_loop(model, logits, step, max_new_tokens)


# ---------------------------------------------------------------------------- resuming from a layer


def new_kv_cache(model: HookedTransformer, batch: int) -> TransformerLensKeyValueCache:
    from transformer_lens import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


@torch.no_grad()
def embed(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The residual stream entering block 0 (``blocks.0.hook_resid_pre``)."""
    return model(tokens, attention_mask=attention_mask, stop_at_layer=0)


@torch.no_grad()
def run_block(
    model: HookedTransformer,
    resid: torch.Tensor,
    layer: int,
    attention_mask: torch.Tensor,
    cache: TransformerLensKeyValueCache,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Block ``layer`` on a prompt's residual stream, appending its keys/values to ``cache``."""
    return model(
        resid,
        start_at_layer=layer,
        stop_at_layer=layer + 1,
        attention_mask=attention_mask,
        past_kv_cache=cache,
    )


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
    choose = sampler or _argmax
    if keep is None:
        return _greedy_loop(model, logits, _cached_step(model, cache), max_new_tokens, choose)
    rows = keep(logits).nonzero()[:, 0]
    padding = torch.full(
        (logits.shape[0], max_new_tokens), _pad_id(model), dtype=torch.long, device=logits.device
    )
    out = GreedyOutput(padding, logits.float())
    if len(rows):
        sub = select_cache(cache, rows, len(cache.entries), attention_mask[rows])
        out.tokens[rows] = _greedy_loop(
            model, logits[rows], _cached_step(model, sub), max_new_tokens, choose
        ).tokens
    return out
