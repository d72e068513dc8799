"""Fast back-patching engine vs the naive reference, side by side on the same queries.

    python scripts/bench_backpatch.py [--model toy] [--cases 8] [--threads 1]
    python scripts/bench_backpatch.py --model smollm2-135m --dataset world --cases 1 \
        --positions t1 --kinds back
    python scripts/bench_backpatch.py --model smollm2-135m --dataset world --cases 2 \
        --layers every:3
    python scripts/bench_backpatch.py --random llama-7b --dtype bfloat16 --device cuda \
        --layers every:4

``--backend hooked,bridge`` times the fast engine on each TransformerLens backend, side by
side on the same cells (alternating, best of ``--repeats``), checks that their generations are
identical and prints the bridge / hooked time ratio; the naive reference runs on the first.

    python scripts/bench_backpatch.py --backend hooked,bridge --threads 1

``--random SHAPE`` times a randomly initialised model of a published shape (built on the
device, no download; the toy dataset and tokenizer supply the prompts): generations are
meaningless, cells/s and memory are not.

Runs both engines over every (source, target) cell of the chosen kinds and positions, checks
that their generations are identical, and prints cells/second, the speedup and peak
memory (process RSS; on CUDA also torch's peak allocation).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import AutoTokenizer, LlamaConfig

from latent_hops import backend, load_dataset, load_model
from latent_hops.analyses.backpatch import BackpatchConfig, prepare_cases, sweep, sweep_naive
from latent_hops.models import toy_checkpoint_dir
from latent_hops.positions import parse_layers

# published shapes (Llama-2-7B, Llama-3-8B, Llama-3.2-1B), for --random
SHAPES = {
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


def random_model(shape: str, device: str | None, dtype: str | None, backend_name: str):
    hf_config = LlamaConfig(**SHAPES[shape], architectures=["LlamaForCausalLM"])
    tokenizer = AutoTokenizer.from_pretrained(toy_checkpoint_dir("toy"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_ = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        dtype or "float32", torch.float32
    )
    return backend.random_model(hf_config, tokenizer, dtype_, device, backend=backend_name)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, model, cases, config):
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(model, cases, config)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return result, time.perf_counter() - start, gpu


def compare_backends(models: dict, table, config: BackpatchConfig, repeats: int) -> None:
    """The fast engine on each backend, alternating, best of ``repeats``; generations must
    be identical across backends."""
    cases = {name: prepare_cases(m, table, config)[0] for name, m in models.items()}
    for name, m in models.items():
        sweep(m, cases[name][:1], config)  # warm-up
    best: dict[str, float] = {}
    results = {}
    for _ in range(repeats):
        for name, m in models.items():
            results[name], seconds, _ = timed(sweep, m, cases[name], config)
            best[name] = min(best.get(name, float("inf")), seconds)
    first, *others = models
    n = len(results[first])
    for name in others:
        same = int((results[name].generation.values == results[first].generation.values).sum())
        print(
            f"backend {name}: {best[name]:.2f}s vs {first}: {best[first]:.2f}s (best of "
            f"{repeats}) -> ratio {best[name] / best[first]:.2f}x; identical generations "
            f"{same}/{n}"
        )
        if same < n:
            raise SystemExit(f"{name} and {first} generations differ in {n - same} of {n} rows")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy")
    parser.add_argument(
        "--random",
        choices=sorted(SHAPES),
        default=None,
        help="time a random model of this shape instead of --model (toy dataset and tokenizer)",
    )
    parser.add_argument("--dataset", default="toy")
    parser.add_argument(
        "--split", default=None, help="default: test_id for the toy dataset, all for others"
    )
    parser.add_argument("--positions", default="t1,t2")
    parser.add_argument("--kinds", default="back,forward,random")
    parser.add_argument(
        "--layers", default=None, help="a layer grid for sources and targets (e.g. every:3)"
    )
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto, hooked, bridge, or a list (hooked,bridge) to time side by side",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timings per backend (best)")
    parser.add_argument(
        "--no-naive",
        action="store_true",
        help="time the fast engine only (best of --repeats), e.g. to compare environments",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="default: half the free CUDA memory, 1024 MB on CPU",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [backend.resolve_backend(b) for b in args.backend.split(",")]
    models = {}
    for name in names:
        if args.random:
            models[name] = random_model(args.random, args.device, args.dtype, name)
        else:
            models[name] = load_model(
                args.model, device=args.device, dtype=args.dtype, backend=name
            )
    if args.random:
        args.model, args.dataset = f"random {args.random}", "toy"
    model = models[names[0]]
    table = load_dataset(args.dataset)
    split = args.split or ("test_id" if args.dataset == "toy" else None)
    if split:
        table = table[table.split == split]
    positions, kinds = tuple(args.positions.split(",")), tuple(args.kinds.split(","))
    grid = parse_layers(args.layers, model.cfg.n_layers)
    config = BackpatchConfig(
        positions=positions,
        kinds=kinds,
        memory_budget_mb=args.memory_budget_mb,
        source_layers=grid,
        target_layers=grid,
    )
    cases, _ = prepare_cases(model, table.iloc[: args.cases], config)
    sweep(model, cases[:1], config)  # warm-up
    fast, t_fast, gpu_fast = timed(sweep, model, cases, config)
    rss_fast = peak_rss_mb()
    if args.no_naive:
        for _ in range(args.repeats - 1):
            t_fast = min(t_fast, timed(sweep, model, cases, config)[1])
        print(
            f"{backend.backend_of(model)} backend, {len(fast)} patched generations: fast engine "
            f"{t_fast:.2f}s (best of {args.repeats}), {len(fast) / t_fast:.1f} cells/s"
        )
        return
    naive, t_naive, gpu_naive = timed(sweep_naive, model, cases, config)
    same_rows = int((fast.generation.values == naive.generation.values).sum())
    n = len(fast)
    print(
        f"model {args.model} ({backend.backend_of(model)} backend): "
        f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
        f"{model.cfg.device}, "
        f"{model.cfg.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"{len(cases)} cases x {len(positions)} positions x "
        f"{n // max(1, len(positions) * len(cases))} cells "
        f"({','.join(kinds)}) = {n} patched generations"
    )
    print(
        f"naive: {t_naive:8.2f}s  {n / t_naive:9.1f} cells/s"
        + (f"  peak GPU {gpu_naive:.0f} MB" if gpu_naive else "")
    )
    print(
        f"fast:  {t_fast:8.2f}s  {n / t_fast:9.1f} cells/s"
        + (f"  peak GPU {gpu_fast:.0f} MB" if gpu_fast else "")
    )
    print(
        f"speedup {t_naive / t_fast:.1f}x; identical generations: {same_rows}/{n}; peak RSS "
        f"{peak_rss_mb():.0f} MB "
        f"(after the fast engine: {rss_fast:.0f} MB)"
    )
    if len(names) > 1:
        compare_backends(models, table.iloc[: args.cases], config, args.repeats)
    if same_rows < n:
        # fp32 must match exactly; bf16/fp16 kernels round differently at different batch sizes, and
        # a random model's near-flat logits turn that into different greedy tokens
        message = f"fast and naive generations differ in {n - same_rows} of {n} rows"
        if model.cfg.dtype == torch.float32:
            raise SystemExit(message)
        print(f"warning: {message} ({model.cfg.dtype}: batch-dependent rounding)")


if __name__ == "__main__":
    main()
