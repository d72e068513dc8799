"""The back-patching engine measured against the hardware: one table per run, one row per
workload and engine, so that every ratio is read side by side.

    python scripts/bench_backpatch.py --model smollm2-135m --dataset world --threads 2 \\
        --workload small cases=1 layers=every:3 positions=t1 kinds=back \\
        --workload full cases=4 --baseline 94a8045
    python scripts/bench_backpatch.py --naive                    # the toy: fast == naive
    python scripts/bench_backpatch.py --random llama-7b --dtype bfloat16 --device cuda \\
        --cases 64 --no-count

Workloads: ``--workload NAME key=value ...`` (keys: cases, layers, positions, kinds;
naive=yes / stop=yes / baseline=no to add or leave out those engines; repeatable), else one
from ``--cases``, ``--layers``, ``--positions`` and ``--kinds``. Engines: the fast engine
(``sweep``);
with ``--stop`` the fast engine again with ``stop_when_decided`` (its successes, ranks and
screen must equal the fast engine's: ``identical`` counts those, and the run fails otherwise);
with ``--baseline REF`` the fast engine of git commit REF, run in a subprocess
(``time_sweep.py`` with that commit's package) on the same workload, timed only; with
``--naive`` the reference, whose generations must equal the fast engine's (exactly in
float32: the run fails otherwise); with ``--backend hooked,bridge`` the fast engine on each
backend (the first measured in full), generations compared with the first's.

Columns: generations; seconds (best of ``--repeats``); cells/s; ms per cell; executed TFLOP
(counted while the fast engine runs: tokens actually run, padding included); the protocol's
minimum (``backpatch.cost.minimum_work``; with ``--random``, whose tokens the borrowed toy
tokenizer cannot spell, every row counts all its decoding steps); work efficiency = minimum
/ executed; achieved GFLOP/s (executed / seconds) and MFU = that / the device's matmul rate,
measured in this process just before the workload (float32 on CPU, the model's dtype on
CUDA; a shared CPU's rate varies from minute to minute, so it is measured each time and
shown); rows/product: the tokens per block call (the row count of the projections' products,
counted while it runs) and MFU at its rows = the FLOP rate over that of a projection of the
model's MLP shape at that row count, its weights cold as in a forward pass (how near the
engine runs to what the device does on products of that size: small batches run far below
its peak), and that rate itself (GFLOP/s at its rows); peak memory (CUDA: torch's peak
allocation in the run; CPU: the process's peak RSS so far). With several workloads, the
dearest one's cost per cell over the cheapest's, split into its factors: the work per cell,
the device's own product rate at the two row counts, and the engine's share.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from time_sweep import add_workload_arguments, load, synchronize, workload_cases, workload_config

from latent_hops.analyses.backpatch import all_cells, sweep, sweep_naive
from latent_hops.analyses.backpatch.cost import minimum_work
from latent_hops.backend.work import WorkCount, matmul_flops_per_s, projection_flops_per_s

REPO = Path(__file__).resolve().parents[1]
KEYS = {"cases", "layers", "positions", "kinds", "baseline", "naive", "stop"}


def workloads(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """(name, arguments) per ``--workload``; the command line's own when none."""
    if not args.workload:
        return [("workload", args)]
    found = []
    for name, *pairs in args.workload:
        settings = dict(pair.split("=", 1) for pair in pairs)
        unknown = set(settings) - KEYS
        if unknown:
            raise SystemExit(f"--workload {name}: unknown keys {sorted(unknown)}; use {KEYS}")
        if "cases" in settings:
            settings["cases"] = int(settings["cases"])  # type: ignore[assignment]
        for flag in ("naive", "stop", "baseline"):  # per workload: naive=yes, baseline=no
            if flag in settings:
                on = settings.pop(flag) == "yes"
                settings[flag] = (args.baseline if on else None) if flag == "baseline" else on
        found.append((name, argparse.Namespace(**{**vars(args), **settings})))
    return found


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, model, cases, config, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        synchronize()
        start = time.perf_counter()
        result = fn(model, cases, config)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def stopped(
    model, cases, config, row: dict, fast: pd.DataFrame, peak: float, no_count: bool
) -> dict:
    """The fast engine with ``stop_when_decided``: timed, its work counted; ``identical``:
    the cells whose success, rank and screen equal the fast engine's."""
    config = replace(config, stop_when_decided=True)
    work = WorkCount()
    if no_count:
        table, seconds = timed(sweep, model, cases, config, 1)
    else:
        with model.count_work() as work:
            table, seconds = timed(sweep, model, cases, config, 1)
    executed = work.flops(model.shape)
    keys = ["alias_match", "e3_rank", "screened"]
    same = int((table[keys].fillna(-1) == fast[keys].fillna(-1)).all(axis=1).sum())
    n = len(fast)
    return {**row, "engine": "fast+stop", "seconds": seconds, "cells/s": n / seconds,
            "ms/cell": 1000 * seconds / n, "executed TFLOP": executed / 1e12 if executed else None,
            "work efficiency": None, "GFLOP/s": executed / seconds / 1e9 if executed else None,
            "MFU": executed / seconds / peak if executed else None, "peak MB": peak_memory_mb(),
            "identical": f"{same}/{n}"}  # fmt: skip


def baseline(ref: str, args: argparse.Namespace, tree: Path) -> dict:
    """The fast engine of commit ``ref`` on this workload, in a subprocess."""
    if not (tree / "latent_hops").exists():
        archive = subprocess.run(
            ["git", "archive", ref, "latent_hops"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    command = [sys.executable, str(REPO / "scripts" / "time_sweep.py"), "--repeats", "1"]
    for key in ("model", "random", "dataset", "split", "positions", "kinds", "layers", "cases",
                "threads", "device", "dtype", "memory_budget_mb"):  # fmt: skip
        value = getattr(args, key)
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measured(rows: list[dict], new: int, csv: str | None) -> None:
    """The rows from ``new`` on, as soon as a workload is measured: one line each, and the CSV
    so far (a run stopped by a time limit keeps the workloads it finished)."""
    for r in rows[new:]:
        mfu = f", MFU {r['MFU']:.1%}" if r["MFU"] else ""
        same = f", identical {r['identical']}" if r["identical"] else ""
        print(
            f"measured {r['workload']} {r['engine']}: {r['generations']} generations in "
            f"{r['seconds']:.3g} s, {r['cells/s']:,.1f} cells/s{mfu}{same}",
            flush=True,
        )
    if csv:
        pd.DataFrame(rows).to_csv(csv, index=False)


def shape_ratio(fast: pd.DataFrame) -> str:
    """The dearest workload's cost per cell over the cheapest's, and (where the work was
    counted) its three factors: the work per cell, the device's own product rate at the
    two workloads' row counts (small products run slower, whatever runs them), and the
    engine's share (its MFU at its rows)."""
    dear, cheap = fast.loc[fast["ms/cell"].idxmax()], fast.loc[fast["ms/cell"].idxmin()]
    ratio = f"{dear['ms/cell'] / cheap['ms/cell']:.2f}x"
    if pd.isna(dear["GFLOP/s at its rows"]) or pd.isna(cheap["GFLOP/s at its rows"]):
        return ratio
    work = (dear["executed TFLOP"] / dear["generations"]) / (
        cheap["executed TFLOP"] / cheap["generations"]
    )
    device = cheap["GFLOP/s at its rows"] / dear["GFLOP/s at its rows"]
    engine = cheap["MFU at its rows"] / dear["MFU at its rows"]
    return (
        f"{ratio} ({dear.workload} / {cheap.workload}) = {work:.2f}x the work per cell "
        f"x {device:.2f}x this device's product rate at {dear['rows/product']:.0f} vs "
        f"{cheap['rows/product']:.0f} rows x {engine:.2f}x the engine's own (MFU at its rows "
        f"{dear['MFU at its rows']:.0%} vs {cheap['MFU at its rows']:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument("--workload", nargs="+", action="append", metavar="NAME KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1, help="timings per engine (best)")
    parser.add_argument("--baseline", default=None, help="a git commit whose engine to time too")
    parser.add_argument("--naive", action="store_true", help="run the reference and compare")
    parser.add_argument(
        "--stop", action="store_true", help="also run the fast engine with stop_when_decided"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto, hooked, bridge, or a list (hooked,bridge): the first is measured in full, "
        "the others' fast engine is timed on the same cells and must give the same generations",
    )
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    parser.add_argument(
        "--no-count", action="store_true", help="skip the work count (executed FLOPs, MFU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    first, *others = args.backend.split(",")
    model = load(args, first)
    other_models = {name: load(args, name) for name in others}
    print(
        f"model {args.random or args.model} ({model.name} backend): {model.n_layers} "
        f"layers, d_model {model.d_model}, {model.device}, {model.dtype}, torch threads "
        f"{torch.get_num_threads()}"
    )
    cuda = torch.device(model.device).type == "cuda"
    matmul_dtype = model.dtype if cuda else torch.float32
    shape, rows = model.shape, []
    first_of_workload = 0
    with tempfile.TemporaryDirectory(prefix="baseline-") as tree:
        for name, wl in workloads(args):
            config = workload_config(model, wl)
            cases = workload_cases(model, wl, config)
            one_cell = replace(config, cells=(all_cells(model, config)[0],))
            sweep(model, cases[:1], one_cell)  # warm-up
            work = WorkCount()
            peak = matmul_flops_per_s(model.device, matmul_dtype)  # just before: clocks vary
            if args.no_count:
                fast, seconds = timed(sweep, model, cases, config, args.repeats)
            else:
                with model.count_work() as counted:  # counted on the first timing
                    fast, seconds = timed(sweep, model, cases, config, 1)
                work = counted
                if args.repeats > 1:
                    seconds = min(seconds, timed(sweep, model, cases, config, args.repeats - 1)[1])
            memory = peak_memory_mb()
            executed = work.flops(shape)
            rows_per_product = work.rows_per_product
            at_rows = None  # the rate of the model's MLP product at the sweep's row count
            if rows_per_product:
                at_rows = projection_flops_per_s(
                    round(rows_per_product), shape.d_model, shape.d_mlp, model.device, matmul_dtype
                )
            # a random model's tokens mostly lie beyond the toy tokenizer it borrows: their
            # text does not say how many steps a row needed, so every row counts them all
            minimum = minimum_work(model, cases, config, None if wl.random else fast).flops(shape)
            n = len(fast)
            row = {
                "workload": name,
                "engine": "fast",
                "cases": len(cases),
                "generations": n,
                "seconds": seconds,
                "cells/s": n / seconds,
                "ms/cell": 1000 * seconds / n,
                "executed TFLOP": executed / 1e12 if executed else None,
                "minimum TFLOP": minimum / 1e12,
                "work efficiency": minimum / executed if executed else None,
                "GFLOP/s": executed / seconds / 1e9 if executed else None,
                "MFU": executed / seconds / peak if executed else None,
                "matmul GFLOP/s": peak / 1e9,
                "rows/product": rows_per_product or None,
                "MFU at its rows": executed / seconds / at_rows if at_rows else None,
                "GFLOP/s at its rows": at_rows / 1e9 if at_rows else None,
                "peak MB": memory,
                "identical": None,
            }
            rows.append(row)
            if wl.naive:
                naive, t_naive = timed(sweep_naive, model, cases, config, 1)
                same = int((fast.generation.values == naive.generation.values).sum())
                rows.append({**row, "engine": "naive", "seconds": t_naive, "cells/s": n / t_naive,
                             "ms/cell": 1000 * t_naive / n, "executed TFLOP": None,
                             "work efficiency": None, "GFLOP/s": None, "MFU": None,
                             "peak MB": peak_memory_mb(), "identical": f"{same}/{n}"})  # fmt: skip
                row["identical"] = f"{same}/{n}"
            if wl.stop:
                rows.append(stopped(model, cases, config, row, fast, peak, args.no_count))
            for other in other_models.values():
                other_cases = workload_cases(other, wl, config)
                sweep(other, other_cases[:1], one_cell)  # warm-up
                theirs, t_other = timed(sweep, other, other_cases, config, args.repeats)
                same = int((theirs.generation.values == fast.generation.values).sum())
                rows.append({**row, "engine": f"fast[{other.name}]", "seconds": t_other,
                             "cells/s": n / t_other, "ms/cell": 1000 * t_other / n,
                             "executed TFLOP": None, "work efficiency": None, "GFLOP/s": None,
                             "MFU": None, "peak MB": None, "identical": f"{same}/{n}"})  # fmt: skip
            if wl.baseline:
                old = baseline(wl.baseline, wl, Path(tree))
                rows.append({**row, "engine": f"fast@{args.baseline}", "seconds": old["seconds"],
                             "cells/s": old["generations"] / old["seconds"],
                             "ms/cell": 1000 * old["seconds"] / old["generations"],
                             "executed TFLOP": None, "work efficiency": None, "GFLOP/s": None,
                             "MFU": None, "peak MB": None, "identical": None})  # fmt: skip
            measured(rows, first_of_workload, args.csv)
            first_of_workload = len(rows)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda x: f"{x:,.3g}"))
    fast_rows = table[table.engine == "fast"]
    if len(fast_rows) > 1:
        print(f"cost per cell, dearest / cheapest workload: {shape_ratio(fast_rows)}")
    for name in table[table.engine == "fast+stop"].workload:
        t = table[table.workload == name].set_index("engine")
        saved = 1 - t.loc["fast+stop", "seconds"] / t.loc["fast", "seconds"]
        print(f"{name}: stopping decided cells saves {saved:.1%} of the time", end="")
        if t.loc["fast", "executed TFLOP"] and t.loc["fast+stop", "executed TFLOP"]:
            work = 1 - t.loc["fast+stop", "executed TFLOP"] / t.loc["fast", "executed TFLOP"]
            print(f" and {work:.1%} of the work", end="")
        print()
    if args.baseline:
        for name in fast_rows.workload:
            t = table[table.workload == name].set_index("engine")["seconds"]
            old = f"fast@{args.baseline}"
            if old in t:
                print(f"{name}: {old} / fast = {t[old] / t['fast']:.2f}x")
    differ = [r for r in rows if r["identical"] and r["engine"] != "naive"
              and r["identical"].split("/")[0] != r["identical"].split("/")[1]]  # fmt: skip
    if differ:
        # fp32 must match exactly; bf16/fp16 kernels round differently at different batch
        # sizes, and a random model's near-flat logits turn that into different greedy tokens
        message = f"fast and naive generations differ: {[r['identical'] for r in differ]}"
        if model.dtype == torch.float32:
            raise SystemExit(message)
        print(f"warning: {message} ({model.dtype}: batch-dependent rounding)")


if __name__ == "__main__":
    main()
