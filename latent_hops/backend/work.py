"""How much arithmetic a model's forward passes do: its shape (``ModelShape``), the work
counted while it runs (``WorkCount``: tokens through blocks, attention pairs, rows
unembedded), their FLOPs, and the device's own matmul rate to set them against (MFU).

FLOPs count multiply-adds as 2 and only the matrix products (projections, MLP, attention
scores and values, unembedding); norms, rotary and softmax are left out, as is usual for MFU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a transformer's FLOPs."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    gated_mlp: bool
    d_vocab: int

    @property
    def block_flops_per_token(self) -> int:
        """One token through one block, attention over the context aside."""
        q_and_out = 2 * self.d_model * self.n_heads * self.d_head
        kv = 2 * self.d_model * self.n_kv_heads * self.d_head
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp
        return 2 * (q_and_out + kv + mlp)

    @property
    def flops_per_attention_pair(self) -> int:
        """One (query, key) pair in one block: its score and its share of the values."""
        return 4 * self.n_heads * self.d_head

    @property
    def unembed_flops(self) -> int:
        return 2 * self.d_model * self.d_vocab


@dataclass
class WorkCount:
    """Work done by forward passes: ``block_tokens`` = tokens through one block (summed over
    blocks and rows), ``attention_pairs`` = (query, key) pairs attended (summed likewise),
    ``unembedded`` = positions read through the unembedding, ``block_calls`` = forward
    calls of a block (its products run once per call, on that call's tokens)."""

    block_tokens: int = 0
    attention_pairs: int = 0
    unembedded: int = 0
    block_calls: int = 0

    def add(self, other: WorkCount) -> WorkCount:
        return WorkCount(
            self.block_tokens + other.block_tokens,
            self.attention_pairs + other.attention_pairs,
            self.unembedded + other.unembedded,
            self.block_calls + other.block_calls,
        )

    @property
    def rows_per_product(self) -> float:
        """Tokens per block call: the row count of the average projection's product, which
        sets how fast BLAS runs it (small products run far below the device's peak)."""
        return self.block_tokens / self.block_calls if self.block_calls else 0.0

    def flops(self, shape: ModelShape) -> int:
        return (
            self.block_tokens * shape.block_flops_per_token
            + self.attention_pairs * shape.flops_per_attention_pair
            + self.unembedded * shape.unembed_flops
        )


def _best_rate(
    run: Callable[[], object], flops: int, device: torch.device, seconds: float
) -> float:
    """``flops`` over the best time of ``run`` (after a warm-up), repeated for about
    ``seconds``."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best, spent = float("inf"), 0.0
    run()  # warm-up
    sync()
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        run()
        sync()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return flops / best


def matmul_flops_per_s(
    device: str | torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0
) -> float:
    """The rate of a large square matrix product on ``device`` in ``dtype``, best of the
    repeats run in about ``seconds``: what the hardware does at best, measured in this process
    (so the threads and clocks are the ones the sweep gets)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return _best_rate(lambda: torch.mm(a, b), 2 * size**3, device, seconds)


def projection_flops_per_s(
    rows: int,
    d_in: int,
    d_out: int,
    device: str | torch.device,
    dtype: torch.dtype,
    seconds: float = 1.0,
) -> float:
    """The rate of a model's projection (``F.linear``, [rows, d_in] by [d_out, d_in]
    weights) on ``rows`` rows, as a forward pass runs it: one weight after another, enough
    distinct ones (256 MB) that none is still cached when its turn comes again. Best of the
    rounds run in about ``seconds``; what the device does on products of this size."""
    device = torch.device(device)
    size = d_in * d_out * torch.finfo(dtype).bits // 8
    weights = [
        torch.randn(d_out, d_in, device=device, dtype=dtype)
        for _ in range(min(64, max(2, -(-(2**28) // size))))
    ]
    x = torch.randn(rows, d_in, device=device, dtype=dtype)

    def run() -> None:
        for w in weights:
            torch.nn.functional.linear(x, w)

    return _best_rate(run, 2 * rows * d_in * d_out * len(weights), device, seconds)
