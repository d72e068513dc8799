"""The analysis registry, table provenance and the defects of issue 11, each on a small run.

- an analysis added as one registered module gets a CLI command with options from its
  config, a table that records what made it, a place in the stage table and a report
  section, with nothing else edited;
- a table made by another model (or another config) is never reused;
- the stage table refuses a knockout table without the preset it measures, and says which
  measures each information-propagation value averages;
- the report's methods notes come from the configs that made the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest

from latent_hops.analyses.knockout import knockout_layer
from latent_hops.analyses.stages import StagesConfig, stage_table
from latent_hops.analysis import REGISTRY, Analysis, Column, analyses, option, register
from latent_hops.cli import build_parser, main
from latent_hops.errors import InputError
from latent_hops.evaluation import evaluate
from latent_hops.models import load_model
from latent_hops.queries import load_dataset
from latent_hops.rundir import made_by_of

SMALL = ["--split", "test_id", "--max-cases", "2", "--device", "cpu"]


@dataclass(frozen=True)
class FirstLayerConfig:
    layer: int = option(0, "the layer every case is said to resolve its first hop at")


def _first_layer_run(context, config) -> pd.DataFrame:
    return pd.DataFrame({"id": [c.id for c in context.cases], "layer": config.layer})


@pytest.fixture
def new_analysis():
    """A whole analysis, as its own module would define it; removed again afterwards."""
    analysis = register(Analysis(
        name="first-layer", title="A constant first layer", help="every case resolves at --layer",
        config=FirstLayerConfig, run=_first_layer_run,
        columns=(Column("id", "query id"), Column("layer", "the layer")),
        stage_layers=lambda table, stages: table.set_index("id").rename(columns={"layer": "first_hop_layer"}),
        decodes="constant", note=lambda config: f"Every case resolves at layer {config.layer}.",
        report=lambda section: section.html_table(section.table.describe())))
    yield analysis
    REGISTRY.pop("first-layer")


def test_a_new_analysis_is_one_registered_module(tmp_path, new_analysis, capsys):
    assert "first-layer" in [a.name for a in analyses()]
    assert "--layer" in build_parser()._subparsers._group_actions[0].choices["first-layer"].format_help()
    out = tmp_path / "run"
    assert main(["first-layer", "--out", str(out), *SMALL, "--layer", "5"]) == 0
    table = pd.read_parquet(out / "first_layer.parquet")
    assert set(table.layer) == {5} and table.id.nunique() == 4
    made_by = made_by_of(out / "first_layer.parquet")
    assert made_by["analysis"] == "first-layer" and made_by["config"] == {"layer": 5} and made_by["model"] == "toy"
    skip = ",".join(a.name for a in analyses() if a.stage_layers is not None and a.name != "first-layer")
    assert main(["stages", "--out", str(out), *SMALL, "--layer", "5", "--skip", skip]) == 0
    assert "reusing" in capsys.readouterr().out  # made the same way: reused
    stages = pd.read_parquet(out / "stages.parquet")
    assert set(stages.method) == {"constant"} and set(stages.first_hop_layer) == {5}
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "A constant first layer" in page and "Every case resolves at layer 5." in page


def test_an_analysis_whose_table_breaks_its_schema_is_a_bug_not_an_input_error(tmp_path, new_analysis, capsys):
    REGISTRY["first-layer"] = Analysis(**{**vars(new_analysis), "columns": (Column("id", "query id"),)})
    assert main(["first-layer", "--out", str(tmp_path), *SMALL]) == 1
    assert "produced columns ['id', 'layer'], declared ['id']" in capsys.readouterr().err


def test_tables_of_another_model_or_config_are_not_reused(tmp_path, capsys):
    """Issue 11, defect 1: evaluation.parquet of toy was reused for toy-gpt2, and a knockout
    table of another --window by stages."""
    out = str(tmp_path / "run")
    assert main(["evaluate", "--model", "toy", "--limit", "12", "--out", out, "--device", "cpu"]) == 0
    assert main(["logit-lens", "--model", "toy-gpt2", "--limit", "12", "--out", out, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "not reusing" in printed and "model: 'toy' != 'toy-gpt2'" in printed
    stored = pd.read_parquet(tmp_path / "run" / "evaluation.parquet")
    fresh = evaluate(load_model("toy-gpt2", device="cpu"), load_dataset("toy").iloc[:12])
    assert list(stored.subset) == list(fresh.subset)  # toy-gpt2's own labels
    assert made_by_of(tmp_path / "run" / "evaluation.parquet")["model"] == "toy-gpt2"

    common = ["--out", out, "--limit", "40", *SMALL]
    assert main(["knockout", *common, "--window", "1"]) == 0
    assert main(["stages", *common, "--skip", "patchscope,probe"]) == 0  # default --window 3
    assert "made differently (config.window: 1 != 3)" in capsys.readouterr().out
    assert made_by_of(tmp_path / "run" / "knockout.parquet")["config"]["window"] == 3


def _ko(ids, preset, changed_at):
    return pd.DataFrame([{"id": i, "preset": preset, "layer": layer, "changed": layer >= changed_at[i]}
                         for i in ids for layer in range(4)])


def test_the_knockout_stage_needs_its_preset():
    """Issue 11, defect 2: a table of all_to_t1 rows only silently gave NaN knockout layers."""
    ko = _ko(["a", "b"], "all_to_t1", {"a": 1, "b": 2})
    with pytest.raises(InputError, match="no 'last_to_t1' rows"):
        knockout_layer(ko)
    assert list(knockout_layer(ko, "all_to_t1")) == [1, 2]
    evaluation = pd.DataFrame({"id": ["a", "b"], "subset": "correct", "split": "test"})
    lens = _lens({"a": (2, 9, 3), "b": (1, 9, 3)})
    with pytest.raises(InputError, match="no 'last_to_t1' rows"):
        stage_table(evaluation, {"logit-lens": lens, "knockout": ko})
    stages = stage_table(evaluation, {"logit-lens": lens, "knockout": ko}, StagesConfig(knockout_preset="all_to_t1"))
    assert list(stages.info_propagation_measures) == ["knockout", "knockout"]


def test_stages_refuses_a_preset_the_knockout_does_not_run(tmp_path, capsys):
    assert main(["stages", "--out", str(tmp_path), *SMALL, "--presets", "all_to_t1"]) == 2
    assert "--knockout-preset last_to_t1 is not among the knockout's --presets all_to_t1" in capsys.readouterr().err


def _rank(layer: int, first: int, after: int = 5) -> int:
    """Rank 0 from layer ``first`` on, a near miss (rank 1) just before, far (``after``) earlier."""
    return 0 if layer >= first else 1 if layer == first - 1 else after


def _lens(layers: dict[str, tuple[int, int, int]], n_layers: int = 4) -> pd.DataFrame:
    """A logit-lens table where, per case, e2 is top at t1 from layer a, at t2 from layer b,
    and e3 is top at t2 from layer c on (rank 1 one layer earlier: still in the top k)."""
    rows = []
    for i, (a, b, c) in layers.items():
        for layer in range(-1, n_layers):
            rows.append({"id": i, "position": "t1", "layer": layer, "e2_rank": _rank(layer, a), "e3_rank": 50})
            rows.append({"id": i, "position": "t2", "layer": layer, "e2_rank": _rank(layer, b),
                         "e3_rank": _rank(layer, c, after=50)})
    return pd.DataFrame(rows)


def test_stage_values_from_hand_built_tables():
    evaluation = pd.DataFrame({"id": ["a", "b"], "subset": ["correct", "incorrect"], "split": "test"})
    lens = _lens({"a": (1, 2, 3), "b": (0, 9, 2)})
    projection = pd.DataFrame([{"id": i, "layer": layer, "sublayer": sub,
                                "e2_rank": 0 if (sub == "attn" and layer >= {"a": 1, "b": 3}[i]) else 4,
                                "prediction_rank": 0 if (sub == "mlp" and layer >= {"a": 2, "b": 3}[i]) else 4}
                               for i in "ab" for layer in range(4) for sub in ("attn", "mlp")])
    ko = _ko(["a", "b"], "last_to_t1", {"a": 0, "b": 9})
    stages = stage_table(evaluation, {"logit-lens": lens, "projection": projection, "knockout": ko}).set_index("id")
    a, b = stages.loc["a"], stages.loc["b"]
    # onset: e3 within the top 10 from the near miss on; second hop: e3 top
    assert (a.first_hop_layer, a.second_hop_onset_layer, a.second_hop_layer, a.prediction_extracted_layer) == (
        1, 2, 3, 2)
    assert a.info_propagation_layer == (0 + 1 + 2) / 3 and a.info_propagation_measures == "knockout,attn_e2,e2_at_t2"
    assert b.info_propagation_layer == 3 and b.info_propagation_measures == "attn_e2"  # no knockout effect, no e2
    assert (b.first_hop_layer, b.second_hop_layer, b.second_hop_onset_layer) == (0, 2, 1)


def test_report_notes_come_from_the_configs_that_made_the_tables(tmp_path):
    """Issue 11, defect 4: '10 new tokens' and '[l − 3, l + 3]' were constants, and the title
    said 'model ?' without a back-patching run."""
    out = str(tmp_path)
    common = ["--out", out, "--limit", "40", *SMALL, "--max-new-tokens", "6"]
    assert main(["knockout", *common, "--window", "1"]) == 0
    assert main(["report", out]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "6 new tokens" in page and "[l − 1, l + 1]" in page and "6 greedy tokens" in page
    assert "10 new tokens" not in page and "l − 3" not in page
    assert "model toy, dataset toy" in page


def test_the_column_dictionary_is_current():
    """docs/columns.md is generated from the declared columns (which check every table written)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "column_docs.py"
    spec = importlib.util.spec_from_file_location("column_docs", path)
    module = sys.modules["column_docs"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text() == module.render(), "python scripts/column_docs.py"
    assert "## evaluation.parquet" in module.render() and "## backpatch.parquet" in module.render()
