"""Run directories: resumable Parquet shards, query sharding, and the manifest.

A long analysis writes its results chunk by chunk into ``RUN_DIR/<name>/part-*.parquet``;
each part is written to a temporary file and renamed into place, so a process killed at any
moment (even ``kill -9``) leaves only whole parts. Started again, it skips the cases whose
part exists, so nothing is recomputed, lost or duplicated. ``merge_parts`` reads all parts
(of every ``--shard i/n`` process) into one table.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from latent_hops._version import __version__
from latent_hops.errors import InputError, RunDirError
from latent_hops.tables import SCHEMA_VERSION

logger = logging.getLogger(__name__)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def in_shard(query_id: str, shard: tuple[int, int]) -> bool:
    """Deterministic assignment of a query to one of n shards (by a hash of its id)."""
    i, n = shard
    return zlib.crc32(str(query_id).encode()) % n == i


class UnreadableTable(RunDirError):
    """A file of the run directory that is not a Parquet table (truncated by a full disk or a
    copy, edited by hand): our own writes are atomic, so this is damage from outside."""

    def __init__(self, path: Path, error: Exception):
        self.reason = str(error)
        super().__init__(
            f"{path}: not a readable Parquet table ({error}): truncated or damaged (a full "
            "disk, a partial copy?); delete it and run again to remake it"
        )


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Reading ``path`` inside: a damaged file is an ``UnreadableTable`` (not a crash)."""
    try:
        yield
    except (pa.ArrowException, OSError) as error:
        raise UnreadableTable(path, error) from None


def _read(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    with _readable(path):
        return pd.read_parquet(path, columns=None if columns is None else list(columns))


def _part_ids(path: Path) -> set[str]:
    return set(_read(path, columns=["id"])["id"])


def done_ids(folder: Path) -> set[str]:
    """Ids of the cases whose results are already in ``folder``'s parts."""
    if not folder.is_dir():
        return set()
    return set().union(*(_part_ids(p) for p in sorted(folder.glob("part-*.parquet"))))


MADE_BY_KEY = b"latent_hops.made_by"
"""Parquet schema-metadata key of a table's provenance (``made_by``)."""


HOST = socket.gethostname()


def _tmp(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: named by host and process,
    so that concurrent shards (one run directory on shared storage) never share one."""
    return path.parent / f".tmp-{path.name}-{HOST}-{os.getpid()}"


def remove_stale_temp(folder: Path, everyone: bool = False) -> None:
    """Remove what killed processes left half-written in ``folder``: temporary files of this
    host whose process is gone (a live shard's are kept), or all of them (``everyone``: when
    no writer can be running any more, e.g. after every shard finished)."""
    for tmp in folder.glob(".tmp-*") if folder.is_dir() else []:
        pid = tmp.name.rpartition("-")[2]
        mine = pid.isdigit() and tmp.name.endswith(f"-{HOST}-{pid}")
        if everyone or (mine and not _alive(int(pid))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process starts afresh: nothing of its own is being written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_table(frame: pd.DataFrame, path: Path, made_by: dict | None = None) -> Path:
    """Write a Parquet table atomically (a killed process never leaves half a file), with
    ``made_by`` -- what made it: model, dataset, analysis config, versions -- in its schema."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if made_by is not None:
        meta = dict(table.schema.metadata or {})
        meta[MADE_BY_KEY] = json.dumps(made_by, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text file (JSON summary, HTML page) atomically, like ``write_table``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def made_by_of(path: Path) -> dict | None:
    """The provenance a table was written with (None: written without one)."""
    with _readable(path):
        meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[MADE_BY_KEY]) if MADE_BY_KEY in meta else None


def read_table(path: str | Path) -> pd.DataFrame:
    """A result table with what made it: ``table.attrs["made_by"]`` (model, weights hash,
    dataset hash, analysis config, versions), which ``pd.read_parquet`` drops."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such table", code="run-dir")
    made_by = made_by_of(path)
    check_schema(made_by, path)
    table = _read(path)
    table.attrs["made_by"] = made_by
    return table


def _normalised(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))  # tuples -> lists, as stored


def differences(recorded: dict | None, wanted: dict) -> list[str]:
    """The keys (``config.window`` for nested ones) whose values differ, as ``key: a != b``."""
    if recorded is None:
        return ["no provenance recorded (a table from an older latent_hops)"]
    old, new = _normalised(recorded), _normalised(wanted)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differences(a, b)]
        elif a != b:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


def check_schema(made_by: dict | None, where: Path) -> None:
    """Refuse what an older latent_hops wrote (another table vocabulary): one line, saying
    to recompute."""
    version = (made_by or {}).get("tables")
    if version != SCHEMA_VERSION:
        raise RunDirError(
            f"{where} was written by an older latent_hops (table schema {version or 1}, now "
            f"{SCHEMA_VERSION}): recompute it in a new run directory, or delete it"
        )


def reusable_table(path: Path, made_by: dict, ids: set[str] | None = None) -> pd.DataFrame | None:
    """The table at ``path`` if it was made exactly as ``made_by`` says (and covers ``ids``,
    returning just their rows); else None, logging what differs. A table of an older table
    schema is refused (``check_schema``)."""
    if not Path(path).is_file():
        return None
    try:
        recorded = made_by_of(path)
        check_schema(recorded, path)
        differ = differences(recorded, made_by)
        if differ:
            said = "; ".join(differ)
            logger.info("not reusing %s: made differently (%s); recomputing", path, said)
            return None
        table = _read(path)
    except UnreadableTable as error:  # remade, and the damaged file replaced
        logger.warning(
            "not reusing %s: not a readable Parquet table (%s); recomputing", path, error.reason
        )
        return None
    if ids is None:
        return table
    if not ids <= set(table["id"]):
        return None
    return table[table["id"].isin(ids)].reset_index(drop=True)


def write_part(folder: Path, frame: pd.DataFrame, key: str) -> Path:
    """Write one part atomically (temporary file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return write_table(frame, folder / f"part-{digest}.parquet")


def check_config(folder: Path, made_by: dict) -> None:
    """Parts are only reused when made the same way: the first run records its ``made_by``
    in ``folder/config.json``; a different one later is refused rather than mixed in."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    if not path.is_file():
        write_text(path, json.dumps(made_by, sort_keys=True, default=str))
        return
    recorded = json.loads(path.read_text())
    check_schema(recorded, folder)
    differ = differences(recorded, made_by)
    if differ:
        raise InputError(
            f"{folder} holds results made differently ({'; '.join(differ)}); use another --out "
            "or delete that folder"
        )


def run_in_parts(
    folder: Path,
    cases: Sequence,
    chunk: int,
    compute: Callable[[Sequence], pd.DataFrame],
    on_skip: Callable[[int], None] | None = None,
    made_by: dict | None = None,
) -> int:
    """Compute ``cases`` chunk by chunk, one part each, skipping cases already done
    (made the same way, see ``check_config``); returns how many were already done."""
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    check_config(folder, made_by or {})
    remove_stale_temp(folder)  # parts a killed process did not finish
    done = done_ids(folder)
    todo = [c for c in cases if c.id not in done]
    if on_skip is not None:
        on_skip(len(cases) - len(todo))
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        write_part(folder, compute(part), "|".join(c.id for c in part))
    return len(cases) - len(todo)


def merge_parts(
    folder: Path, order: Sequence[str] | None = None, sort_by: Sequence[str] = ()
) -> pd.DataFrame:
    """All parts of ``folder`` as one table; rows of the same case keep their order."""
    parts = [_read(p) for p in sorted(folder.glob("part-*.parquet"))]
    if not parts:
        raise InputError(f"no result parts in {folder}")
    frame = pd.concat(parts, ignore_index=True)
    if order is not None:
        rank = {i: k for k, i in enumerate(order)}
        frame = frame[frame["id"].isin(rank)]
        frame = frame.assign(_case=frame["id"].map(rank)).sort_values(
            ["_case", *sort_by], kind="stable"
        )
        frame = frame.drop(columns="_case")
    return frame.reset_index(drop=True)


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose behaviour the results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformer-lens", "transformers", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def record_run(
    run_dir: Path,
    command: str,
    config: dict,
    dataset_sha256: str | None,
    started: float,
    status: str = "ok",
) -> Path:
    """Append this command's entry (model, dataset hash, config, version, times, and whether
    it finished: ``ok``, ``interrupted``, ``failed``) to manifest.json."""
    path = run_dir / "manifest.json"
    stamp = lambda t: datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")  # noqa: E731
    entry = {
        "command": command,
        "package_version": __version__,
        "versions": library_versions(),
        "config": config,
        "dataset_sha256": dataset_sha256,
        "status": status,
        "started": stamp(started),
        "finished": stamp(time.time()),
    }
    # shards running at once append to one manifest: read, append and write under a lock
    with open(run_dir / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        manifest["runs"].append(entry)
        write_text(path, json.dumps(manifest, indent=1, default=str))
    return path


def check_run_dir(run: Path) -> None:
    """A run directory that exists and can be written, or could be created where its nearest
    existing parent can be written; else a clear error. Nothing is created: a refused input
    leaves no empty directory behind (the first table written creates it)."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise RunDirError(f"--out {run} is a file, not a run directory")
    existing = next(p for p in (run, *run.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunDirError(f"--out {run}: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        raise RunDirError(f"--out {run}: cannot write there ({err.strerror or err})") from None


def saved_since(run: Path, since: float) -> list[str]:
    """What a command saved in ``run`` from ``since`` on: its tables and parts (for the
    message of an interrupted command)."""
    if not Path(run).is_dir():
        return []
    found = [*Path(run).glob("*.parquet"), *Path(run).glob("*/part-*.parquet")]
    return sorted(str(p.relative_to(run)) for p in found if p.stat().st_mtime >= since)
