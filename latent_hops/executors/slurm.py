"""Shards as a SLURM job array through submitit. Each array job runs one shard; on preemption
or timeout submitit requeues it (``ShardJob.checkpoint``), and the requeued shard skips its
finished parts. Options come from the ``[slurm]`` table of the ``--config`` file, passed to
``submitit.AutoExecutor.update_parameters`` (e.g. ``slurm_partition``, ``timeout_min``,
``slurm_array_parallelism``, ``mem_gb``); ``cluster = "local"`` runs the array as local
processes (what the tests use), ``"debug"`` in the driver process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from latent_hops.executors import ExecutorConfig, extra_missing, run_command

try:
    import submitit
except ImportError:  # the module is imported only for --executor slurm
    submitit = None  # type: ignore[assignment]


class ShardJob(submitit.helpers.Checkpointable if submitit else object):  # type: ignore[misc]
    """One shard; on preemption submitit calls ``checkpoint`` and requeues the same call."""

    def __call__(self, argv: list[str], cwd: str) -> dict:
        return run_command(argv, cwd)


def run_slurm(
    stages: Sequence[list[list[str]]], config: ExecutorConfig, run_dir: Path, progress
) -> list[dict] | None:
    if submitit is None:
        raise extra_missing("submitit", "slurm")
    options = dict(config.slurm)
    executor = submitit.AutoExecutor(folder=run_dir / "slurm", cluster=options.pop("cluster", None))
    executor.update_parameters(
        **{
            "cpus_per_task": max(1, int(config.cpus_per_worker)),
            "gpus_per_node": int(config.gpus_per_worker),
            "slurm_array_parallelism": config.workers,
            "name": "latent-hops",
            **options,
        }
    )
    results: list[dict] = []
    for i, commands in enumerate(stages):
        last = i == len(stages) - 1
        jobs = executor.map_array(ShardJob(), commands, [os.getcwd()] * len(commands))
        print(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs)}")
        if last and not config.wait:
            return None
        results = []
        for job in jobs:  # an earlier stage is always waited for: the next one needs it
            results.append(job.result())  # raises with the job's own traceback if it failed
            if last:
                progress()
    return results
