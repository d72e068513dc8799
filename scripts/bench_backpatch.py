"""Fast back-patching engine vs the naive reference, side by side on the same queries.

    python scripts/bench_backpatch.py [--model toy] [--cases 8] [--threads 1]
    python scripts/bench_backpatch.py --model smollm2-135m --dataset world --cases 1 --positions t1 --kinds back
    python scripts/bench_backpatch.py --model smollm2-135m --dataset world --cases 2 --layers every:3

Runs both engines over every (source, target) cell of the chosen kinds and positions, checks
that their generations are identical, and prints cells/second, the speedup and peak
memory (process RSS; on CUDA also torch's peak allocation).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from latent_hops import load_dataset, load_model
from latent_hops.backpatch import BackpatchConfig, prepare_cases, sweep, sweep_naive
from latent_hops.positions import parse_layers


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--dataset", default="toy")
    parser.add_argument("--split", default=None, help="default: test_id for the toy dataset, all for others")
    parser.add_argument("--positions", default="t1,t2")
    parser.add_argument("--kinds", default="back,forward,random")
    parser.add_argument("--layers", default=None, help="a layer grid for sources and targets (e.g. every:3)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--memory-budget-mb", type=float, default=1024.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    table = load_dataset(args.dataset)
    split = args.split or ("test_id" if args.dataset == "toy" else None)
    if split:
        table = table[table.split == split]
    positions, kinds = tuple(args.positions.split(",")), tuple(args.kinds.split(","))
    grid = parse_layers(args.layers, model.cfg.n_layers)
    config = BackpatchConfig(positions=positions, kinds=kinds, memory_budget_mb=args.memory_budget_mb,
                             source_layers=grid, target_layers=grid)
    cases, _ = prepare_cases(model, table.iloc[: args.cases], config)
    sweep(model, cases[:1], config)  # warm-up
    fast, t_fast, gpu_fast = timed(sweep, model, cases, config)
    rss_fast = peak_rss_mb()
    naive, t_naive, gpu_naive = timed(sweep_naive, model, cases, config)
    same = bool((fast.generation.values == naive.generation.values).all())
    n = len(fast)
    print(f"model {args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, {model.cfg.device}, "
          f"{model.cfg.dtype}, torch threads {torch.get_num_threads()}")
    print(f"{len(cases)} cases x {len(positions)} positions x {n // max(1, len(positions) * len(cases))} cells "
          f"({','.join(kinds)}) = {n} patched generations")
    print(f"naive: {t_naive:8.2f}s  {n / t_naive:9.1f} cells/s" + (f"  peak GPU {gpu_naive:.0f} MB" if gpu_naive else ""))
    print(f"fast:  {t_fast:8.2f}s  {n / t_fast:9.1f} cells/s" + (f"  peak GPU {gpu_fast:.0f} MB" if gpu_fast else ""))
    print(f"speedup {t_naive / t_fast:.1f}x; generations identical: {same}; peak RSS {peak_rss_mb():.0f} MB "
          f"(after the fast engine: {rss_fast:.0f} MB)")
    if not same:
        raise SystemExit("fast and naive generations differ")


if __name__ == "__main__":
    main()
