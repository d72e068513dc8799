"""Sweeps survive kill -9: restarted with the same command they finish with exactly the
tables of an uninterrupted run (nothing lost, nothing duplicated); shards and configs."""

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

ARGS = ["backpatch", "--split", "test_id", "--max-cases", "8", "--chunk-cases", "2", "--device", "cpu",
        "--positions", "t2"]


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "latent_hops.cli", *ARGS, "--out", str(out)]


def _parts(out: Path) -> int:
    return len(list((out / "backpatch").glob("part-*.parquet"))) if (out / "backpatch").is_dir() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(_cmd(out), check=True, capture_output=True, timeout=600)
    return pd.read_parquet(out / "backpatch.parquet")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_parts", [0, 1, 3, 6])
def test_kill_and_resume_equals_uninterrupted(tmp_path, reference, kill_after_parts):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _parts(out) < kill_after_parts and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if kill_after_parts == 0:
        time.sleep(3)  # somewhere in start-up or evaluation
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _parts(out)
    subprocess.run(_cmd(out), check=True, capture_output=True, timeout=600)
    final = pd.read_parquet(out / "backpatch.parquet")
    pd.testing.assert_frame_equal(final, reference)
    n_parts = -(-reference.id.nunique() // 2)
    assert _parts(out) == n_parts and killed_at <= n_parts
    assert not list((out / "backpatch").glob(".tmp-*"))


@pytest.mark.slow
def test_shards_merge_to_the_full_sweep(tmp_path, reference):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out), "--shard", "0/3"]) == 2  # shards need one evaluation first
    assert main(["evaluate", "--out", str(out), "--split", "test_id", "--device", "cpu"]) == 0
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
                      'kinds = "back"\ndevice = "cpu"\n')
    assert main(["backpatch", "--config", str(config)]) == 0
    table = pd.read_parquet(out / "backpatch.parquet")
    assert set(table.kind) == {"back"} and set(table.position) == {"t2"} and table.id.nunique() <= 2
    manifest = (out / "manifest.json").read_text()
    assert '"dataset_sha256"' in manifest and '"package_version"' in manifest
    bad = tmp_path / "bad.toml"
    bad.write_text('colour = "blue"\n')
    assert main(["backpatch", "--config", str(bad)]) == 2
    assert "unknown keys ['colour']" in capsys.readouterr().err


def test_shards_are_for_the_shardable_sweeps_only(tmp_path, capsys):
    assert main(["logit-lens", "--out", str(tmp_path), "--shard", "0/2", "--device", "cpu"]) == 2
    assert "splits only the sweeps backpatch, patchscope, not `logit-lens`" in capsys.readouterr().err


def test_bad_shard_spec(tmp_path, capsys):
    assert main(["logit-lens", "--out", str(tmp_path), "--shard", "3/2"]) == 2
    assert "need 0 <= i < n" in capsys.readouterr().err


def test_parts_of_another_configuration_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["backpatch", "--out", str(out), "--split", "test_id", "--limit", "40", "--max-cases", "1",
            "--device", "cpu", "--kinds", "back"]
    assert main([*base, "--positions", "t2"]) == 0
    assert main([*base, "--positions", "t1"]) == 2
    assert "made differently (config.positions: ['t2'] != ['t1'])" in capsys.readouterr().err
    assert main([*base, "--positions", "t2"]) == 0  # the same configuration resumes
