"""The CLI end to end on the toy model (small): backpatch and stages write their tables."""

import json

import pandas as pd
import pytest

from latent_hops.cli import main

BACKPATCH_COLUMNS = {"id", "position", "source_layer", "target_layer", "kind", "generation", "alias_match", "e3_rank"}
STAGE_COLUMNS = ["id", "subset", "split", "method", "first_hop_layer", "info_propagation_layer",
                 "second_hop_onset_layer", "second_hop_layer", "prediction_extracted_layer", "info_propagation_measures"]


def test_backpatch_then_stages(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--split", "test_id", "--max-cases", "3", "--device", "cpu"]
    assert main(["backpatch", *common]) == 0
    table = pd.read_parquet(out / "backpatch.parquet")
    assert BACKPATCH_COLUMNS <= set(table.columns)
    assert set(table.kind) == {"back", "forward", "random"} and set(table.position) == {"t1", "t2"}
    assert table.id.nunique() == 6  # 3 correct + 3 incorrect
    back = table[table.kind == "back"]
    assert (back.source_layer > back.target_layer).all()
    summary = json.loads((out / "backpatch_summary.json").read_text())
    assert summary["cases"] == 6 and {"oracle", "non_oracle", "oracle_tests"} <= set(summary)
    assert (out / "backpatch_heatmaps.html").stat().st_size > 100_000  # plotly.js embedded: offline
    assert main(["stages", *common, "--probe-train", "200"]) == 0
    stages = pd.read_parquet(out / "stages.parquet")
    assert list(stages.columns) == STAGE_COLUMNS
    assert set(stages.method) == {"logit_lens", "patchscope", "probe"} and stages.id.nunique() == 6


def test_an_unknown_subset_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import latent_hops.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    assert main(["logit_lens", "--out", str(out), "--limit", "3", "--subset", "incorect", "--device", "cpu"]) == 2
    assert "--subset: unknown subset 'incorect'; choose from correct, incorrect or all" in capsys.readouterr().err
    assert not (out / "evaluation.parquet").exists()


def test_an_empty_selection_says_why(tmp_path, capsys):
    assert main(["logit_lens", "--out", str(tmp_path), "--limit", "3", "--subset", "incorrect", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no query is in subsets ['incorrect']" in err and "skip_reason" in err


def test_layer_grids_and_skip(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--out", str(out), "--split", "test_id", "--max-cases", "2", "--device", "cpu"]
    grid = ["--source-layers", "every:3", "--target-layers", "every:3", "--positions", "t2"]
    assert main(["backpatch", *common, *grid]) == 0
    table = pd.read_parquet(out / "backpatch.parquet")
    assert set(table.source_layer) | set(table.target_layer) == {0, 3, 6, 7}  # every 3rd layer + the last
    assert len(table) == 4 * 3 * (4 * 3 // 2)  # 4 cases x 3 kinds x 6 cells of the grid
    oracle = pd.DataFrame(json.loads((out / "backpatch_summary.json").read_text())["oracle"])
    assert set(oracle.cells) == {6}  # the summary says over how many cells the oracle ran
    assert json.loads((out / "backpatch" / "config.json").read_text())["config"]["source_layers"] == "every:3"
    # a coarser grid is another configuration: refused, not mixed into the same parts
    assert main(["backpatch", *common, "--source-layers", "every:2", "--target-layers", "every:2"]) == 2
    assert "config.source_layers: 'every:3' != 'every:2'" in capsys.readouterr().err
    assert main(["stages", *common, "--skip", "patchscope,knockout", "--probe-train", "200"]) == 0
    assert not (out / "patchscope.parquet").exists() and not (out / "knockout.parquet").exists()
    stages = pd.read_parquet(out / "stages.parquet")
    assert set(stages.method) == {"logit_lens", "probe"} and stages.id.nunique() == 4
    assert main(["stages", *common, "--skip", "bogus"]) == 2
    assert "unknown analyses ['bogus']" in capsys.readouterr().err
    assert main(["backpatch", *common, "--source-layers", "0:99"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_parse_layers():
    from latent_hops.positions import parse_layers

    assert parse_layers(None, 30) is None and parse_layers("all", 30) is None
    assert parse_layers("every:3", 30) == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)
    assert parse_layers("every:4", 8, first=-1) == (-1, 3, 7)
    assert parse_layers("0:30:10", 30) == (0, 10, 20)
    assert parse_layers("7,3,3", 8) == (3, 7) and parse_layers([1, 2], 8) == (1, 2)
    for bad in ("every:0", "a,b", "5:2", "-2"):
        try:
            parse_layers(bad, 8)
        except ValueError as err:
            assert "layer grid" in str(err)
        else:
            raise AssertionError(bad)
    for grid, named in (("0:99", "layers 8..98"), ("-3,9", "layers -3, 9"), ("8", "layer 8"), ("-4,-2,9,10", "layers -4, -2, 9..10")):
        with pytest.raises(ValueError, match=f"'{grid}': {named} out of range: this model has layers -1 "):
            parse_layers(grid, 8)


def test_count_flags_are_validated(tmp_path, capsys):
    for flag, value in (("--max-cases", "-1"), ("--batch-size", "0"), ("--limit", "0"), ("--chunk-cases", "0")):
        assert main(["backpatch", "--out", str(tmp_path / "run"), flag, value, "--device", "cpu"]) == 2
        assert f"{flag} must be >=" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, said", [
    ("--screen", "-1", "argument --screen: must be >= 0, got -1"),
    ("--memory-budget-mb", "-5", "argument --memory-budget-mb: must be >= 1, got -5.0"),
    ("--memory-budget-mb", "nan", "argument --memory-budget-mb: must be >= 1, got nan"),
    ("--kinds", "back,bogus", "argument --kinds: choose from back, forward, random, got 'bogus'"),
    ("--max-new-tokens", "x", "argument --max-new-tokens: expects int, got 'x'"),
    ("--noise-scale=-1", None, "argument --noise-scale: must be >= 0, got -1.0"),
])
def test_config_options_say_what_is_wrong(tmp_path, capsys, flag, value, said):
    """An analysis option's bad value is refused by the parser with the reason, not argparse's
    bare "invalid parse value"."""
    with pytest.raises(SystemExit) as exit:
        command = "causal_tracing" if flag.startswith("--noise") else "backpatch"
        main([command, "--out", str(tmp_path / "run"), flag, *([] if value is None else [value])])
    assert exit.value.code == 2 and said in capsys.readouterr().err


def test_a_failed_re_evaluation_keeps_the_old_table(tmp_path, monkeypatch):
    import latent_hops.run as run

    out = tmp_path / "run"
    assert main(["evaluate", "--out", str(out), "--limit", "5", "--device", "cpu"]) == 0
    before = pd.read_parquet(out / "evaluation.parquet")

    def fails(*args, **kwargs):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(run, "evaluate", fails)  # the new evaluation fails half-way (a crash: exit 1)
    assert main(["evaluate", "--out", str(out), "--limit", "5", "--device", "cpu"]) == 1
    pd.testing.assert_frame_equal(pd.read_parquet(out / "evaluation.parquet"), before)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][0]["versions"]["torch"]
    assert [r["status"] for r in manifest["runs"]] == ["ok", "failed"]


def test_version(capsys):
    import pytest

    from latent_hops import __version__

    assert main(["--version"]) == 0  # the light entry point answers without argparse
    assert capsys.readouterr().out == f"latent-hops {__version__}\n"
    from latent_hops.commands import main as full_main

    with pytest.raises(SystemExit) as exit_:  # the full parser says the same
        full_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"latent-hops {__version__}\n"


def test_bfloat16_end_to_end(tmp_path):
    """--dtype bfloat16 through evaluation, back-patching and the logit lens on CPU; the
    manifest records the dtype."""
    out = tmp_path / "bf16"
    common = ["--out", str(out), "--split", "test_id", "--max-cases", "2", "--device", "cpu", "--limit", "60"]
    grid = ["--source-layers", "every:3", "--target-layers", "every:3"]
    assert main(["backpatch", *common, *grid, "--dtype", "bfloat16"]) == 0
    assert main(["logit_lens", *common, "--dtype", "bfloat16"]) == 0
    table = pd.read_parquet(out / "backpatch.parquet")
    assert len(table) > 0 and table.generation.str.len().gt(0).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "bfloat16" in json.dumps(manifest)


def test_device_flags_are_validated(tmp_path, capsys):
    for flags, message in [(["--device", "tpu"], "unknown device 'tpu'"),
                           (["--device", "cpu", "--n-devices", "2"], "n_devices=2 needs")]:
        assert main(["evaluate", "--out", str(tmp_path / "run"), "--limit", "3", *flags]) == 2
        assert message in capsys.readouterr().err


def test_a_narrower_request_summarises_exactly_its_cases(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--out", str(out), "--split", "test_id", "--device", "cpu", "--positions", "t2",
              "--source-layers", "every:3", "--target-layers", "every:3"]
    assert main(["backpatch", *common, "--max-cases", "3"]) == 0
    assert main(["backpatch", *common, "--max-cases", "1"]) == 0
    assert "summarising the 2 requested cases" in capsys.readouterr().out
    assert pd.read_parquet(out / "backpatch.parquet").id.nunique() == 2
    assert json.loads((out / "backpatch_summary.json").read_text())["cases"] == 2
    assert main(["merge", str(out)]) == 0  # merge summarises every part
    assert json.loads((out / "backpatch_summary.json").read_text())["cases"] == 6


def test_help_is_fast_and_imports_nothing_heavy():
    """`--help` and `--version` need no torch, TransformerLens or pandas: the rendered help is
    cached (keyed by the package's sources and the terminal width) after the first call."""
    import subprocess
    import sys
    import time

    code = ("import sys, time\nstart = time.perf_counter()\nfrom latent_hops.cli import main\n"
            "main([*sys.argv[1:], '--help'])\nprint(round(time.perf_counter() - start, 3))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'transformer_lens', 'pandas') if m in sys.modules))")
    first = subprocess.run([sys.executable, "-c", code, "backpatch"], capture_output=True, text=True, check=True)
    assert "--source-layers" in first.stdout and "(default: 50)" in first.stdout  # options, defaults once
    assert "(default: None)" not in first.stdout and "all (default) " not in first.stdout.replace("\n", " ")
    for command in ("backpatch", "report", "demo"):
        start = time.perf_counter()
        again = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        *text, seconds, heavy = again.stdout.strip().splitlines()
        assert heavy == "[]" and float(seconds) < 1.5 and wall < 3, (command, seconds, wall)
        assert "usage: latent-hops" in text[0]
    top = subprocess.run([sys.executable, "-m", "latent_hops.cli", "--help"], capture_output=True, text=True)
    assert "interchange" in top.stdout and "-> interchange.parquet" in top.stdout  # each command: what it writes
    version = subprocess.run([sys.executable, "-m", "latent_hops.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"latent-hops {__import__('latent_hops').__version__}"


def test_every_command_says_what_it_reads_and_writes():
    from latent_hops.commands import render_help

    texts = render_help()
    for command in ("evaluate", "backpatch", "logit_lens", "stages", "interchange", "report", "merge", "demo"):
        assert "RUN_DIR" in texts[command] or ".parquet" in texts[command], command
    assert "RUN_DIR/report.html" in texts["report"] and "no model is loaded" in texts["merge"]

def test_probes_show_progress(tmp_path, capsys):
    assert main(["probe", "--out", str(tmp_path), "--split", "test_id", "--max-cases", "3", "--probe-train", "60",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert all(f"probe {e} at {p}" in err for e, p in (("e2", "t1"), ("e2", "t2"), ("e3", "t2")))


def test_ids_and_threads_select_and_are_recorded(tmp_path, capsys):
    import torch

    from latent_hops.queries import load_dataset

    ids = list(load_dataset("toy").query("split == 'test_id'").id.iloc[[3, 7, 11]])
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["evaluate", "--out", str(out), "--ids", ",".join(ids), "--threads", "1", "--device", "cpu"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert list(pd.read_parquet(out / "evaluation.parquet").id) == ids
    entry = json.loads((out / "manifest.json").read_text())["runs"][-1]
    assert entry["config"]["ids"] == ",".join(ids) and entry["config"]["threads"] == 1
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(ids[:2]) + "\n\n")
    assert main(["evaluate", "--out", str(tmp_path / "two"), "--ids", f"@{listed}", "--device", "cpu"]) == 0
    assert list(pd.read_parquet(tmp_path / "two" / "evaluation.parquet").id) == ids[:2]
    assert main(["evaluate", "--out", str(tmp_path / "bad"), "--ids", f"{ids[0]},nope", "--device", "cpu"]) == 2
    assert "--ids: 1 ids are not in the dataset: nope" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path / "bad"), "--ids", "@missing.txt", "--device", "cpu"]) == 2
    assert "cannot read missing.txt" in capsys.readouterr().err
