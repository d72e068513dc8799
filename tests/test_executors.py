"""Executors: a sweep's shards on local processes, a Ray cluster (a local one here) and a submitit
job array (its local executor) give the single-process table cell by cell; a Ray worker killed in
the middle of a shard is retried and the result is still the same, with no half-written files."""

import os
import threading
import time

import pandas as pd
import pytest

from latent_hops.cli import main
from latent_hops.errors import InputError
from latent_hops.executors import ExecutorConfig, shard_commands

SWEEP = ["backpatch", "--limit", "40", "--device", "cpu"]
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


def test_shard_commands_and_config():
    argv = ["backpatch", "--out", "R", "--executor", "ray", "--workers", "3"]
    commands = shard_commands(argv, ExecutorConfig("ray", 3))
    assert [c[-1] for c in commands] == ["0/3", "1/3", "2/3"]
    assert commands[0][-6:-2] == ["--executor", "local", "--workers", "1"]  # later flags win
    two_gpus = shard_commands(argv, ExecutorConfig("ray", 3, gpus_per_worker=2))[0]
    assert two_gpus[-4:-2] == ["--n-devices", "2"]  # the model is split over the worker's GPUs
    for bad in (dict(executor="dask"), dict(workers=0), dict(cpus_per_worker=0)):
        with pytest.raises(InputError):
            ExecutorConfig(**bad)


def test_executor_flags_are_checked(tmp_path, capsys):
    assert main([*SWEEP, "--out", str(tmp_path), "--workers", "2", "--shard", "0/2"]) == 2
    assert "the executor makes the shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*SWEEP, "--out", str(tmp_path), "--executor", "dask"])
    assert "invalid choice: 'dask'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # only shardable sweeps take executor flags
        main(["logit-lens", "--out", str(tmp_path), "--workers", "2"])

@pytest.mark.slow
def test_local_processes_equal_one_process(tmp_path, single):
    assert main([*SWEEP, "--out", str(tmp_path), "--workers", "2"]) == 0
    _same_as_single(tmp_path, single)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster for the module: no token auth (Ray 2.60 would write ~/.ray/auth_token),
    its session files under pytest's temporary directory, a small object store."""
    ray = _extra("ray")
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    start = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    print(f"ray: local cluster started in {time.time() - start:.1f}s")
    yield ray
    ray.shutdown()
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
                    if "ray::run_command" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()  # SIGKILL: the worker dies mid-shard, as when preempted
                        killed.append(proc.pid)
                        return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_running_shard)
    killer.start()
    start = time.time()
    code = main([*SWEEP, "--out", str(tmp_path), "--executor", "ray", "--workers", "4", "--chunk-cases", "3"])
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
    assert code == 2 and "a worker failed" in err and "out of range" in err
    assert not (tmp_path / "backpatch.parquet").exists()
