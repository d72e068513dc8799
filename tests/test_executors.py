"""Executors: a sweep's shards on local processes, a Ray cluster (a local one here) and a submitit
job array (its local executor) give the single-process table cell by cell; a Ray worker killed in
the middle of a shard is retried and the result is still the same, with no half-written files.
These test sharding, not cells: a 2-cell grid at one position keeps each run short."""

import os
import threading
import time

import pandas as pd
import pytest

from latent_hops.cli import main
from latent_hops.errors import InputError
from latent_hops.executors import ExecutorConfig, Task, TaskResult, shard_tasks
from latent_hops.run import RunSettings

SWEEP = ["backpatch", "--limit", "40", "--device", "cpu", "--positions", "t2", "--source-layers", "7",
         "--target-layers", "0,4"]
KEY = ["id", "position", "source_layer", "target_layer", "kind"]
IN_CI = os.environ.get("CI") == "true"  # CI installs the extras: there nothing may be skipped


def _extra(name):
    if IN_CI:
        return __import__(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert main([*SWEEP, "--out", str(out)]) == 0
    return pd.read_parquet(out / "backpatch.parquet")


def _same_as_single(run, single):
    table = pd.read_parquet(run / "backpatch.parquet")
    assert len(table) == len(single) and not table.duplicated(KEY).any()
    exact = [c for c in table.columns if c != "e3_logprob"]  # generations, successes, ranks
    pd.testing.assert_frame_equal(table[exact], single[exact])
    # other batch compositions: log-probs equal up to float noise
    assert (table.e3_logprob - single.e3_logprob).abs().max() < 1e-4
    assert not list(run.rglob(".tmp-*"))  # nothing half-written remains


def test_shard_tasks_and_config(tmp_path, monkeypatch):
    from latent_hops.analyses.backpatch import BackpatchConfig

    monkeypatch.chdir(tmp_path)
    settings = RunSettings(out="R", dataset="toy", limit=5)
    configs = {"backpatch": BackpatchConfig(positions=("t2",))}
    evaluation, shards = shard_tasks("backpatch", settings, configs, ExecutorConfig("ray", 3))
    assert [t.command for t in evaluation] == ["evaluate"] and evaluation[0].shard == ""
    assert [t.shard for t in shards] == ["0/3", "1/3", "2/3"] and {t.command for t in shards} == {"backpatch"}
    assert shards[0].settings["out"] == str(tmp_path / "R")  # absolute: workers never change directory
    assert shards[0].configs["backpatch"]["positions"] == ("t2",) and not shards[0].settings["progress"]
    again = Task.from_json(shards[1].to_json())
    assert again.command == "backpatch" and again.shard == "1/3" and again.settings["limit"] == 5
    two_gpus = shard_tasks("backpatch", settings, configs, ExecutorConfig("ray", 3, gpus_per_worker=2))[1][0]
    assert two_gpus.settings["n_devices"] == 2  # the model is split over the worker's GPUs
    for bad in (dict(executor="dask"), dict(workers=0), dict(cpus_per_worker=0)):
        with pytest.raises(InputError):
            ExecutorConfig(**bad)


def test_a_worker_reports_an_input_error_with_its_code(tmp_path):
    from latent_hops.executors.worker import run_task

    task = Task("backpatch", RunSettings(out=tmp_path, dataset=str(tmp_path / "missing.csv")).to_dict())
    result = run_task(task)
    assert (result.status, result.code) == ("input-error", "dataset") and "no such file" in result.message
    assert TaskResult.from_json(result.to_json()) == result


def test_executor_flags_are_checked(tmp_path, capsys):
    assert main([*SWEEP, "--out", str(tmp_path), "--workers", "2", "--shard", "0/2"]) == 2
    assert "the executor makes the shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*SWEEP, "--out", str(tmp_path), "--executor", "dask"])
    assert "invalid choice: 'dask'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # only shardable sweeps take executor flags
        main(["logit_lens", "--out", str(tmp_path), "--workers", "2"])

@pytest.mark.slow
def test_local_processes_equal_one_process(tmp_path, single):
    assert main([*SWEEP, "--out", str(tmp_path), "--workers", "2"]) == 0
    _same_as_single(tmp_path, single)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster for the module: no token auth (Ray 2.60 would write ~/.ray/auth_token),
    its session files in a short temporary directory (its sockets' paths must stay under 108
    bytes, which pytest's numbered directories outgrow), a small object store."""
    import shutil
    import tempfile

    ray = _extra("ray")
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    start = time.time()
    session = tempfile.mkdtemp(prefix="lh-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20,
             _temp_dir=session)
    print(f"ray: local cluster started in {time.time() - start:.1f}s")
    yield ray
    ray.shutdown()
    shutil.rmtree(session, ignore_errors=True)
    if old is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = old


@pytest.mark.slow
def test_ray_tasks_equal_one_process(tmp_path, single, ray_cluster, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out means the same in every worker
    start = time.time()
    assert main([*SWEEP, "--out", "run", "--executor", "ray", "--workers", "4"]) == 0
    print(f"ray: 4 shards in {time.time() - start:.1f}s")
    _same_as_single(tmp_path / "run", single)


@pytest.mark.slow
def test_a_ray_worker_killed_mid_shard_is_retried(tmp_path, single, ray_cluster):
    import psutil

    killed: list[int] = []

    def kill_one_running_shard():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if list((tmp_path / "backpatch").glob("part-*.parquet")):  # shards are under way
                for proc in psutil.process_iter(["cmdline"]):
                    if "ray::run_task" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()  # SIGKILL: the worker dies mid-shard, as when preempted
                        killed.append(proc.pid)
                        return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_running_shard)
    killer.start()
    start = time.time()
    code = main([*SWEEP, "--out", str(tmp_path), "--executor", "ray", "--workers", "4", "--chunk-cases", "1"])
    killer.join()
    print(f"ray: 4 shards, one worker killed (pid {killed}), in {time.time() - start:.1f}s")
    assert code == 0 and killed
    _same_as_single(tmp_path, single)


@pytest.mark.slow
def test_submitit_array_equals_one_process(tmp_path, single):
    _extra("submitit")
    config = tmp_path / "sweep.toml"
    config.write_text('[slurm]\ncluster = "local"\ntimeout_min = 30\n')
    run = tmp_path / "run"
    assert main([*SWEEP, "--config", str(config), "--out", str(run), "--executor", "slurm", "--workers", "2"]) == 0
    _same_as_single(run, single)
    assert list((run / "slurm").glob("*_log.out"))  # submitit's job logs are kept in the run directory


@pytest.mark.slow
def test_patchscopes_shard_too(tmp_path):
    """Every resumable sweep is shardable: Patchscopes (all target prompts of a chunk in one part)."""
    scope = ["patchscope", "--limit", "40", "--max-cases", "3", "--target", "toy,repeat", "--device", "cpu",
             "--patchscope-source-layers", "0,3,7", "--patchscope-target-layers", "0,3"]
    assert main([*scope, "--out", str(tmp_path / "one")]) == 0
    assert main([*scope, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = (pd.read_parquet(tmp_path / r / "patchscope.parquet") for r in ("one", "two"))
    assert set(one.target) == {"toy", "repeat"} and one.id.nunique() == 6
    pd.testing.assert_frame_equal(one, two)


@pytest.mark.slow
def test_a_worker_input_error_is_reported_as_one(tmp_path, capsys):
    """A shard that fails on its input is not retried, and the driver says why in one line."""
    code = main([*SWEEP, "--out", str(tmp_path), "--workers", "2", "--source-layers", "0,99"])
    err = capsys.readouterr().err
    assert code == 2 and "a worker failed (shard 0/2)" in err and "out of range" in err
    assert not (tmp_path / "backpatch.parquet").exists()
