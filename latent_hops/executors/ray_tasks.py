"""Shards as Ray tasks: one task per shard on the cluster at ``RAY_ADDRESS``, or on a local
cluster started for the run. A task lost with its worker (killed, node preempted) is retried
``max_retries`` times; a shard that fails on its input reports it (not retried)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from latent_hops.errors import InputError
from latent_hops.executors.base import ExecutorConfig, Task, TaskResult, failed_input
from latent_hops.executors.worker import run_task

LOCAL_OBJECT_STORE = 128 * 2**20
"""Object store of a local cluster: only tasks and small results travel through it, and
containers often have a tiny /dev/shm."""


def run_ray(
    stages: Sequence[list[Task]], config: ExecutorConfig, progress: Callable[[], None]
) -> list[TaskResult]:
    try:
        import ray
    except ImportError:
        raise InputError(
            "--executor ray needs the optional ray package: pip install 'latent-hops[ray]'"
        ) from None
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=None if address else LOCAL_OBJECT_STORE,
        )
    try:
        remote = ray.remote(
            num_cpus=config.cpus_per_worker,
            num_gpus=config.gpus_per_worker,
            max_retries=config.max_retries,
            retry_exceptions=False,
        )(run_task)
        results: list[TaskResult] = []
        for i, tasks in enumerate(stages):
            refs = [remote.remote(task) for task in tasks]
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                result = ray.get(done[0])  # a crashed shard raises here, naming its task
                if i == len(stages) - 1 and result.status == "ok":
                    progress()
            results = ray.get(refs)
            error = failed_input(results)
            if error is not None:
                raise error
        return results
    finally:
        if started:
            ray.shutdown()
