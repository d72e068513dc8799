"""Times the fast back-patching engine of whichever ``latent_hops`` is importable, on one
workload; prints one JSON line. ``bench_backpatch.py --baseline REF`` runs it with an older
commit's package on ``PYTHONPATH`` to time that engine side by side with today's, so it
uses only what every version since the Backend redesign has.

    python scripts/time_sweep.py --model toy --cases 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from transformers import AutoTokenizer, LlamaConfig

# published shapes (Llama-2-7B, Llama-3-8B, Llama-3.2-1B), for --random; llama-tiny (4 layers,
# grouped-query attention, the toy tokenizer's vocabulary) checks the --random path anywhere
SHAPES = {
    "llama-tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama3-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load(args: argparse.Namespace, backend_name: str = "auto"):
    """The model of ``--model`` or ``--random`` (a randomly initialised published shape, built
    on the device: the toy tokenizer supplies the prompts' tokens)."""
    from latent_hops import load_model
    from latent_hops.backend import BACKENDS, resolve_backend
    from latent_hops.models import toy_checkpoint_dir

    if args.random is None:
        return load_model(args.model, device=args.device, dtype=args.dtype, backend=backend_name)
    hf_config = LlamaConfig(**SHAPES[args.random], architectures=["LlamaForCausalLM"])
    tokenizer = AutoTokenizer.from_pretrained(toy_checkpoint_dir("toy"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or "float32"]
    return BACKENDS[resolve_backend(backend_name)].random(hf_config, tokenizer, dtype, device)


def workload_cases(model, args: argparse.Namespace, config):
    from latent_hops import load_dataset
    from latent_hops.analyses.backpatch import prepare_cases

    dataset = "toy" if args.random else args.dataset
    table = load_dataset(dataset)
    split = args.split or ("test_id" if dataset == "toy" else None)
    if split:
        table = table[table.split == split]
    return prepare_cases(model, table.iloc[: args.cases], config)[0]


def workload_config(model, args: argparse.Namespace, **extra):
    from latent_hops.analyses.backpatch import BackpatchConfig
    from latent_hops.positions import parse_layers

    grid = parse_layers(args.layers, model.n_layers)
    return BackpatchConfig(
        positions=tuple(args.positions.split(",")),
        kinds=tuple(args.kinds.split(",")),
        memory_budget_mb=args.memory_budget_mb,
        source_layers=grid,
        target_layers=grid,
        **extra,
    )


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="toy")
    parser.add_argument("--random", choices=sorted(SHAPES), default=None)
    parser.add_argument("--dataset", default="toy")
    parser.add_argument("--split", default=None)
    parser.add_argument("--positions", default="t1,t2")
    parser.add_argument("--kinds", default="back,forward,random")
    parser.add_argument("--layers", default=None, help="a layer grid (every:3); default all")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--memory-budget-mb", type=float, default=None)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_arguments(parser)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from latent_hops.analyses.backpatch import all_cells, sweep

    model = load(args)
    config = workload_config(model, args)
    cases = workload_cases(model, args, config)
    sweep(model, cases[:1], replace(config, cells=(all_cells(model, config)[0],)))  # warm-up
    best, rows = float("inf"), 0
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        rows = len(sweep(model, cases, config))
        synchronize()
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"seconds": best, "generations": rows, "cases": len(cases)}))


if __name__ == "__main__":
    main()
