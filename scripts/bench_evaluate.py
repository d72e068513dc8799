"""Time the evaluation of the whole toy dataset (queries x 5 prompts).

    python scripts/bench_evaluate.py [--model toy] [--dataset toy] [--batch-size 256] [--threads 2]

Prints queries/second, unique prompts/second and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from latent_hops import evaluate, load_dataset, load_model, summarize
from latent_hops.evaluation import EvaluationConfig


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy")
    parser.add_argument("--dataset", default="toy")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    table = load_dataset(args.dataset)
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    result = evaluate(model, table, EvaluationConfig(batch_size=args.batch_size))
    seconds = time.perf_counter() - start
    n_prompts = len(table) * 5
    print(summarize(result).round(3).to_string())
    print(
        f"\nmodel {args.model} ({model.n_layers} layers) on {model.device}, "
        f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}"
    )
    print(
        f"{len(table)} queries ({n_prompts} prompts) in {seconds:.1f}s: "
        f"{len(table) / seconds:.1f} queries/s, {n_prompts / seconds:.1f} prompts/s"
    )
    print(f"peak RSS {peak_rss_mb():.0f} MB (after model and data load: {rss_before:.0f} MB)")


if __name__ == "__main__":
    main()
