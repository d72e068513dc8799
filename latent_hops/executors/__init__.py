"""Sweeps beyond one process: the shard (``--shard i/n``) run by local processes, Ray tasks or
a SLURM job array (submitit), then merged.

The unit of work already exists: a shard writes deterministic parts into the run directory,
each renamed into place, and a shard started again skips its finished parts. An executor
only launches ``latent-hops CMD ... --shard i/n`` n times -- in a subprocess, a Ray task or a
SLURM array job, each running the CLI in its own process (one model load per shard) -- and
the driver merges the parts when all are done. Only argument lists and small result dicts
travel between driver and workers; the run directory must be on storage every worker sees.
Ray and submitit are optional extras (``pip install latent-hops[ray]`` / ``[slurm]``) and are
imported only here, only when asked for.

Before the shards, one task prepares the evaluation they all pick their cases from (reused
when the run directory already has it).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latent_hops.errors import InputError

EXECUTORS = ("local", "ray", "slurm")


@dataclass(frozen=True)
class ExecutorConfig:
    """How the shards run: where, how many at once, with what resources."""

    executor: str = "local"
    workers: int = 1  # shards, and how many run at once
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_retries: int = 3  # a worker lost (killed, preempted) is started again this often
    wait: bool = True  # slurm: False submits the array and returns (merge later)
    slurm: dict[str, Any] = field(default_factory=dict)  # the --config file's [slurm] table

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise InputError(f"--executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0 or self.max_retries < 0:
            raise InputError("--gpus-per-worker >= 0, --cpus-per-worker > 0, --max-retries >= 0")


class ShardFailed(RuntimeError):
    """A worker's command exited with an error; the message ends with what it printed last
    (its own error line). Exit 2 is an input error: not retried, reported as one."""


INPUT_ERROR = "exited with 2"


def _failed(argv: Sequence[str], code: int, stderr: str) -> ShardFailed:
    last = [line for line in stderr.splitlines() if line.strip()][-3:]
    return ShardFailed(f"`latent-hops {' '.join(argv)}` exited with {code}: " + " | ".join(last))


def _shard(argv: Sequence[str]) -> str:
    return argv[list(argv).index("--shard") + 1] if "--shard" in argv else ""


class _Tee(io.TextIOBase):
    """Writes through to a stream and keeps the last characters (a worker's error lines)."""

    def __init__(self, stream, keep: int = 2000):
        self.stream, self.keep, self.tail = stream, keep, ""

    def write(self, text: str) -> int:
        self.tail = (self.tail + text)[-self.keep :]
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def worker_command(argv: Sequence[str], config: ExecutorConfig) -> list[str]:
    """The user's command as one worker runs it: in its own process, unsharded by executors
    (flags given later win, also over the --config file); a worker with k > 1 GPUs loads the
    model across them (``--n-devices k``)."""
    gpus = int(config.gpus_per_worker)
    return [
        *argv,
        "--executor",
        "local",
        "--workers",
        "1",
        *(["--n-devices", str(gpus)] if gpus > 1 else []),
    ]


def shard_commands(argv: Sequence[str], config: ExecutorConfig) -> list[list[str]]:
    """The command line of each of the ``workers`` shards."""
    n = config.workers
    return [[*worker_command(argv, config), "--shard", f"{i}/{n}"] for i in range(n)]


def run_command(argv: list[str], cwd: str | None = None) -> dict:
    """Run one ``latent-hops`` command in this process (a worker), from the driver's working
    directory ``cwd`` (relative --out/--config/--dataset paths mean the same on every worker
    of a shared file system); raise when it fails so the executor reports (and, for lost
    workers, retries) it. Returns only small facts."""
    from latent_hops.cli import main

    if cwd is not None:
        os.chdir(cwd)
    start = time.time()
    tee = _Tee(sys.stderr)
    with contextlib.redirect_stderr(tee):
        code = main(list(argv))
    if code != 0:
        raise _failed(argv, code, tee.tail)
    return {
        "shard": _shard(argv),
        "seconds": round(time.time() - start, 1),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _local(commands: list[list[str]], config: ExecutorConfig, progress) -> list[dict]:
    """Each command in its own subprocess, ``workers`` at a time; a process that dies (not an
    input error, exit 2) is started again up to ``max_retries`` times."""

    # each process computes with its share of the cores (torch would take them all)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(config.cpus_per_worker)))}

    def one(argv: list[str]) -> dict:
        for attempt in range(config.max_retries + 1):
            start = time.time()
            done = subprocess.run(
                [sys.executable, "-m", "latent_hops.cli", *argv],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            if done.returncode == 0:
                progress()
                return {
                    "shard": _shard(argv),
                    "seconds": round(time.time() - start, 1),
                    "attempts": attempt + 1,
                }
            if done.returncode == 2:
                break
        raise _failed(argv, done.returncode, done.stderr)

    with ThreadPoolExecutor(config.workers) as pool:
        return list(pool.map(one, commands))


def run_all(
    stages: Sequence[list[list[str]]], config: ExecutorConfig, run_dir: Path, progress=lambda: None
) -> list[dict] | None:
    """Run the stages on the chosen executor, each once the previous one has finished (one
    cluster session for all); the last stage's results (``progress`` is called per command
    of it), or None when it was only submitted."""
    if config.executor == "ray":
        from latent_hops.executors.ray_tasks import run_ray

        return run_ray(stages, config, progress)
    if config.executor == "slurm":
        from latent_hops.executors.slurm import run_slurm

        return run_slurm(stages, config, run_dir, progress)
    results: list[dict] = []
    for i, commands in enumerate(stages):
        last = i == len(stages) - 1
        results = _local(commands, config, progress if last else lambda: None)
    return results


def extra_missing(name: str, extra: str) -> InputError:
    return InputError(
        f"--executor {extra} needs the optional {name} package: pip install 'latent-hops[{extra}]'"
    )
