"""The CLI end to end on the toy model (small): backpatch and stages write their tables."""

import json

import pandas as pd

from latent_hops.cli import main

BACKPATCH_COLUMNS = {"id", "position", "source_layer", "target_layer", "kind", "generation", "success", "e3_rank"}
STAGE_COLUMNS = ["id", "subset", "split", "method", "first_hop_layer", "info_propagation_layer",
                 "second_hop_onset_layer", "second_hop_layer", "prediction_extracted_layer"]


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
    assert summary["cases"] == 6 and {"oracle", "non_oracle"} <= set(summary)
    assert (out / "backpatch_heatmaps.html").stat().st_size > 100_000  # plotly.js embedded: offline
    assert main(["stages", *common, "--probe-train", "200"]) == 0
    stages = pd.read_parquet(out / "stages.parquet")
    assert list(stages.columns) == STAGE_COLUMNS
    assert set(stages.method) == {"logit_lens", "patchscopes", "probe"} and stages.id.nunique() == 6


def test_analysis_rejects_empty_subset(tmp_path, capsys):
    assert main(["logit-lens", "--out", str(tmp_path), "--limit", "3", "--subset", "nonsense", "--device", "cpu"]) == 2
    assert "no queries in subsets" in capsys.readouterr().err
