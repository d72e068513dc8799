"""The ``latent-hops`` command line: it only wires the library's functions to files.

    latent-hops evaluate --model toy --dataset toy --out runs/toy
    latent-hops demo --out runs/demo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
from latent_hops.models import ModelLoadError, load_model
from latent_hops.queries import DatasetError, load_dataset


def _common(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    parser.add_argument("--model", default="toy", help="'toy', a local HF checkpoint dir, or a TransformerLens name")
    parser.add_argument("--dataset", default="toy", help="'toy', a two_hop.csv, or .parquet/.jsonl")
    parser.add_argument("--out", type=Path, required=out_required, help="run directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N queries")
    parser.add_argument("--split", default=None, help="use only queries of this split (e.g. test_id)")


def _load_queries(args) -> pd.DataFrame:
    table = load_dataset(args.dataset)
    if args.split is not None:
        table = table[table["split"] == args.split]
        if table.empty:
            raise DatasetError(f"no queries with split {args.split!r}")
    if args.limit is not None:
        if args.limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {args.limit}")
        table = table.iloc[: args.limit]
    return table.reset_index(drop=True)


def cmd_evaluate(args) -> pd.DataFrame:
    table = _load_queries(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    start = time.time()
    result = evaluate(model, table, EvaluationConfig(batch_size=args.batch_size, progress=True))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "evaluation.parquet"
    result.to_parquet(path, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(summarize(result).to_string())
    print(f"{len(result)} queries in {time.time() - start:.1f}s -> {path}")
    return result


def cmd_demo(args) -> None:
    """The whole pipeline on the shipped toy model (what exists of it so far)."""
    args.model, args.dataset = args.model or "toy", args.dataset or "toy"
    cmd_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-hops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="hop accuracies and subsets -> RUN_DIR/evaluation.parquet")
    _common(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("demo", help="run the pipeline on the shipped toy model")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ModelLoadError, DatasetError) as err:
        print(f"latent-hops: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
