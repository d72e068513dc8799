"""A corpus of bad inputs through every CLI entry point: each ends with a non-zero exit code
and one line naming the offending input (never a traceback), or, for a bad row, that row
is excluded with its reason and every other row is saved. Our own bugs still show their
traceback and ask for a report."""

from __future__ import annotations

import json
import os
import re
import shutil

import pandas as pd
import pytest

from latent_hops import models, run
from latent_hops.cli import main
from latent_hops.models import toy_checkpoint_dir
from latent_hops.queries import load_dataset, write_paper_csv

COMMANDS = ["evaluate", "backpatch", "logit_lens", "project", "knockout", "patchscope", "probe", "stages", "demo"]


def toy_csv(path, edit=None, rows=6):
    table = load_dataset("toy").iloc[:rows].copy()
    if edit:
        edit(table)
    write_paper_csv(table, path)
    return path


def raw_csv(path, edit):
    """Edit a CSV's cells as text (after the writer's own formatting)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(table)
    table.to_csv(path, index=False)
    return path


def fails(capsys, argv, message, code=2):
    """Run the CLI; it must exit with ``code`` and one line containing ``message``, no traceback."""
    assert main(argv) == code, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("latent-hops: error:")]
    assert len(lines) == 1 and message in lines[0], err
    return lines[0]


# -------------------------------------------------------------------------- datasets


def _set(column, value, row=0):
    def edit(table):
        table[column] = table[column].astype(object)
        table.iat[row, table.columns.get_loc(column)] = value
    return edit


DATASETS = {
    "named placeholder": (lambda p: toy_csv(p, _set("r1_template", "the {kind} of {}")), "named or numbered fields"),
    "two slots": (lambda p: toy_csv(p, _set("r2_template", "the {} of {}")), "exactly one '{}' slot"),
    "lone brace": (lambda p: toy_csv(p, _set("r2_template", "the { of {}")), "not a valid template"),
    "missing column": (lambda p: toy_csv(p, lambda t: t.drop(columns=["e2_label"], inplace=True)), "e2_label"),
    "empty label": (lambda p: toy_csv(p, _set("e2_label", "  ", row=3)),
                    f"e2_label is empty in 1 rows (ids: {load_dataset('toy').id.iloc[3]})"),
    "duplicate ids": (lambda p: toy_csv(p, _set("id", load_dataset("toy").id.iloc[1])), "duplicate query ids"),
    "bad alias literal": (lambda p: raw_csv(toy_csv(p), _set("e3_aliases", "['unclosed")), "e3_aliases"),
    "empty": (lambda p: toy_csv(p, lambda t: t.drop(t.index, inplace=True)), "empty"),
    "not UTF-8": (lambda p: (p.write_bytes(b"id,e1_label\n1,\xff\xfe\n"), p)[1], "cannot be parsed"),
    "wrong delimiter": (lambda p: (p.write_text(toy_csv(p).read_text().replace(",", ";")), p)[1],
                        "its header is semicolon-separated"),
    "no such file": (lambda p: p, "no such file"),
}


@pytest.mark.parametrize("kind", list(DATASETS))
def test_bad_datasets(tmp_path, capsys, kind):
    make, message = DATASETS[kind]
    path = make(tmp_path / "data.csv")
    fails(capsys, ["evaluate", "--dataset", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"], message)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_entry_point_validates_its_dataset(tmp_path, capsys, command):
    path = DATASETS["named placeholder"][0](tmp_path / "data.csv")
    fails(capsys, [command, "--dataset", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"], "row id")


def test_labels_are_normalised_so_t1_is_right(tmp_path):
    path = toy_csv(tmp_path / "data.csv", _set("e1_label", "  " + load_dataset("toy").e1_label.iloc[0] + " "))
    table = load_dataset(path)
    assert table.e1_label.iloc[0] == load_dataset("toy").e1_label.iloc[0]


def test_one_over_long_prompt_is_excluded_and_the_rest_saved(tmp_path, capsys):
    long_label = " ".join(["Imagine"] * 80)  # far beyond the toy's 64-token context
    path = toy_csv(tmp_path / "data.csv", _set("e1_label", long_label, row=2))
    out = tmp_path / "run"
    assert main(["evaluate", "--dataset", str(path), "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_parquet(out / "evaluation.parquet")
    assert len(table) == 6
    bad = table[table.id == load_dataset("toy").id.iloc[2]].iloc[0]
    assert bad.subset == "excluded" and "exceeds the model's context of 64 tokens" in bad.skip_reason
    assert (table.drop(index=bad.name).first_hop_generation.str.len() > 0).all()
    assert pd.isna(bad.first_hop_generation) and pd.isna(bad.first_hop_alias_match)  # not run: null
    # analyses skip it with the same reason instead of crashing
    assert main(["logit_lens", "--dataset", str(path), "--out", str(out), "--device", "cpu",
                 "--subset", "all"]) == 0


# -------------------------------------------------------------------------- models


def _checkpoint(tmp_path, edit):
    path = tmp_path / "model"
    shutil.copytree(toy_checkpoint_dir("toy"), path)
    edit(path)
    return str(path)


def _truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _arch(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))


MODELS = {
    "truncated weights": (_truncate, "could not read the weights"),
    "unknown architecture": (_arch, "'MambaForCausalLM' is not supported"),
    "bad config JSON": (lambda p: (p / "config.json").write_text("{"), "not valid JSON"),
    "no config": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "broken tokenizer": (lambda p: (p / "tokenizer.json").write_text("{"), "could not load the tokenizer"),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_bad_checkpoints(tmp_path, capsys, kind):
    edit, message = MODELS[kind]
    fails(capsys, ["evaluate", "--model", _checkpoint(tmp_path, edit), "--out", str(tmp_path / "run"), "--limit", "2",
                   "--device", "cpu"], message)


# -------------------------------------------------------------------------- flags, run directories, configs

FLAGS = {
    "device tpu": (["--device", "tpu"], "unknown device 'tpu'"),
    "too many GPUs": (["--device", "cpu", "--n-devices", "4"], "n_devices=4 needs"),
    "negative count": (["--max-cases", "-1"], "--max-cases must be >= 1"),
    "no cases": (["--max-cases", "0"], "--max-cases must be >= 1, got 0"),
    "bad shard": (["--shard", "3/2"], "--shard"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "layer out of range": (["--source-layers", "0:99"], "backpatch source_layers (--source-layers): layer grid '0:99': layers 8..98 out of range"),
    "unknown dtype": (["--dtype", "float8"], "unknown dtype"),
    "unknown model": (["--model", "no-such-model"], "'no-such-model' is neither"),
}


@pytest.mark.parametrize("kind", list(FLAGS))
def test_bad_flags(tmp_path, capsys, kind):
    flags, message = FLAGS[kind]
    fails(capsys, ["backpatch", "--out", str(tmp_path / "run"), "--limit", "4", *flags], message)


@pytest.mark.parametrize("command, flags, message", [
    ("backpatch", ["--target-layers=-3,2,9"], "backpatch target_layers (--target-layers): layer grid '-3,2,9': layers -3, 9 out"),
    ("patchscope", ["--patchscope-source-layers", "8"], "patchscope source_layers (--patchscope-source-layers): layer grid '8': layer 8 out"),
    ("causal_tracing", ["--trace-layers", "every:2,"], "causal_tracing trace_layers (--trace-layers): layer grid 'every:2,': use 'all'"),
])
def test_layer_grids_are_checked_before_the_evaluation(tmp_path, capsys, monkeypatch, command, flags, message):
    """A grid naming a layer the model lacks fails once the model is loaded, before the
    evaluation (minutes on a real model) runs, and leaves no run directory behind."""
    monkeypatch.setattr(run, "evaluate", lambda *a, **k: pytest.fail("evaluated before the grid was checked"))
    fails(capsys, [command, "--out", str(tmp_path / "run"), "--device", "cpu", *flags], message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, fields, message", [
    ("causal_tracing", {"trace_window": 0}, "causal_tracing trace_window (--trace-window) must be >= 1, got 0"),
    ("backpatch", {"memory_budget_mb": float("nan")}, "backpatch memory_budget_mb (--memory-budget-mb) must be >= 1, got nan"),
    ("backpatch", {"source_layers": (0, 12)}, "backpatch source_layers (--source-layers): layer grid (0, 12): layer 12 out"),
])
def test_configs_made_in_python_are_checked_as_flags_are(toy, monkeypatch, name, fields, message):
    """A Run's configs built in Python meet the options' minimums and layer ranges that flags
    and config files do, before anything is evaluated."""
    from latent_hops.analysis import get

    monkeypatch.setattr(run, "evaluate", lambda *a, **k: pytest.fail("evaluated before the configs were checked"))
    with pytest.raises(run.InputError, match=re.escape(message)):
        run.Run(toy, load_dataset("toy").iloc[:4], configs={name: get(name).config(**fields)})


def test_out_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before --out was checked"))
    afile = tmp_path / "file"
    afile.write_text("x")
    fails(capsys, ["evaluate", "--out", str(afile)], "is a file, not a run directory")
    fails(capsys, ["evaluate", "--out", str(afile / "below")], "file is a file, not a directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: a read-only directory cannot be made
        return
    fails(capsys, ["evaluate", "--out", str(locked / "run")], "cannot write there")


@pytest.mark.parametrize("toml, message", [
    ('max-cases = "three"', "key 'max-cases' expects int, got 'three'"),
    ("include-embeddings = 3", "key 'include-embeddings' expects true or false"),
    ("bogus = 1", "unknown keys ['bogus'] (no command takes them)"),
    ("positions = [", "config"),
])
def test_bad_config_files(tmp_path, capsys, toml, message):
    config = tmp_path / "c.toml"
    config.write_text(f'out = "{tmp_path / "run"}"\n{toml}\n')
    fails(capsys, ["backpatch", "--config", str(config), "--device", "cpu"], message)


def test_config_lists_are_comma_separated_flags(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'out = "{tmp_path / "run"}"\npositions = ["t1"]\nkinds = ["back"]\nmax-cases = 1\n'
                      'split = "test_id"\nsource-layers = [5, 7]\ntarget-layers = [0]\n')
    assert main(["backpatch", "--config", str(config), "--device", "cpu"]) == 0
    table = pd.read_parquet(tmp_path / "run" / "backpatch.parquet")
    assert set(table.position) == {"t1"} and set(table.kind) == {"back"} and set(table.source_layer) == {5, 7}


def _damage(path):
    path.write_bytes(path.read_bytes()[:100])  # a truncated copy, a full disk


def test_damaged_tables_are_remade_or_named(tmp_path, capsys, caplog):
    """A run directory's damaged Parquet file is never an internal error: a table that would
    be reused is recomputed (and replaced), one that must be read is named."""
    out = tmp_path / "run"
    sweep = ["backpatch", "--out", str(out), "--limit", "12", "--positions", "t2", "--kinds", "back",
             "--device", "cpu"]
    assert main(sweep) == 0
    table = pd.read_parquet(out / "backpatch.parquet")
    _damage(out / "evaluation.parquet")
    assert main(sweep) == 0  # the evaluation is remade; the parts are reused
    assert "not reusing" in caplog.text and "not a readable Parquet table" in caplog.text
    pd.testing.assert_frame_equal(pd.read_parquet(out / "backpatch.parquet"), table)
    assert len(pd.read_parquet(out / "evaluation.parquet")) == 12
    _damage(next((out / "backpatch").glob("part-*.parquet")))
    fails(capsys, sweep, "part-")
    _damage(out / "backpatch.parquet")
    fails(capsys, ["report", str(out)], "backpatch.parquet: not a readable Parquet table")


def test_a_shard_without_cases_has_nothing_to_do(tmp_path, capsys):
    """The hash can leave a shard none of the chosen cases (more workers than cases: it failed
    the whole sweep): that shard succeeds, writes nothing and says why, and the shards merged
    give the unsharded table. (In this process: what each worker of an executor runs.)"""
    from latent_hops.run import ANALYSED_SUBSETS
    from latent_hops.rundir import in_shard

    queries = ["--limit", "6", "--device", "cpu"]
    common = [*queries, "--positions", "t2", "--kinds", "back", "--source-layers", "7", "--target-layers", "0,3"]
    one, out = tmp_path / "one", tmp_path / "run"
    assert main(["backpatch", "--out", str(one), *common]) == 0
    assert main(["evaluate", "--out", str(out), *queries]) == 0  # shards share one evaluation
    evaluation = pd.read_parquet(out / "evaluation.parquet")
    chosen = evaluation[evaluation.subset.isin(ANALYSED_SUBSETS)].id
    n = 4
    empty = [k for k in range(n) if not any(in_shard(i, (k, n)) for i in chosen)]
    assert len(chosen) == 6 and empty  # the dataset's first six ids leave shard 1 of 4 empty
    for k in range(n):
        capsys.readouterr()
        assert main(["backpatch", "--out", str(out), *common, "--shard", f"{k}/{n}"]) == 0
        said = capsys.readouterr().out
        assert (f"shard {k}/{n} holds none of the 6 chosen cases" in said) == (k in empty), said
    assert main(["merge", str(out)]) == 0
    merged, single = (pd.read_parquet(r / "backpatch.parquet") for r in (out, one))
    exact = [c for c in single.columns if c != "e3_logprob"]  # generations, successes, ranks
    pd.testing.assert_frame_equal(merged[exact], single[exact])
    assert (merged.e3_logprob - single.e3_logprob).abs().max() < 1e-4  # other batches: float noise


def test_merge_and_report_on_a_missing_run(tmp_path, capsys):
    fails(capsys, ["merge", str(tmp_path / "nothing")], "no result parts")
    fails(capsys, ["report", str(tmp_path / "nothing")], "no evaluation.parquet")


# -------------------------------------------------------------------------- our own bugs


def test_internal_errors_show_the_traceback_and_ask_for_a_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "evaluate", lambda *a, **k: 1 / 0)
    assert main(["evaluate", "--out", str(tmp_path / "run"), "--limit", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "please report" in err


def test_debug_shows_input_errors_whole(tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path / "run"), "--device", "tpu", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "unknown device 'tpu'" in err


@pytest.mark.parametrize("sep,name", [(";", "semicolon"), ("\t", "tab")])
def test_a_csv_with_another_delimiter_is_named(tmp_path, sep, name):
    path = tmp_path / "data.csv"
    load_dataset("toy").iloc[:3].to_csv(path, sep=sep, index=False)
    with pytest.raises(ValueError, match=f"its header is {name}-separated") as caught:
        load_dataset(path)
    assert "missing required columns" not in str(caught.value)


def test_a_refused_input_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["evaluate", "--out", str(out), "--dataset", str(tmp_path / "missing.csv")]) == 2
    assert main(["logit_lens", "--out", str(out), "--subset", "nope"]) == 2
    assert not (tmp_path / "new").exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["evaluate", "--out", str(afile / "run")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_an_interrupt_says_what_was_saved(tmp_path, capsys, monkeypatch):
    import latent_hops.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "evaluate", interrupted)  # while evaluating: nothing saved yet
    out = tmp_path / "run"
    assert main(["backpatch", "--out", str(out), "--limit", "20", "--device", "cpu"]) == 130
    assert "interrupted; nothing was saved" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["status"] == "interrupted"
    monkeypatch.undo()

    calls = []

    def sweep_then_stop(model, cases, config=None):
        from latent_hops.analyses.backpatch.engine import sweep as real

        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(model, cases, config)

    import latent_hops.analyses.backpatch as bp

    monkeypatch.setattr(bp, "sweep", sweep_then_stop)  # the second part is interrupted
    args = ["backpatch", "--out", str(out), "--limit", "40", "--split", "test_id", "--max-cases", "2",
            "--chunk-cases", "1", "--device", "cpu", "--source-layers", "7", "--target-layers", "0"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "saved in" in err and "evaluation.parquet" in err and "1 parts in" in err and "resume" in err
