"""Start-up overhead of each executor: the same back-patching sweep (toy model, --limit N) in
one process and as shards on local processes, a local Ray cluster and submitit's local array,
run one after the other (never at once) into fresh run directories; wall times side by side,
and whether each merged table equals the single-process one.

    python scripts/bench_executors.py [--limit 40] [--workers 2] [--out /tmp/bench-executors]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-executors"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    (args.out / "slurm.toml").write_text('[slurm]\ncluster = "local"\ntimeout_min = 30\n')
    sweep = ["backpatch", "--limit", str(args.limit), "--device", "cpu"]
    workers = ["--workers", str(args.workers)]
    runs = {
        "one process": [],
        "local": workers,
        "ray": ["--executor", "ray", *workers],
        "slurm (submitit local)": [
            "--executor",
            "slurm",
            *workers,
            "--config",
            str(args.out / "slurm.toml"),
        ],
    }
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    rows = []
    for i, (name, flags) in enumerate(runs.items()):
        out = args.out / f"run{i}"
        start = time.time()
        subprocess.run(
            [sys.executable, "-m", "latent_hops.cli", *sweep, "--out", str(out), *flags],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = time.time() - start
        table = pd.read_parquet(out / "backpatch.parquet")
        first = pd.read_parquet(args.out / "run0" / "backpatch.parquet")
        same = table.drop(columns="e3_logprob").equals(first.drop(columns="e3_logprob"))
        rows.append({"executor": name, "wall_s": round(seconds, 1), "same_table": same})
    frame = pd.DataFrame(rows)
    frame["vs_one_process"] = (frame.wall_s / frame.wall_s.iloc[0]).round(2)
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
