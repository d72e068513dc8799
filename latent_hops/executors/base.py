"""What every executor shares: its config, the unit of work (``Task``) and what a worker
reports back (``TaskResult``). Imports nothing heavy: the driver and the workers read it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Task:
    """One unit of work a worker runs in its own process: the run's evaluation
    (``command="evaluate"``) or one shard of an analysis. Plain values only (it travels as
    JSON or through Ray/submitit): the run's settings (``RunSettings.to_dict``, absolute
    paths, the shard) and every config by analysis name (``dataclasses.asdict``)."""

    command: str
    settings: dict[str, Any]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def shard(self) -> str:
        return self.settings.get("shard") or ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> Task:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class TaskResult:
    """What a worker reports: ``status`` ``"ok"`` or ``"input-error"`` (bad input: not
    retried; ``code`` and ``message`` from the ``InputError``), and small facts."""

    shard: str
    status: str = "ok"
    code: str = ""
    message: str = ""
    seconds: float = 0.0
    host: str = ""
    pid: int = 0
    attempts: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TaskResult:
        return cls(**json.loads(text))


class ShardFailed(RuntimeError):
    """A worker crashed (not an input error) more often than it may be retried."""


def failed_input(results: list[TaskResult]) -> InputError | None:
    """The first input error a worker reported, as the driver raises it."""
    bad = next((r for r in results if r.status == "input-error"), None)
    if bad is None:
        return None
    shard = f" (shard {bad.shard})" if bad.shard else ""
    return InputError(f"a worker failed{shard}: {bad.message}", code=bad.code or None)
