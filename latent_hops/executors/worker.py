"""The worker entry point: run one ``Task`` with the library (``run.Run``), in this process.

Executors call ``run_task`` (Ray, submitit) or start ``python -m latent_hops.executors.worker
TASK_JSON`` (local processes), which prints the ``TaskResult`` as JSON on its last line and
exits 0, or 2 for an input error (never retried). Paths in a task are absolute: a worker
never changes its working directory. It never imports the CLI.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

from latent_hops.analysis import get
from latent_hops.config import config_from_dict
from latent_hops.errors import EXIT_INPUT_ERROR, InputError
from latent_hops.evaluation import EvaluationConfig
from latent_hops.executors.base import Task, TaskResult
from latent_hops.run import Run, RunSettings


def task_configs(task: Task) -> dict[str, Any]:
    """The task's configs, rebuilt exactly (``config_from_dict``)."""
    kinds = {
        name: EvaluationConfig if name == "evaluate" else get(name).config for name in task.configs
    }
    return {name: config_from_dict(kinds[name], values) for name, values in task.configs.items()}


def run_task(task: Task) -> TaskResult:
    """Run ``task``; an input error is reported (status ``input-error``), anything else raises
    (the executor retries a lost worker)."""
    start = time.time()
    shard, host, pid = task.shard, socket.gethostname(), os.getpid()
    try:
        run = Run.open(RunSettings.from_dict(task.settings), task_configs(task))
        if task.command == "evaluate":
            run.evaluation()
        else:
            run.analyse(task.command)
    except InputError as err:
        return TaskResult(shard, "input-error", err.code, str(err), host=host, pid=pid)
    return TaskResult(shard, seconds=round(time.time() - start, 1), host=host, pid=pid)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    result = run_task(Task.from_json(args[0]))
    print(result.to_json())
    return 0 if result.status == "ok" else EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
