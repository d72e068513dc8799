"""Shards as Ray tasks: one task per shard on the cluster at ``RAY_ADDRESS``, or on a local
cluster started for the run. A task lost with its worker (killed, node preempted) is retried
``max_retries`` times; a shard that fails on its input is not."""

from __future__ import annotations

import os
from collections.abc import Sequence

from latent_hops.executors import ExecutorConfig, extra_missing, run_command

LOCAL_OBJECT_STORE = 128 * 2**20
"""Object store of a local cluster: only argument lists and small dicts travel through it,
and containers often have a tiny /dev/shm."""


def run_ray(stages: Sequence[list[list[str]]], config: ExecutorConfig, progress) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise extra_missing("ray", "ray") from None
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
        task = ray.remote(
            num_cpus=config.cpus_per_worker,
            num_gpus=config.gpus_per_worker,
            max_retries=config.max_retries,
            retry_exceptions=False,
        )(run_command)
        results: list[dict] = []
        for i, commands in enumerate(stages):
            refs = [task.remote(argv, os.getcwd()) for argv in commands]
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # a failed shard raises here, naming its command
                if i == len(stages) - 1:
                    progress()
            results = ray.get(refs)
        return results
    finally:
        if started:
            ray.shutdown()
