"""The analysis registry, stage measures, table provenance and config round-trips.

- an analysis added as one registered module gets a CLI command with options from its
  config, a table that records what made it, a stage measure of its own in the stage table
  and a report section, with nothing else edited;
- a table is reused exactly when it was made the same way: counted by the analysis' own
  runs, not read off a log line; a runtime-only change (batch size) reuses, another model,
  config or weights does not;
- every analysis config round-trips through ``config_from_dict`` exactly, or raises;
- the stage table is built from the declared measures only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from latent_hops.analyses.knockout import KnockoutConfig, knockout_layer
from latent_hops.analyses.stages import stage_table
from latent_hops.analysis import (
    REGISTRY,
    Analysis,
    StageMeasure,
    analyses,
    first_layer,
    get,
    option,
    register,
)
from latent_hops.cli import main
from latent_hops.commands import build_parser
from latent_hops.config import config_from_dict
from latent_hops.errors import InputError
from latent_hops.evaluation import EvaluationConfig
from latent_hops.models import load_model
from latent_hops.queries import load_dataset
from latent_hops.run import Run
from latent_hops.rundir import made_by_of, read_table
from latent_hops.tables import ID, Column, TableSchema

SMALL = ["--split", "test_id", "--max-cases", "2", "--device", "cpu", "--limit", "40"]
RUNS: list[int] = []


@dataclass(frozen=True)
class OnsetConfig:
    layer: int = option(0, "the block every case is said to read the bridge at")


def _onset_run(context, config) -> pd.DataFrame:
    RUNS.append(len(context.cases))
    return pd.DataFrame({"id": [c.id for c in context.cases], "block": config.layer})


@pytest.fixture
def new_analysis():
    """A whole analysis that contributes a stage measure, as its own module would define it;
    removed again afterwards."""
    RUNS.clear()
    analysis = register(Analysis(
        name="constant_read", title="A constant read", help="every case reads the bridge at --layer",
        config=OnsetConfig, run=_onset_run,
        schema=TableSchema("constant_read.parquet", "a case", (ID, Column("block", "int", "the block"))),
        stage_measures=(StageMeasure("read_layer", "info_propagation", "never read", "read"),),
        stage_layers=lambda table, config: first_layer(table, table.block >= 0, "read_layer", "block").to_frame(),
        note=lambda config: f"Every case reads at block {config.layer}.",
        report=lambda section: section.html_table(section.table.describe())))
    yield analysis
    REGISTRY.pop("constant_read")


def test_a_new_analysis_is_one_registered_module(tmp_path, new_analysis):
    assert "constant_read" in [a.name for a in analyses()]
    assert "--layer" in build_parser()._subparsers._group_actions[0].choices["constant_read"].format_help()
    out = tmp_path / "run"
    assert main(["constant_read", "--out", str(out), *SMALL, "--layer", "5"]) == 0
    table = read_table(out / "constant_read.parquet")
    assert set(table.block) == {5} and table.id.nunique() == 4 and RUNS == [4]
    made_by = table.attrs["made_by"]
    assert made_by["analysis"] == "constant_read" and made_by["config"] == {"layer": 5} and made_by["model"] == "toy"
    skip = ",".join(a.name for a in analyses() if a.stage_measures and a.name not in ("constant_read", "logit_lens"))
    assert main(["stages", "--out", str(out), *SMALL, "--layer", "5", "--skip", skip]) == 0
    assert RUNS == [4]  # made the same way: reused, not run again
    stages = pd.read_parquet(out / "stages.parquet").set_index("id")
    # its measure joins information propagation beside the logit lens' e2-at-t2 layer
    lens = pd.read_parquet(out / "logit_lens.parquet")
    e2_at_t2 = lens[(lens.position == "t2") & (lens.e2_rank == 0)].groupby("id").hidden_layer.min()
    for qid, row in stages.iterrows():
        measures = [5.0] + ([float(e2_at_t2[qid])] if qid in e2_at_t2.index else [])
        assert row.info_propagation_layer == sum(measures) / len(measures)
        assert row.info_propagation_measures == ("read,e2_at_t2" if len(measures) == 2 else "read")
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "A constant read" in page and "Every case reads at block 5." in page


def test_an_undeclared_stage_column_is_an_error(new_analysis):
    """A stage_layers that returns a column it did not declare is a bug, never dropped."""
    table = pd.DataFrame({"id": ["a"], "block": [1]})
    broken = dataclasses.replace(new_analysis, stage_layers=lambda t, c: t.set_index("id").rename(
        columns={"block": "reed_layer"}))
    with pytest.raises(RuntimeError, match="declared stage measures"):
        broken.measured_layers(table, OnsetConfig())
    with pytest.raises(ValueError, match="a layer column ends in _layer"):
        StageMeasure("read", "info_propagation", "never")
    with pytest.raises(ValueError, match="unknown stage"):
        StageMeasure("read_layer", "third_hop", "never")


def test_an_analysis_whose_table_breaks_its_schema_is_a_bug_not_an_input_error(tmp_path, new_analysis, capsys):
    REGISTRY["constant_read"] = dataclasses.replace(
        new_analysis, schema=TableSchema("constant_read.parquet", "a case", (ID,)))
    assert main(["constant_read", "--out", str(tmp_path), *SMALL]) == 1
    assert "produced columns ['id', 'block'], declared ['id']" in capsys.readouterr().err
    REGISTRY["constant_read"] = dataclasses.replace(new_analysis, schema=TableSchema(
        "constant_read.parquet", "a case", (ID, Column("block", "str", "the block"))))
    assert main(["constant_read", "--out", str(tmp_path), *SMALL]) == 1
    assert "block (int64, declared str)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy_queries():
    return load_dataset("toy").query("split == 'test_id'").iloc[:30]


def _count_runs(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    analysis = get(name)
    original = analysis.run

    def counted(context, config):
        calls.append(len(context.cases))
        return original(context, config)

    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(analysis, run=counted))
    return calls


def test_reuse_follows_what_made_the_table(tmp_path, toy, toy_queries, monkeypatch):
    calls = _count_runs(monkeypatch, "logit_lens")
    out = tmp_path / "run"
    Run(toy, toy_queries, out, batch_size=8).table("logit_lens")
    assert calls == [len(Run(toy, toy_queries).cases()[0])]
    assert Run(toy, toy_queries, batch_size=8).config("logit_lens").batch_size == 8  # as --batch-size
    Run(toy, toy_queries, out, batch_size=3).table("logit_lens")  # batch size: runtime only
    assert len(calls) == 1
    other = dataclasses.replace(get("logit_lens").config(), onset_k=3)
    Run(toy, toy_queries, out, configs={"logit_lens": other}).table("logit_lens")  # another config
    assert len(calls) == 2
    assert made_by_of(out / "logit_lens.parquet")["config"]["onset_k"] == 3


def test_changed_weights_under_the_same_spec_are_not_reused(tmp_path, toy_queries, monkeypatch):
    calls = _count_runs(monkeypatch, "logit_lens")
    out = tmp_path / "run"
    model = load_model("toy", device="cpu")
    Run(model, toy_queries, out).table("logit_lens")
    with torch.no_grad():
        model.tl.blocks[0].mlp.W_out[0, 0] += 1.0  # the same spec ("toy"), other weights
    Run(model, toy_queries, out).table("logit_lens")
    assert len(calls) == 2
    assert made_by_of(out / "logit_lens.parquet")["weights_sha256"] == model.weights_fingerprint()


def test_tables_of_another_model_or_config_are_not_reused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["evaluate", "--model", "toy", "--limit", "12", "--out", out, "--device", "cpu"]) == 0
    assert main(["logit_lens", "--model", "toy-gpt2", "--limit", "12", "--out", out, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "not reusing" in printed and "model: 'toy' != 'toy-gpt2'" in printed
    assert made_by_of(tmp_path / "run" / "evaluation.parquet")["model"] == "toy-gpt2"
    common = ["--out", out, *SMALL]
    assert main(["knockout", *common, "--window", "1"]) == 0
    assert main(["stages", *common, "--skip", "patchscope,probe"]) == 0  # default --window 3
    assert "made differently (config.window: 1 != 3)" in capsys.readouterr().out
    assert made_by_of(tmp_path / "run" / "knockout.parquet")["config"]["window"] == 3


def test_tables_of_an_older_latent_hops_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["logit_lens", "--out", str(out), *SMALL]) == 0
    table = read_table(out / "logit_lens.parquet")
    made_by = {k: v for k, v in table.attrs["made_by"].items() if k != "tables"}  # as written by 0.1.0
    from latent_hops.rundir import write_table

    write_table(table, out / "logit_lens.parquet", made_by)
    assert main(["stages", "--out", str(out), *SMALL, "--skip", "patchscope,probe,knockout"]) == 2
    err = capsys.readouterr().err
    assert "written by an older latent_hops (table schema 1, now 2): recompute it" in err
    with pytest.raises(InputError, match="older latent_hops") as caught:
        read_table(out / "logit_lens.parquet")
    assert caught.value.code == "run-dir"


@pytest.mark.parametrize("analysis", [a.name for a in analyses()] + ["evaluate"])
def test_configs_round_trip_exactly(analysis):
    from latent_hops.analyses.backpatch import Cell
    from latent_hops.analyses.patchscopes import TargetPrompt

    kind = EvaluationConfig if analysis == "evaluate" else get(analysis).config
    default = kind()
    assert config_from_dict(kind, dataclasses.asdict(default)) == default
    changed = {  # a non-default value of every kind of field the configs have
        "backpatch": dict(cells=(Cell(3, 1, "back"), Cell(1, 3, "forward")), source_layers="every:2",
                          target_layers=(0, 2), memory_budget_mb=512.0, screen=4, positions=("t2",)),
        "patchscope": dict(target=TargetPrompt.from_text("Paris: x"), layer_pairs=((1, 0), (2, 1)), seeds=(0, 1)),
        "knockout": dict(presets=("last_to_t1", "all_to_t1"), stage_preset="all_to_t1", window=1),
        "stages": dict(skip=("probe",)),
        "probe": dict(margin=0.2, hold_out_target=True),
        "logit_lens": dict(onset_k=3, include_embeddings=False),
    }.get(analysis, {})
    config = dataclasses.replace(default, **changed)
    assert config_from_dict(kind, dataclasses.asdict(config)) == config
    with pytest.raises(InputError, match="unknown fields"):
        config_from_dict(kind, {**dataclasses.asdict(config), "colour": "blue"})


def test_a_value_that_cannot_be_rebuilt_raises():
    from latent_hops.analyses.backpatch import BackpatchConfig

    with pytest.raises(InputError, match="cannot rebuild"):
        config_from_dict(BackpatchConfig, {"cells": [{"source": "three", "target": 1, "kind": "back"}]})
    with pytest.raises(InputError, match="cannot rebuild"):
        config_from_dict(BackpatchConfig, {"positions": ["t3"]})  # not a Literal choice


def _ko(ids, preset, changed_at):
    return pd.DataFrame([{"id": i, "preset": preset, "window_center": layer, "changed": layer >= changed_at[i]}
                         for i in ids for layer in range(4)])


def test_the_knockout_stage_measures_its_preset():
    ko = _ko(["a", "b"], "all_to_t1", {"a": 1, "b": 2})
    with pytest.raises(InputError, match="no 'last_to_t1' rows"):
        knockout_layer(ko)
    assert list(knockout_layer(ko, "all_to_t1")) == [1, 2]
    evaluation = pd.DataFrame({"id": ["a", "b"], "subset": "correct", "split": "test"})
    lens = _lens({"a": (2, 9, 3), "b": (1, 9, 3)})
    with pytest.raises(InputError, match="no 'last_to_t1' rows"):
        stage_table(evaluation, {"logit_lens": lens, "knockout": ko})
    configs = {"knockout": KnockoutConfig(presets=("all_to_t1",))}  # the first preset is measured
    stages = stage_table(evaluation, {"logit_lens": lens, "knockout": ko}, configs)
    assert list(stages.info_propagation_measures) == ["knockout", "knockout"]
    with pytest.raises(InputError, match="--knockout-preset last_to_t1 is not among the knockout's --presets"):
        KnockoutConfig(presets=("all_to_t1",), stage_preset="last_to_t1")


def test_stages_refuses_a_preset_the_knockout_does_not_run(tmp_path, capsys):
    assert main(["stages", "--out", str(tmp_path / "run"), *SMALL, "--presets", "all_to_t1",
                 "--knockout-preset", "last_to_t1"]) == 2
    assert "--knockout-preset last_to_t1 is not among the knockout's --presets all_to_t1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def _rank(layer: int, first: int, after: int = 5) -> int:
    """Rank 0 from layer ``first`` on, a near miss (rank 1) just before, far (``after``) earlier."""
    return 0 if layer >= first else 1 if layer == first - 1 else after


def _lens(layers: dict[str, tuple[int, int, int]], n_layers: int = 4) -> pd.DataFrame:
    """A logit-lens table where, per case, e2 is top at t1 from layer a, at t2 from layer b,
    and e3 is top at t2 from layer c on (rank 1 one layer earlier: still in the top k)."""
    rows = []
    for i, (a, b, c) in layers.items():
        for layer in range(-1, n_layers):
            rows.append({"id": i, "position": "t1", "hidden_layer": layer, "e2_rank": _rank(layer, a), "e3_rank": 50})
            rows.append({"id": i, "position": "t2", "hidden_layer": layer, "e2_rank": _rank(layer, b),
                         "e3_rank": _rank(layer, c, after=50)})
    return pd.DataFrame(rows).astype({"e2_rank": "Int64", "e3_rank": "Int64"})


def test_stage_values_from_hand_built_tables():
    evaluation = pd.DataFrame({"id": ["a", "b"], "subset": ["correct", "incorrect"], "split": "test"})
    lens = _lens({"a": (1, 2, 3), "b": (0, 9, 2)})
    projection = pd.DataFrame([{"id": i, "block": layer, "sublayer": sub,
                                "e2_rank": 0 if (sub == "attn" and layer >= {"a": 1, "b": 3}[i]) else 4,
                                "prediction_rank": 0 if (sub == "mlp" and layer >= {"a": 2, "b": 3}[i]) else 4}
                               for i in "ab" for layer in range(4) for sub in ("attn", "mlp")])
    ko = _ko(["a", "b"], "last_to_t1", {"a": 0, "b": 9})
    stages = stage_table(evaluation, {"logit_lens": lens, "projection": projection, "knockout": ko}).set_index("id")
    a, b = stages.loc["a"], stages.loc["b"]
    # onset: e3 within the top 10 from the near miss on; second hop: e3 top
    assert (a.first_hop_layer, a.second_hop_onset_layer, a.second_hop_layer, a.prediction_extracted_layer) == (
        1, 2, 3, 2)
    assert a.info_propagation_layer == (0 + 1 + 2) / 3 and a.info_propagation_measures == "knockout,attn_e2,e2_at_t2"
    assert b.info_propagation_layer == 3 and b.info_propagation_measures == "attn_e2"  # no knockout effect, no e2
    assert (b.first_hop_layer, b.second_hop_layer, b.second_hop_onset_layer) == (0, 2, 1)
    assert list(stages.method) == ["logit_lens", "logit_lens"]


def test_report_notes_come_from_the_configs_that_made_the_tables(tmp_path):
    out = str(tmp_path)
    common = ["--out", out, *SMALL, "--max-new-tokens", "6"]
    assert main(["knockout", *common, "--window", "1"]) == 0
    assert main(["report", out]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "6 new tokens" in page and "[l − 1, l + 1]" in page and "6 greedy tokens" in page
    assert "10 new tokens" not in page and "l − 3" not in page
    assert "model toy, dataset toy" in page


def test_the_column_dictionary_is_current():
    """docs/columns.md is generated from the declared schemas (which check every table written)."""
    from conftest import load_script

    module = load_script("column_docs")
    assert module.OUT.read_text() == module.render(), "python scripts/column_docs.py"
    text = module.render()
    for name in ("evaluation.parquet", "backpatch.parquet", "backpatch_cells.parquet", "backpatch_summary.json",
                 "manifest.json", "skipped", "queries"):
        assert f"## {name}" in text or f"`{name}`" in text, name


def test_stage_table_without_the_logit_lens_and_of_analysed_cases_only():
    """Patchscopes alone decode; the knockout before it in the registry is used too; a case of
    the evaluation that no table holds is not a row; an unknown table name is refused."""
    evaluation = pd.DataFrame({"id": ["unanalysed", "a"], "subset": ["correct", "incorrect"], "split": "test"})
    scopes = pd.DataFrame([("a", "t1", 1, "e2"), ("a", "t2", 2, "e2"), ("a", "t2", 3, "e3")],
                          columns=["id", "position", "source_layer", "decoded"])
    ko = _ko(["a"], "last_to_t1", {"a": 1})
    stages = stage_table(evaluation, {"logit_lens": None, "knockout": ko, "patchscope": scopes})
    assert list(stages.id) == ["a"] and list(stages.method) == ["patchscope"]
    row = stages.iloc[0]
    assert (row.first_hop_layer, row.second_hop_layer, row.info_propagation_layer) == (1, 3, 1.5)
    assert row.info_propagation_measures == "knockout,e2_at_t2" and row.subset == "incorrect"
    with pytest.raises(InputError, match=r"no stage analysis named \['nope'\]"):
        stage_table(evaluation, {"nope": scopes, "patchscope": scopes})
