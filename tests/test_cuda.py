"""On a GPU: the engine's equalities hold on CUDA in fp32 and bf16, batches are sized from
free device memory, and multi-GPU requests are checked. Skipped without CUDA (CI has none);
run on a lent GPU machine with ``pytest -m cuda``."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from latent_hops import load_dataset, load_model
from latent_hops.analyses.backpatch import (
    BackpatchConfig,
    prepare_cases,
    rows_per_batch,
    sweep,
    sweep_naive,
)
from latent_hops.models import ModelLoadError

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def table():
    data = load_dataset("toy")
    return data[data.split == "test_id"].iloc[:4]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_engine_equals_naive_on_cuda(table, dtype):
    model = load_model("toy", device="cuda", dtype=dtype)
    config = BackpatchConfig(source_layers=(1, 4, 7), target_layers=(0, 3, 6))
    cases, skipped = prepare_cases(model, table, config)
    assert skipped.empty
    naive, fast = sweep_naive(model, cases, config), sweep(model, cases, config)
    pd.testing.assert_frame_equal(naive.drop(columns="e3_logprob"), fast.drop(columns="e3_logprob"))


def test_cuda_fp32_equals_cpu(table):
    config = BackpatchConfig(source_layers=(2, 5), target_layers=(1, 4))
    results = []
    for device in ("cpu", "cuda"):
        model = load_model("toy", device=device)
        cases, _ = prepare_cases(model, table, config)
        results.append(sweep(model, cases, config))
    pd.testing.assert_frame_equal(results[0].drop(columns="e3_logprob"), results[1].drop(columns="e3_logprob"))


def test_bf16_unembedding_runs_in_fp32():
    model = load_model("toy", device="cuda", dtype="bfloat16")
    acts = torch.randn(3, model.tl.cfg.d_model, device="cuda", dtype=torch.bfloat16)
    assert model.project_to_vocab(acts).dtype == torch.float32


def test_batches_sized_from_free_memory():
    model = load_model("toy", device="cuda")
    free = rows_per_batch(model, 20, BackpatchConfig())
    fixed = rows_per_batch(model, 20, BackpatchConfig(memory_budget_mb=1024.0))
    assert free > fixed  # a GPU with more than 2 GB free


def test_more_devices_than_the_machine_has_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="CUDA devices"):
        load_model("toy", device="cuda", n_devices=torch.cuda.device_count() + 1)
