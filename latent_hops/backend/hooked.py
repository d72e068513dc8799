"""The ``hooked`` backend: TransformerLens 3.x ``HookedTransformer``.

Weights are converted with TL's own converters (``architectures``), and the back-patching
engine resumes a forward pass from any layer with TL's own KV cache, so layers below a
patch are never recomputed.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from latent_hops.backend.architectures import (
    DEFAULT_MAX_CONTEXT,
    FAMILIES,
    family,
    tl_config_fields,
)
from latent_hops.backend.base import (
    EMBEDDINGS,
    Capabilities,
    Edit,
    PromptWalk,
    ResumedRows,
    Site,
    tokenizer_adds_bos,
)
from latent_hops.backend.decoding import (
    Decoding,
    GreedyOutput,
    Step,
    recompute_step,
    screened,
)
from latent_hops.backend.hooked_cache import KVEntry, cache_rows, reuse_rotated_keys
from latent_hops.backend.tl import Hook, TransformerLensBackend, as_hooks, hook_name
from latent_hops.backend.work import WorkCount

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
) -> HookedTransformerConfig:
    """TransformerLens config for a Hugging Face config, read from the config itself (see
    ``architectures``); ``n_ctx`` is capped at ``max_context`` (None: the model's own)."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        **tl_config_fields(hf_config, max_context),
        dtype=dtype,
        device=device,
        init_weights=False,  # the weights come from the HF model
        model_name=getattr(hf_config, "_name_or_path", "") or hf_config.architectures[0],
    )


def _new_hooked(cfg: HookedTransformerConfig, tokenizer: Any) -> HookedTransformer:
    with warnings.catch_warnings():
        # TL 3.9 warns at construction that HookedTransformer is deprecated in favour of
        # TL 4's TransformerBridge; we pin TL 3 on purpose (see this module's docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer

        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


def _store_as(param: Any, order: tuple[int, ...]) -> None:
    """Keeps ``param``'s values but stores them so that ``param.permute(order)`` is
    contiguous."""
    stored = param.data.permute(order).contiguous()
    param.data = stored.permute(tuple(sorted(range(len(order)), key=order.__getitem__)))


def lay_out_weights(model: HookedTransformer) -> None:
    """Stores the weights in the layout TransformerLens' forward rearranges them into. TL 3.9
    copies the projections into ``F.linear``'s layout on every call (``W_U.T.contiguous()``:
    113 MB for SmolLM2's unembedding, per decoding step; the gated MLP's three matrices and
    the attention's per block); stored that way, each copy is a no-op and returns the same
    layout as before, so every number is unchanged (the products see identical operands)."""
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):  # [head, d_model, d_head]
            if name in attn._parameters:
                _store_as(attn._parameters[name], (0, 2, 1))  # read as [(head d_head), d_model]
        _store_as(attn.W_O, (2, 0, 1))  # [head, d_head, d_model] read as [d_model, (head d_head)]
        if "W_gate" in mlp._parameters:  # gated MLPs read [in, out] weights as .T.contiguous()
            for name in ("W_gate", "W_in", "W_out"):
                _store_as(mlp._parameters[name], (1, 0))
    _store_as(model.unembed.W_U, (1, 0))


def _grouped_scores(
    attn: Any,
    q: Float[torch.Tensor, "batch query head d_head"],
    k: Float[torch.Tensor, "batch key kv_head d_head"],
) -> Float[torch.Tensor, "batch head query key"]:
    """``GroupedQueryAttention.calculate_attention_scores`` without copying each key/value
    head once per query head it serves: one product per place in a group of query heads,
    each reading the key heads in place (TL's own products, head by head)."""
    b, n_q, n_heads, d = q.shape
    kv = k.shape[2]
    grouped = q.reshape(b, n_q, kv, n_heads // kv, d).permute(3, 0, 2, 1, 4)  # [group, b, kv, q, d]
    keys = k.permute(0, 2, 3, 1)  # [b, kv, d_head, key]
    scores = torch.stack([member @ keys for member in grouped], dim=2)  # [b, kv, group, q, key]
    scores = scores.reshape(b, n_heads, n_q, -1) / attn.attn_scale
    cap = attn.cfg.attn_scores_soft_cap
    return cap * torch.tanh(scores / cap) if cap and cap > 0 else scores


def _grouped_z(
    attn: Any,
    v: Float[torch.Tensor, "batch key kv_head d_head"],
    pattern: Float[torch.Tensor, "batch head query key"],
) -> Float[torch.Tensor, "batch query head d_head"]:
    """``GroupedQueryAttention.calculate_z_scores`` without expanding the values (as above)."""
    b, n_heads, n_q, n_k = pattern.shape
    kv = v.shape[2]
    grouped = pattern.reshape(b, kv, -1, n_q, n_k)  # [b, kv, group, query, key]
    values = v.permute(0, 2, 1, 3)  # [b, kv, key, d_head]
    z = torch.stack([grouped[:, :, j] @ values for j in range(grouped.shape[2])], dim=2)
    return attn.hook_z(z.reshape(b, n_heads, n_q, -1).permute(0, 2, 1, 3))


def share_key_value_heads(model: HookedTransformer) -> None:
    """Grouped-query attention without TL 3.9's ``repeat_interleave`` of keys and values to
    every query head (a strided copy of the whole KV cache per block and decoding step: up
    to a third of a SmolLM2 sweep's time). The same products on the same operands, head by
    head, with the same hooks (``hook_attn_scores``, ``hook_pattern``, ``hook_z``) where they
    were: TL's numbers bit for bit wherever BLAS runs the same kernel for both, as in every
    shape the tests try. BLAS picks its kernel by the batch's shape, for TL's own attention
    too, so a greedy token at a near-tie can differ: 1 of SmolLM2's 2,610 cells of a case
    ends differently with TL's own attention alone and in a batch of hundreds, and in that batch
    with TL's attention and with this one. (One product per group of query heads, as
    before, differed from TL's in one-row decoding steps.)"""
    from transformer_lens.components import GroupedQueryAttention

    for block in model.blocks:
        attn = block.attn
        if (
            isinstance(attn, GroupedQueryAttention)
            and not model.cfg.ungroup_grouped_query_attention
        ):
            # instance attributes, in front of the class's methods (the hooked forward calls them)
            attn.calculate_attention_scores = types.MethodType(_grouped_scores, attn)  # type: ignore[method-assign]
            attn.calculate_z_scores = types.MethodType(_grouped_z, attn)  # type: ignore[method-assign]


class HookedBackend(TransformerLensBackend):
    """TransformerLens' ``HookedTransformer``: resumes from any layer without recomputing the
    layers below (TL's own KV cache)."""

    name = "hooked"
    tl: HookedTransformer
    _work: WorkCount | None = None  # counting (count_work) while set

    def __init__(self, tl: HookedTransformer, tokenizer: Any, spec: str):
        super().__init__(tl, tokenizer, spec)
        lay_out_weights(tl)
        share_key_value_heads(tl)
        reuse_rotated_keys(tl)

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
        with torch.device(device) if n_devices == 1 else contextlib.nullcontext():
            model = _new_hooked(cfg, tokenizer)  # on the device: no copy of the weights on the CPU
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

    def bytes_per_patched_row(self, seq_len: int, new_tokens: int) -> int:
        """As for any TransformerLens model, plus the rotated keys that a ``KVEntry`` keeps
        beside the cache on a rotary model (``reuse_rotated_keys``)."""
        row = super().bytes_per_patched_row(seq_len, new_tokens)
        cfg = self.tl.cfg
        if cfg.positional_embedding_type != "rotary":
            return row
        keys = cfg.n_layers * (seq_len + new_tokens) * (cfg.n_key_value_heads or cfg.n_heads)
        return row + keys * cfg.d_head * torch.finfo(cfg.dtype).bits // 8

    @contextlib.contextmanager
    def count_work(self) -> Iterator[WorkCount]:
        """Counts every block's queries and (query, key) pairs at its attention scores
        (padding included) and every position ``_unembed`` reads."""
        work = WorkCount()

        def count(scores: torch.Tensor, hook: Any) -> None:  # [batch, head, query, key]
            batch, _, queries, keys = scores.shape
            work.block_tokens += batch * queries
            work.block_calls += 1
            work.attention_pairs += batch * queries * keys

        hooks: list[Hook] = [
            (hook_name(Site("attn_scores", layer)), count) for layer in range(self.n_layers)
        ]
        self._work = work
        try:
            with self.tl.hooks(fwd_hooks=hooks):
                yield work
        finally:
            self._work = None

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
        if self._work is not None:
            self._work.unembedded += resid.shape[0] * resid.shape[1]
        normed = tl.ln_final(resid) if tl.cfg.normalization_type is not None else resid
        logits = normed.float() @ tl.W_U.float() + tl.b_U.float() if fp32 else _unembed(tl, normed)
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

    def _new_cache(self, batch: int, room: int | None = None) -> TransformerLensKeyValueCache:
        """An empty cache; with ``room``, one for decoding: ``room`` positions (prompt and
        new tokens) preallocated (``_entry``)."""
        from transformer_lens import TransformerLensKeyValueCache

        cache = TransformerLensKeyValueCache.init_cache(self.tl.cfg, self.tl.cfg.device, batch)
        if room is not None:
            cache.entries = [
                self._entry([e.past_keys], [e.past_values], room) for e in cache.entries
            ]
        return cache

    kv_entries: bool = True
    """Decoding caches of ``KVEntry`` (False: TL's own entries, the reference that tests
    compare them with)."""

    def _entry(self, keys: list[torch.Tensor], values: list[torch.Tensor], room: int) -> Any:
        """A decoding cache entry holding the rows of ``keys`` and ``values`` in turn, with
        room for ``room`` more positions."""
        if self.kv_entries:
            return KVEntry(keys, values, room)
        from transformer_lens import TransformerLensKeyValueCacheEntry

        return TransformerLensKeyValueCacheEntry(torch.cat(keys), torch.cat(values))

    def _cached_step(self, cache: TransformerLensKeyValueCache) -> Step:
        def step(nxt: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
            nonlocal cache
            if kept is not None:
                cache = cache_rows(cache, kept)
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
            cache = self._new_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens)
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


UNEMBED_CHUNK = 2048
"""Vocabulary rows per product of the unembedding on a CPU (``_unembed``)."""


def _unembed(
    tl: HookedTransformer, normed: torch.Tensor, chunk: int = UNEMBED_CHUNK
) -> torch.Tensor:
    """``tl.unembed`` (its hooks included), the same numbers, faster: without adding a bias
    of zeros (most models have none, and TL's zeros cost a write of the whole logits tensor),
    and on a CPU ``chunk`` vocabulary rows per product, whose logits stay in cache while
    they are written (one product over SmolLM2's 49,152 rows runs 20-35% slower). Each
    logit is the same dot product either way (BLAS runs a different kernel on products of
    fewer than 16 rows: no chunk is shorter than ``chunk``)."""
    unembed = tl.unembed
    x = unembed.hook_in(normed)
    weight = unembed.W_U.T.contiguous()  # [vocab, d_model]: no copy (lay_out_weights)
    bias = unembed.b_U if bool(unembed.b_U.any()) else None
    if x.device.type != "cpu" or len(weight) <= chunk:
        return unembed.hook_out(torch.nn.functional.linear(x, weight, bias))
    logits = x.new_empty(*x.shape[:-1], len(weight))
    starts = range(0, len(weight) - chunk + 1, chunk)  # the last chunk takes the remainder
    for start, end in zip(starts, [*starts[1:], len(weight)]):
        logits[..., start:end] = torch.nn.functional.linear(
            x, weight[start:end], None if bias is None else bias[start:end]
        )
    return unembed.hook_out(logits)


class HookedWalk(PromptWalk):
    """A clean prompt pass walked block by block, keeping each layer's hidden state and the
    keys/values of the blocks run so far, which resumed rows share (``HookedRows``)."""

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
        self.states: list[torch.Tensor] = []  # hidden states of layers -1, 0, 1, ... so far

    @torch.no_grad()
    def hidden(self, layer: int) -> Float[torch.Tensor, "batch pos d_model"]:
        """The clean hidden state of ``layer``, running the blocks up to it not yet run."""
        tl = self.model.tl
        while len(self.states) <= layer + 1:
            block = len(self.states) - 1  # the next block to run (-1: the embeddings)
            if block < 0:
                resid = tl(self.tokens, attention_mask=self.attention_mask, stop_at_layer=0)
            else:
                resid = tl(
                    self.states[-1],
                    start_at_layer=block,
                    stop_at_layer=block + 1,
                    attention_mask=self.attention_mask,
                    past_kv_cache=self.cache,
                )
            self.states.append(resid)
        return self.states[layer + 1]

    def resumed(self, from_column: int = 0) -> HookedRows:
        return HookedRows(self, from_column)

    @torch.no_grad()
    def resume(
        self,
        rows: Int[torch.Tensor, " rows"],
        resid: Float[torch.Tensor, "rows pos d_model"],
        layer: int,
        decoding: Decoding,
    ) -> GreedyOutput:
        group = self.resumed()
        group.join(rows, resid, layer)
        return group.finish(decoding)


class HookedRows(ResumedRows):
    """Patched rows that share forward passes: a row joined at layer t runs blocks t+1, t+2,
    ... in one batch with every row joined before it, on columns ``from_column`` onwards only
    (the columns before are unpatched in every row, so their keys/values are the clean
    ones, read from the walk's cache); all rows then decode together. A row's keys/values are
    the clean ones up to its patched layer and its own above it."""

    def __init__(self, walk: HookedWalk, from_column: int):
        super().__init__(from_column)
        self.walk = walk
        device = walk.tokens.device
        self.base = torch.zeros(0, dtype=torch.long, device=device)  # rows of the walk's batch
        self.resid: torch.Tensor | None = None  # [rows, columns from from_column, d_model]
        self.layer = EMBEDDINGS - 1  # the layer self.resid is the hidden state of
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> rows that ran it

    def __len__(self) -> int:
        return len(self.base)

    @torch.no_grad()
    def join(
        self,
        rows: Int[torch.Tensor, " rows"],
        resid: Float[torch.Tensor, "rows pos d_model"],
        layer: int,
    ) -> None:
        if layer < self.layer:
            raise ValueError(f"rows join in order of layers: {layer} after {self.layer}")
        self._run_up_to(layer)
        tail = resid[:, self.from_column :]
        self.resid = tail if self.resid is None else torch.cat([self.resid, tail])
        self.base = torch.cat([self.base, rows.to(self.base.device)])
        self.layer = layer

    def _run_up_to(self, layer: int) -> None:
        """Blocks self.layer + 1 .. ``layer`` on the rows joined so far."""
        if self.resid is None:
            self.layer = layer
            return
        from transformer_lens import TransformerLensKeyValueCache

        tl, mask = self.walk.model.tl, self.walk.attention_mask[self.base]
        for block in range(self.layer + 1, layer + 1):
            self.walk.hidden(block)  # the clean keys/values of this block
            clean = self.walk.cache.entries[block]
            base = self.base.to(clean.past_keys.device)  # blocks may live on other GPUs
            entry = type(clean)(
                past_keys=clean.past_keys[base, : self.from_column],
                past_values=clean.past_values[base, : self.from_column],
            )
            cache = TransformerLensKeyValueCache(
                entries=[entry] * len(self.walk.cache.entries), previous_attention_mask=mask
            )  # only block `block` runs, and reads its entry
            self.resid = tl(
                self.resid,
                start_at_layer=block,
                stop_at_layer=block + 1,
                attention_mask=mask,
                past_kv_cache=cache,
            )
            self.kv[block] = (entry.past_keys, entry.past_values)
        self.layer = layer

    def _decoding_cache(self, rows: torch.Tensor, room: int) -> TransformerLensKeyValueCache:
        """The keys/values of joined rows ``rows`` (ascending), with room for ``room`` new
        tokens: each row's own for the blocks it ran, the clean ones below."""
        from transformer_lens import TransformerLensKeyValueCache

        walk = self.walk
        walk.hidden(walk.model.n_layers - 1)
        entries = []
        for block, clean in enumerate(walk.cache.entries):
            ran = self.kv.get(block)
            n = 0 if ran is None else len(ran[0])  # rows joined below `block` come first
            index = rows.to(clean.past_keys.device)  # blocks may live on other GPUs
            own, shared = index[index < n], self.base.to(index.device)[index[index >= n]]
            keys, values = [clean.past_keys[shared]], [clean.past_values[shared]]
            if ran is not None and len(own):
                keys, values = [ran[0][own], *keys], [ran[1][own], *values]
            entries.append(walk.model._entry(keys, values, room))
        mask = walk.attention_mask[self.base[rows.to(self.base.device)]]
        return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)

    @torch.no_grad()
    def finish(self, decoding: Decoding) -> GreedyOutput:
        if self.resid is None:
            raise ValueError("no rows joined")
        model = self.walk.model
        self._run_up_to(model.n_layers - 1)
        logits = model._unembed(self.resid[:, -1:])[:, 0]

        def decode(rows: torch.Tensor, decoding: Decoding) -> torch.Tensor:
            step = model._cached_step(self._decoding_cache(rows, decoding.max_new_tokens))
            max_new, choose, stop = decoding.max_new_tokens, decoding.choose, decoding.stop
            return model.decode_loop(logits[rows], step, max_new, choose, stop).tokens

        return screened(model.pad_id, logits, decoding, decode)
