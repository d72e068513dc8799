"""Sweeps beyond one process: the shard (``--shard i/n``) run by local processes, Ray tasks or
a SLURM job array (submitit), then merged.

The unit of work already exists: a shard writes deterministic parts into the run directory,
each renamed into place, and a shard started again skips its finished parts. An executor
only runs ``Task``s (``base.py``): first the run's evaluation, which every shard picks its
cases from (reused when the run directory already has it), then one task per shard -- in a
subprocess, a Ray task or a SLURM array job, each in its own process with the library's own
``worker.run_task`` (one model load per shard). The driver then merges the parts
(``run.merge``). Only tasks and small results travel between driver and workers; the run
directory must be on storage every worker sees. Ray and submitit are optional extras
(``pip install latent-hops[ray]`` / ``[slurm]``), imported only when asked for.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from latent_hops.errors import EXIT_INPUT_ERROR, InputError
from latent_hops.executors.base import (
    EXECUTORS,
    ExecutorConfig,
    ShardFailed,
    Task,
    TaskResult,
    failed_input,
)
from latent_hops.run import RunSettings

__all__ = [
    "EXECUTORS",
    "ExecutorConfig",
    "ShardFailed",
    "Task",
    "TaskResult",
    "run_sharded",
    "shard_tasks",
]


def shard_tasks(
    command: str,
    settings: RunSettings,
    configs: Mapping[str, Any],
    config: ExecutorConfig,
) -> list[list[Task]]:
    """The stages of a sharded run: the evaluation (one task), then one task per shard. A
    worker with k > 1 GPUs loads the model across them (``n_devices=k``)."""
    gpus = int(config.gpus_per_worker)
    base = dataclasses.replace(
        settings.absolute(),
        progress=False,
        n_devices=gpus if gpus > 1 else settings.n_devices,
        shard=None,
    )
    plain = {name: dataclasses.asdict(c) for name, c in configs.items()}
    evaluation = Task(
        "evaluate", base.to_dict(), {k: v for k, v in plain.items() if k == "evaluate"}
    )
    n = config.workers
    shards = [
        Task(command, dataclasses.replace(base, shard=f"{i}/{n}").to_dict(), plain)
        for i in range(n)
    ]
    return [[evaluation], shards]


def _local(
    tasks: list[Task], config: ExecutorConfig, progress: Callable[[], None]
) -> list[TaskResult]:
    """Each task in its own subprocess (``python -m latent_hops.executors.worker``),
    ``workers`` at a time; a process that dies (not an input error, exit 2) is started
    again up to ``max_retries`` times."""
    # each process computes with its share of the cores (torch would take them all)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(config.cpus_per_worker)))}

    def one(task: Task) -> TaskResult:
        for attempt in range(config.max_retries + 1):
            done = subprocess.run(
                [sys.executable, "-m", "latent_hops.executors.worker", task.to_json()],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = done.stdout.strip().splitlines()
            if done.returncode in (0, EXIT_INPUT_ERROR) and lines:
                result = TaskResult.from_json(lines[-1])
                if result.status == "ok":
                    progress()
                return dataclasses.replace(result, attempts=attempt + 1)
        last = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        raise ShardFailed(
            f"shard {task.shard or task.command} exited with {done.returncode} after "
            f"{config.max_retries + 1} attempts: " + " | ".join(last)
        )

    with ThreadPoolExecutor(config.workers) as pool:
        return list(pool.map(one, tasks))


def run_stages(
    stages: Sequence[list[Task]],
    config: ExecutorConfig,
    run_dir: Path,
    progress: Callable[[], None] = lambda: None,
) -> list[TaskResult] | None:
    """Run the stages on the chosen executor, each once the previous one has finished; the
    last stage's results (``progress`` is called per task of it), or None when it was only
    submitted. A worker's input error is raised here, as one ``InputError``."""
    if config.executor == "ray":
        from latent_hops.executors.ray_tasks import run_ray

        return run_ray(stages, config, progress)
    if config.executor == "slurm":
        from latent_hops.executors.slurm import run_slurm

        return run_slurm(stages, config, run_dir, progress)
    results: list[TaskResult] = []
    for i, tasks in enumerate(stages):
        last = i == len(stages) - 1
        results = _local(tasks, config, progress if last else lambda: None)
        error = failed_input(results)
        if error is not None:
            raise error
    return results


def run_sharded(
    command: str,
    settings: RunSettings,
    configs: Mapping[str, Any],
    config: ExecutorConfig,
    progress: Callable[[], None] = lambda: None,
) -> list[TaskResult] | None:
    """Analysis ``command`` as ``config.workers`` shards on ``config.executor`` (then
    ``run.merge`` joins them)."""
    if settings.out is None:
        raise InputError("--out RUN_DIR is required (as a flag or in the --config file)")
    stages = shard_tasks(command, settings, configs, config)
    return run_stages(stages, config, settings.out, progress)
