"""Shards as a SLURM job array through submitit. Each array job runs one task; on preemption
or timeout submitit requeues it (``ShardJob.checkpoint``), and the requeued shard skips its
finished parts. Options come from the ``[slurm]`` table of the ``--config`` file, passed to
``submitit.AutoExecutor.update_parameters`` (e.g. ``slurm_partition``, ``timeout_min``,
``slurm_array_parallelism``, ``mem_gb``); ``cluster = "local"`` runs the array as local
processes (what the tests use), ``"debug"`` in the driver process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from latent_hops.errors import InputError
from latent_hops.executors.base import ExecutorConfig, Task, TaskResult, failed_input
from latent_hops.executors.worker import run_task

logger = logging.getLogger(__name__)

try:
    import submitit
except ImportError:  # the module is imported only for --executor slurm
    submitit = None  # type: ignore[assignment]


class ShardJob(submitit.helpers.Checkpointable if submitit else object):  # type: ignore[misc]
    """One task; on preemption submitit calls ``checkpoint`` and requeues the same call."""

    def __call__(self, task: Task) -> TaskResult:
        return run_task(task)


def run_slurm(
    stages: Sequence[list[Task]],
    config: ExecutorConfig,
    run_dir: Path,
    progress: Callable[[], None],
) -> list[TaskResult] | None:
    if submitit is None:
        raise InputError(
            "--executor slurm needs the optional submitit package: pip install 'latent-hops[slurm]'"
        )
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
    results: list[TaskResult] = []
    for i, tasks in enumerate(stages):
        last = i == len(stages) - 1
        jobs = executor.map_array(ShardJob(), tasks)
        logger.info("submitted %d jobs: %s", len(jobs), ", ".join(j.job_id for j in jobs))
        if last and not config.wait:
            return None
        results = []
        for job in jobs:  # an earlier stage is always waited for: the next one needs it
            results.append(job.result())  # raises with the job's own traceback if it crashed
            if last and results[-1].status == "ok":
                progress()
        error = failed_input(results)
        if error is not None:
            raise error
    return results
