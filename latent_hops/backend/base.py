"""The contract between latent_hops and a model: ``Backend``, what every analysis receives.

``load_model`` returns a ``Backend``: a handle that holds the TransformerLens model
(``tl``), its tokenizer, the spec it was loaded from and what it can do
(``capabilities``). Analyses speak in sites (``Site``), layers and positions; a backend
turns them into its own mechanism (TransformerLens hook points for the two backends
shipped, ``hooked`` and ``bridge``). A third backend (nnsight, a raw Hugging Face model) is
one new module with a subclass of ``Backend``: nothing else changes.

Conventions the contract fixes:

- the **hidden state of layer l** is the residual stream after block l; layer -1
  (``EMBEDDINGS``) is the embedding output, the stream entering block 0;
- prompts are **left-padded**, so the last column is every prompt's last token (t2);
- **edits** (``Edit``) act on the prompt pass only and touch prompt positions only, so a
  decoding loop without a KV cache may keep them on.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int

from latent_hops.backend.decoding import (
    Decoding,
    GreedyOutput,
    Step,
    Stop,
    argmax,
    greedy_loop,
)
from latent_hops.backend.work import ModelShape, WorkCount
from latent_hops.errors import InputError

EMBEDDINGS = -1
"""Layer index of the embedding output (the residual stream entering block 0)."""

SITE_KINDS = ("resid", "attn_out", "mlp_out", "attn_scores", "attn_pattern")
PER_POSITION = ("resid", "attn_out", "mlp_out")
"""Sites with one vector per position (what ``read_sites`` reads)."""


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


@dataclass(frozen=True)
class Edit:
    """A change of one site's activation on the prompt pass: ``fn(activation) -> activation``
    (the activation as the backend holds it: ``[batch, pos, d_model]`` for hidden states,
    ``[batch, head, query, key]`` for attention scores)."""

    site: Site
    fn: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can do; analyses check these instead of asking which backend."""

    attention_edits: bool
    """Edits of attention scores take effect (attention knockout is possible)."""
    exact_kv_cache: bool
    """Cached decoding equals recomputation (else decoding recomputes, exactly and slower)."""
    resume_skips_lower_layers: bool
    """Resuming a patched row from layer l does not recompute the layers below l."""


class PromptWalk(abc.ABC):
    """A clean prompt pass of one batch, walked up the layers: ``hidden(l)`` gives the clean
    hidden state of layer l (called for l = -1, 0, 1, ... in order), and ``resume`` finishes
    some rows from any layer already reached with their hidden state replaced, then decodes.
    This is how the fast patching engine shares the lower layers of a batch."""

    @abc.abstractmethod
    def hidden(self, layer: int) -> Float[torch.Tensor, "batch pos d_model"]:
        """The clean hidden state of ``layer``."""

    @abc.abstractmethod
    def resume(
        self,
        rows: Int[torch.Tensor, " rows"],
        resid: Float[torch.Tensor, "rows pos d_model"],
        layer: int,
        decoding: Decoding,
    ) -> GreedyOutput:
        """Rows ``rows`` of the batch with the hidden state of ``layer`` replaced by
        ``resid``: the prompt pass finished from block ``layer + 1``, then decoded as
        ``decoding`` says (screened, stopped early)."""

    def resumed(self, from_column: int = 0) -> ResumedRows:
        """A batch of patched rows that share their passes (``ResumedRows``); here each join
        resumes on its own, a backend that can share passes overrides this."""
        return RowsResumedOneByOne(self, from_column)


class ResumedRows(abc.ABC):
    """Patched rows of one ``PromptWalk`` that finish their prompt pass and decode as one
    batch, whatever layer each was patched at: walking up the layers, a row joins (``join``) at the
    layer it patches (rows join in order of their layers), and ``finish`` completes every
    joined row together. Columns before ``from_column`` are patched in no row, so a backend
    may share their clean keys/values instead of recomputing them."""

    def __init__(self, from_column: int):
        self.from_column = from_column

    @abc.abstractmethod
    def __len__(self) -> int:
        """Rows joined so far."""

    @abc.abstractmethod
    def join(
        self,
        rows: Int[torch.Tensor, " rows"],
        resid: Float[torch.Tensor, "rows pos d_model"],
        layer: int,
    ) -> None:
        """Rows ``rows`` of the batch join with the hidden state of ``layer`` replaced by
        ``resid`` (``layer`` never below an earlier join's)."""

    @abc.abstractmethod
    def finish(self, decoding: Decoding) -> GreedyOutput:
        """Every joined row, in join order: its prompt pass finished, then decoded as
        ``decoding`` says (as in ``PromptWalk.resume``)."""


class RowsResumedOneByOne(ResumedRows):
    """``ResumedRows`` for a walk without shared passes: each join is resumed on its own
    (``PromptWalk.resume``) when the rows finish."""

    def __init__(self, walk: PromptWalk, from_column: int):
        super().__init__(from_column)
        self.walk = walk
        self.joins: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def __len__(self) -> int:
        return sum(len(rows) for rows, _, _ in self.joins)

    def join(
        self,
        rows: Int[torch.Tensor, " rows"],
        resid: Float[torch.Tensor, "rows pos d_model"],
        layer: int,
    ) -> None:
        self.joins.append((rows, resid, layer))

    def finish(self, decoding: Decoding) -> GreedyOutput:
        outs, start = [], 0
        for rows, resid, layer in self.joins:
            these = torch.arange(start, start + len(rows))  # the join's rows in the batch
            outs.append(self.walk.resume(rows, resid, layer, decoding.of_rows(these)))
            start += len(rows)
        return GreedyOutput(
            torch.cat([o.tokens for o in outs]), torch.cat([o.first_logits for o in outs])
        )


class Backend(abc.ABC):
    """A loaded model as latent_hops drives it (module docstring). Subclasses implement the
    abstract methods; what is written here holds for any backend."""

    name: ClassVar[str]
    """The backend's name (``"hooked"``, ``"bridge"``): recorded in every table's provenance."""

    def __init__(self, tl: Any, tokenizer: Any, spec: str):
        self.tl = tl  # the underlying model (TransformerLens' for the shipped backends)
        self.tokenizer = tokenizer  # its own Hugging Face tokenizer
        self.spec = spec  # what load_model was given: "toy", a path, a name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r}: {self.n_layers} layers on {self.device}>"

    # ------------------------------------------------------------------ facts

    @property
    @abc.abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abc.abstractmethod
    def d_model(self) -> int: ...

    @property
    @abc.abstractmethod
    def d_vocab(self) -> int: ...

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where inputs go (the first device when blocks are split over several)."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """The longest sequence (prompt + generated tokens) the model runs."""

    @property
    @abc.abstractmethod
    def architecture(self) -> str:
        """The Hugging Face architecture it was built from (``"LlamaForCausalLM"``)."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @functools.cached_property
    def prepends_bos(self) -> bool:
        """Whether prompts start with BOS: the model's own tokenizer's convention."""
        return tokenizer_adds_bos(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """What fills generated positions after EOS and left padding (pad token, else EOS)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        """``layers`` as a list, each checked to lie in [-1, n_layers - 1]."""
        out = [int(x) for x in layers]
        bad = [x for x in out if not EMBEDDINGS <= x < self.n_layers]
        if bad:
            raise InputError(
                f"layers {bad} out of range: this model has layers -1 (embeddings) "
                f"to {self.n_layers - 1}"
            )
        return out

    def decode_loop(
        self,
        logits: torch.Tensor,
        step: Step,
        max_new_tokens: int,
        choose: Callable[[torch.Tensor], torch.Tensor] = argmax,
        stop: Stop | None = None,
    ) -> GreedyOutput:
        """Decoding from a prompt pass's last logits with ``step`` (``decoding.greedy_loop``),
        stopping rows at this tokenizer's EOS (and, with ``stop``, once decided)."""
        eos = self.tokenizer.eos_token_id
        return greedy_loop(eos, self.pad_id, logits, step, max_new_tokens, choose, stop)

    # ------------------------------------------------------------------ reads

    @abc.abstractmethod
    def read_sites(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        positions: Int[torch.Tensor, "batch n_positions"],
        sites: Sequence[Site],
    ) -> Float[torch.Tensor, "batch n_positions n_sites d_model"]:
        """Clean activations of ``sites`` (per-position kinds) at ``positions`` only."""

    @abc.abstractmethod
    def read_attention(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        queries: Int[torch.Tensor, " batch"],
        keys: Int[torch.Tensor, " batch"],
        layers: Sequence[int],
    ) -> Float[torch.Tensor, "batch n_layers heads"]:
        """Attention weight (post-softmax) from column ``queries[b]`` to column ``keys[b]``
        in every head of ``layers``."""

    @abc.abstractmethod
    def unembedding_vectors(self) -> Float[torch.Tensor, "vocab d_model"]:
        """The unembedding matrix as one row per token (float32, CPU)."""

    # ------------------------------------------------------------------ computing

    @abc.abstractmethod
    def project_to_vocab(
        self, acts: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... vocab"]:
        """Log-probabilities of ``acts`` read through the final norm and the unembedding (the
        logit lens), in float32 whatever the model's dtype, with the final soft-cap."""

    @abc.abstractmethod
    def last_logits(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        edits: Sequence[Edit] = (),
    ) -> Float[torch.Tensor, "batch vocab"]:
        """The model's logits at the last position only, ``edits`` active."""

    @abc.abstractmethod
    def greedy_generate(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        max_new_tokens: int = 10,
        edits: Sequence[Edit] = (),
        use_kv_cache: bool = True,
    ) -> GreedyOutput:
        """Greedy decoding of left-padded prompts, stopping each row at EOS; ``edits`` act on
        the prompt pass only. ``use_kv_cache=False`` is the exact reference loop."""

    @abc.abstractmethod
    def walk_prompt(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        last_layer: int,
    ) -> PromptWalk:
        """A clean pass of ``tokens`` to walk up to ``last_layer`` (``PromptWalk``)."""

    @property
    @abc.abstractmethod
    def shape(self) -> ModelShape:
        """The sizes that set its FLOPs (``work.ModelShape``)."""

    def count_work(self) -> contextlib.AbstractContextManager[WorkCount]:
        """A context counting the work its forward passes do inside it (``WorkCount``):
        for benchmarks (work efficiency, MFU). Backends that cannot count refuse."""
        raise InputError(f"the {self.name} backend does not count its work; use --backend hooked")

    @abc.abstractmethod
    def bytes_per_patched_row(self, seq_len: int, new_tokens: int) -> int:
        """Memory one resumed row of the fast engine needs (to size its batches)."""

    @abc.abstractmethod
    def parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Every parameter with its name (what ``weights_fingerprint`` hashes)."""

    # ------------------------------------------------------------------ edits (by site)

    def block_attention(
        self, layers: Sequence[int], mask: Bool[torch.Tensor, "batch query key"]
    ) -> list[Edit]:
        """Edits blocking attention where ``mask[b, q, k]``: pre-softmax scores set to -inf in
        every head of ``layers`` (attention knockout). Refused (InputError) on a model whose
        attention scores cannot be edited (``capabilities.attention_edits``)."""
        if not self.capabilities.attention_edits:
            raise InputError(
                f"attention knockout is not possible on {self.architecture or 'this model'} with "
                f"the {self.name} backend: its attention ignores edits of the attention scores "
                "(the bridge leaves attention to the Hugging Face module). Use --backend hooked "
                "(TransformerLens 3.x).",
                code="capability",
            )

        def block(scores: torch.Tensor) -> torch.Tensor:
            # prompt positions only: a decoding loop without a KV cache reruns longer sequences
            q, k = scores.shape[-2:]
            edges = mask[:, :q, :k].to(scores.device)
            edges = torch.nn.functional.pad(edges, (0, k - edges.shape[-1], 0, q - edges.shape[-2]))
            return scores.masked_fill(edges[:, None], float("-inf"))

        return [Edit(Site("attn_scores", layer), block) for layer in self.check_layers(layers)]

    @torch.no_grad()
    def weights_fingerprint(self, samples: int = 4096) -> str:
        """A SHA-256 over every parameter's name, shape, dtype and ``samples`` evenly strided
        values: two checkpoints that differ anywhere in a sampled value differ here, and a 7B
        model is fingerprinted in well under a second (hashing every byte takes minutes)."""
        digest = hashlib.sha256()
        for name, param in sorted(self.parameters(), key=lambda item: item[0]):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
            digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
        return digest.hexdigest()


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the Hugging Face tokenizer itself starts its encodings with the BOS token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def free_memory_mb(device: str | torch.device) -> float | None:
    """Free memory of a CUDA device in MiB (None on CPU, where a fixed budget applies),
    counting what torch's allocator holds unused (say, a converted model's source weights,
    freed but cached) as free: torch gives it back to whatever allocates next."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) / 2**20
