"""Sweeps survive kill -9: restarted with the same command they compute only what was missing
and finish with exactly the table of an uninterrupted run (nothing lost, nothing duplicated,
nothing recomputed); shards and configs.

Parts are written atomically (a temporary file renamed into place), so a part that is
recomputed is a new file even when its content is the same: the parts that existed before a
restart must be the very same files (inode and modification time) after it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from latent_hops.cli import main

# 60 queries: a cheap evaluation; a 2-cell grid at t2: cheap parts; one case per part
ARGS = ["backpatch", "--split", "test_id", "--limit", "60", "--max-cases", "3", "--chunk-cases", "1",
        "--device", "cpu", "--positions", "t2", "--source-layers", "7", "--target-layers", "0,4"]


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "latent_hops.cli", *ARGS, "--out", str(out)]


def _parts(out: Path) -> dict[str, tuple[int, int]]:
    """Each part file, with its inode and modification time (a rewrite changes both)."""
    folder = out / "backpatch"
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("reference")
    assert main([*ARGS, "--out", str(out)]) == 0
    return pd.read_parquet(out / "backpatch.parquet")


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled), or when it has ended."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_parts", [0, 3])
def test_kill_and_resume_computes_only_what_was_missing(tmp_path, reference, kill_after_parts):
    out = tmp_path / "run"
    n_cases = reference.id.nunique()
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after_parts == 0:  # after the evaluation was written, before the sweep's first part
        _kill_when(proc, lambda: (out / "evaluation.parquet").is_file())
    else:
        _kill_when(proc, lambda: len(_parts(out)) >= kill_after_parts)
    before = _parts(out)
    assert len(before) < n_cases, "the sweep finished before it could be killed"
    done = subprocess.run(_cmd(out), check=True, capture_output=True, text=True, timeout=600)
    after = _parts(out)
    assert {name: after[name] for name in before} == before  # nothing done before was redone
    assert len(after) - len(before) == n_cases - len(before)  # only the missing cases were computed
    if before:
        assert f"resuming: {len(before)} of {n_cases} cases already done" in done.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(out / "backpatch.parquet"), reference)
    assert not list((out / "backpatch").glob(".tmp-*"))


@pytest.mark.slow
def test_shards_merge_to_the_full_sweep(tmp_path, reference):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out), "--shard", "0/3"]) == 2  # shards need one evaluation first
    assert main(["evaluate", "--out", str(out), "--split", "test_id", "--limit", "60", "--device", "cpu"]) == 0
    for i in range(3):
        assert main([*ARGS, "--out", str(out), "--shard", f"{i}/3"]) == 0
        assert not (out / "backpatch.parquet").exists()  # a shard writes its parts only
    assert main(["merge", str(out)]) == 0
    merged = pd.read_parquet(out / "backpatch.parquet")
    # other batch compositions: generations identical, log-probs equal up to float noise
    pd.testing.assert_frame_equal(merged.drop(columns="e3_logprob"), reference.drop(columns="e3_logprob"))
    pd.testing.assert_series_equal(merged.e3_logprob, reference.e3_logprob, atol=1e-4, rtol=0)
    (out / "manifest.json").unlink()  # as after an interrupted run: the summary still says what made it
    assert main(["merge", str(out)]) == 0
    summary = json.loads((out / "backpatch_summary.json").read_text())
    assert summary["model"] == "toy" and summary["dataset"] == "toy"


def test_config_file_mirrors_flags(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "sweep.toml"
    config.write_text(f'out = "{out}"\nsplit = "test_id"\nlimit = 30\nmax-cases = 1\npositions = "t2"\n'
                      'kinds = "back"\ndevice = "cpu"\nsource-layers = [7]\ntarget-layers = "0:8:4"\n')
    assert main(["backpatch", "--config", str(config)]) == 0
    table = pd.read_parquet(out / "backpatch.parquet")
    assert set(table.kind) == {"back"} and set(table.position) == {"t2"} and table.id.nunique() <= 2
    assert set(table.source_layer) == {7} and set(table.target_layer) == {0, 4}
    manifest = (out / "manifest.json").read_text()
    assert '"dataset_sha256"' in manifest and '"package_version"' in manifest
    bad = tmp_path / "bad.toml"
    bad.write_text('colour = "blue"\n')
    assert main(["backpatch", "--config", str(bad)]) == 2
    assert "unknown keys ['colour']" in capsys.readouterr().err


def test_shards_are_for_the_shardable_sweeps_only(tmp_path, capsys):
    from latent_hops.analysis import analyses

    assert main(["logit_lens", "--out", str(tmp_path), "--shard", "0/2", "--device", "cpu"]) == 2
    sweeps = ", ".join(sorted(a.name for a in analyses() if a.shardable))
    assert "backpatch" in sweeps and "logit_lens" not in sweeps
    assert f"splits only the sweeps {sweeps}, not `logit_lens`" in capsys.readouterr().err


def test_bad_shard_spec(tmp_path, capsys):
    assert main(["logit_lens", "--out", str(tmp_path), "--shard", "3/2"]) == 2
    assert "need 0 <= i < n" in capsys.readouterr().err


def test_parts_of_another_configuration_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["backpatch", "--out", str(out), "--split", "test_id", "--limit", "40", "--max-cases", "1",
            "--device", "cpu", "--kinds", "back", "--source-layers", "7", "--target-layers", "0"]
    assert main([*base, "--positions", "t2"]) == 0
    assert main([*base, "--positions", "t1"]) == 2
    assert "made differently (config.positions: ['t2'] != ['t1'])" in capsys.readouterr().err
    assert main([*base, "--positions", "t2"]) == 0  # the same configuration resumes
