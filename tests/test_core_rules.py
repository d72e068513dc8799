"""The core rules without a model, against hand-written expectations: provenance comparison
and reuse, resumable parts, shards, the manifest, the stage reducers, back-patching's cells
and statistics. Fast, and what ``make mutation`` leans on."""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from latent_hops import rundir
from latent_hops.analyses.backpatch import (
    BackpatchConfig,
    Cell,
    all_cells,
    bootstrap_ci,
    cell_rates,
)
from latent_hops.analyses.projection import projection_layers
from latent_hops.analysis import DECODED_MEASURES, StageMeasure, decoded_layers, first_layer, get
from latent_hops.errors import InputError, RunDirError
from latent_hops.tables import SCHEMA_VERSION, Column, TableSchema

MADE_BY = {"model": "toy", "config": {"window": 3, "positions": ["t1", "t2"]}, "tables": SCHEMA_VERSION}


# ---------------------------------------------------------------------------- provenance


def test_differences_name_every_differing_key_nested():
    assert rundir.differences(MADE_BY, MADE_BY) == []
    other = {"model": "toy-gpt2", "config": {"window": 1, "positions": ("t1", "t2")}, "tables": SCHEMA_VERSION}
    assert rundir.differences(MADE_BY, other) == ["config.window: 3 != 1", "model: 'toy' != 'toy-gpt2'"]
    assert rundir.differences(MADE_BY, {**MADE_BY, "seed": 0}) == ["seed: None != 0"]  # a new key differs too
    assert rundir.differences(None, MADE_BY) == ["no provenance recorded (a table from an older latent_hops)"]


def test_schema_versions_are_checked(tmp_path):
    rundir.check_schema(MADE_BY, tmp_path)
    for made_by, shown in (({}, "table schema 1"), ({"tables": SCHEMA_VERSION + 1}, f"schema {SCHEMA_VERSION + 1}"),
                           (None, "table schema 1")):
        with pytest.raises(RunDirError, match=shown):
            rundir.check_schema(made_by, tmp_path)


def test_a_table_is_reused_only_as_it_was_made(tmp_path, caplog):
    path = tmp_path / "t.parquet"
    frame = pd.DataFrame({"id": ["a", "b", "c"], "x": [1, 2, 3]})
    rundir.write_table(frame, path, MADE_BY)
    assert rundir.made_by_of(path) == json.loads(json.dumps(MADE_BY))
    pd.testing.assert_frame_equal(rundir.reusable_table(path, MADE_BY), frame)
    pd.testing.assert_frame_equal(rundir.reusable_table(path, MADE_BY, {"c", "a"}),
                                  frame.iloc[[0, 2]].reset_index(drop=True))
    assert rundir.reusable_table(path, MADE_BY, {"a", "z"}) is None  # does not cover the ids
    with caplog.at_level(logging.INFO, logger="latent_hops"):
        assert rundir.reusable_table(path, {**MADE_BY, "model": "other"}) is None
    assert "not reusing" in caplog.text and "model: 'toy' != 'other'" in caplog.text
    assert rundir.reusable_table(tmp_path / "missing.parquet", MADE_BY) is None
    rundir.write_table(frame, path, {"model": "toy"})  # schema 1
    with pytest.raises(RunDirError, match="older latent_hops"):
        rundir.reusable_table(path, MADE_BY)


def test_read_table_carries_what_made_it(tmp_path):
    path = tmp_path / "t.parquet"
    rundir.write_table(pd.DataFrame({"id": ["a"]}), path, MADE_BY)
    table = rundir.read_table(path)
    assert table.attrs["made_by"]["model"] == "toy" and list(table.id) == ["a"]
    with pytest.raises(InputError, match="no such table"):
        rundir.read_table(tmp_path / "nope.parquet")


# ---------------------------------------------------------------------------- parts


@dataclass
class _Case:
    id: str


def test_parts_are_resumed_not_recomputed(tmp_path):
    folder = tmp_path / "sweep"
    cases = [_Case(f"q{i}") for i in range(5)]
    computed: list[list[str]] = []

    def compute(part):
        computed.append([c.id for c in part])
        return pd.DataFrame({"id": [c.id for c in part], "value": [int(c.id[1:]) ** 2 for c in part]})

    assert rundir.run_in_parts(folder, cases[:3], 2, compute, made_by=MADE_BY) == 0
    assert computed == [["q0", "q1"], ["q2"]] and len(list(folder.glob("part-*.parquet"))) == 2
    skipped: list[int] = []
    assert rundir.run_in_parts(folder, cases, 2, compute, on_skip=skipped.append, made_by=MADE_BY) == 3
    assert computed[2:] == [["q3", "q4"]] and skipped == [3]  # only what was missing
    assert rundir.done_ids(folder) == {c.id for c in cases}
    merged = rundir.merge_parts(folder, order=["q4", "q0", "q3", "q1", "q2"])
    assert list(merged.id) == ["q4", "q0", "q3", "q1", "q2"] and list(merged.value) == [16, 0, 9, 1, 4]
    assert list(rundir.merge_parts(folder, order=["q1"]).id) == ["q1"]  # just the cases asked for
    with pytest.raises(InputError, match="made differently"):
        rundir.run_in_parts(folder, cases, 2, compute, made_by={**MADE_BY, "model": "x"})
    with pytest.raises(InputError, match="chunk must be >= 1"):
        rundir.run_in_parts(folder, cases, 0, compute, made_by=MADE_BY)
    with pytest.raises(InputError, match="no result parts"):
        rundir.merge_parts(tmp_path / "empty")


def test_a_dead_writers_temporary_files_are_removed_a_live_ones_kept(tmp_path):
    import subprocess

    writer = subprocess.Popen(["sleep", "60"])  # a live writer of our own (signals hit only it)
    try:
        dead = tmp_path / f".tmp-part-x-{rundir.HOST}-999999999"
        live = tmp_path / f".tmp-part-y-{rundir.HOST}-{writer.pid}"
        mine = tmp_path / f".tmp-part-w-{rundir.HOST}-{os.getpid()}"  # this process starts afresh
        other_host = tmp_path / ".tmp-part-z-elsewhere-1"
        for f in (dead, live, mine, other_host):
            f.write_text("half")
        rundir.remove_stale_temp(tmp_path)
        assert not dead.exists() and not mine.exists() and live.exists() and other_host.exists()
        rundir.remove_stale_temp(tmp_path, everyone=True)
        assert not list(tmp_path.glob(".tmp-*"))
    finally:
        writer.kill()
        writer.wait()


def test_shards_partition_the_ids():
    ids = [f"q{i}" for i in range(200)]
    for n in (1, 2, 3, 7):
        owners = [[i for i in range(n) if rundir.in_shard(q, (i, n))] for q in ids]
        assert all(len(o) == 1 for o in owners)  # each id in exactly one shard
        sizes = np.bincount([o[0] for o in owners], minlength=n)
        assert sizes.min() > 0.5 * 200 / n  # and the shards are about even
    assert rundir.in_shard("q1", (zlib.crc32(b"q1") % 3, 3))
    assert rundir.parse_shard(None) == (0, 1) and rundir.parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/2", "1/0", "a/b", "1"):
        with pytest.raises(InputError):
            rundir.parse_shard(bad)


def test_the_manifest_appends_an_entry_per_command(tmp_path):
    rundir.record_run(tmp_path, "evaluate", {"limit": 3}, "abc", 0.0)
    rundir.record_run(tmp_path, "backpatch", {}, None, 1.0, status="interrupted")
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert [(r["command"], r["status"], r["dataset_sha256"]) for r in runs] == [
        ("evaluate", "ok", "abc"), ("backpatch", "interrupted", None)]
    assert runs[0]["config"] == {"limit": 3} and runs[0]["versions"]["torch"]


def test_run_directories_are_checked(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        rundir.check_run_dir(afile)
    rundir.check_run_dir(tmp_path / "new")
    assert rundir.file_hash(afile) == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


# ---------------------------------------------------------------------------- schemas


def test_a_schema_checks_names_order_and_kinds():
    schema = TableSchema("t.parquet", "a row", (Column("id", "str", ""), Column("rank", "Int64", ""),
                                                Column("ok", "boolean", ""), Column("layer", "int", "")))
    good = pd.DataFrame({"id": ["a", "b"], "rank": pd.array([1, None], dtype="Int64"),
                         "ok": pd.array([True, None], dtype="boolean"), "layer": [0, -1]})
    schema.check(good)
    schema.check(schema.empty())
    with pytest.raises(RuntimeError, match="produced columns"):
        schema.check(good[["rank", "id", "ok", "layer"]])
    for column, values in (("rank", [1, -1]), ("ok", [True, False]), ("layer", [0.5, 1.0]),
                           ("layer", pd.array([1, None], dtype="Int64")), ("id", [1, 2])):
        with pytest.raises(RuntimeError, match=f"{column} "):
            schema.check(good.assign(**{column: values}))


# ---------------------------------------------------------------------------- stage reducers


def test_first_layer_is_the_smallest_layer_where_it_holds():
    table = pd.DataFrame({"id": ["b", "b", "b", "a", "a", "c"], "hidden_layer": [2, 0, 1, 3, 1, 0]})
    holds = pd.Series([True, False, True, pd.NA, True, False], dtype="boolean")
    out = first_layer(table, holds, "x_layer", "hidden_layer")
    assert list(out.index) == ["b", "a", "c"] and out.name == "x_layer"  # every id, in order of appearance
    assert out["b"] == 1 and out["a"] == 1 and pd.isna(out["c"])  # a null holds nothing


def test_decoded_layers_per_position_and_entity():
    rows = [("a", "t1", 0, "e2"), ("a", "t1", 1, "e2"), ("a", "t2", 2, "e2"), ("a", "t2", 3, "e3"),
            ("b", "t1", 1, "e3"), ("b", "t2", 0, "e3"), ("b", "t2", 1, "e2")]
    table = pd.DataFrame(rows, columns=["id", "position", "source_layer", "decoded"])
    out = decoded_layers(table, lambda r, e: r.decoded == e, "source_layer").set_index("id")
    assert list(out.columns) == [m.column for m in DECODED_MEASURES]
    assert out.loc["a"].tolist() == [0, 2, 3]
    assert pd.isna(out.loc["b", "first_hop_layer"]) and out.loc["b", "e2_at_t2_layer"] == 1
    assert out.loc["b", "second_hop_layer"] == 0


def test_stage_measures_are_declared_properly():
    measure = StageMeasure("read_layer", "info_propagation", "never")
    assert measure.label == "read" and not measure.decoded
    assert StageMeasure("x_layer", "first_hop", "never", "custom").label == "custom"
    assert get("logit-lens").name == "logit_lens" and get("patchscopes").name == "patchscope"  # aliases
    with pytest.raises(InputError, match="unknown analysis 'nope'"):
        get("nope")


def test_projection_layers_hand_made():
    rows = [("a", b, s, 0 if (s == "attn" and b >= 2) else 3, 0 if (s == "mlp" and b >= 1) else 5)
            for b in range(4) for s in ("attn", "mlp")]
    rows += [("b", b, s, pd.NA, 7) for b in range(4) for s in ("attn", "mlp")]
    table = pd.DataFrame(rows, columns=["id", "block", "sublayer", "e2_rank", "prediction_rank"]).astype(
        {"e2_rank": "Int64"})
    out = projection_layers(table).set_index("id")
    assert out.loc["a"].tolist() == [2, 1] and out.loc["b"].isna().all()


# ---------------------------------------------------------------------------- back-patching


class _Model:
    n_layers = 4

    def check_layers(self, layers):
        layers = list(layers)
        if any(not -1 <= x < 4 for x in layers):
            raise InputError("out of range")
        return layers


def test_cells_of_each_kind():
    cells = all_cells(_Model(), BackpatchConfig())
    by_kind = {k: {(c.source, c.target) for c in cells if c.kind == k} for k in ("back", "forward", "random")}
    assert by_kind["back"] == {(s, t) for s in range(4) for t in range(4) if s > t} == by_kind["random"]
    assert by_kind["forward"] == {(s, t) for s in range(4) for t in range(4) if s < t}
    assert len(cells) == 18
    with_emb = all_cells(_Model(), BackpatchConfig(kinds=("back",), include_embeddings=True))
    assert len(with_emb) == 10 and Cell(0, -1, "back") in with_emb
    grid = all_cells(_Model(), BackpatchConfig(kinds=("back", "forward"), source_layers="0,3", target_layers=(1,)))
    assert grid == [Cell(3, 1, "back"), Cell(0, 1, "forward")]
    explicit = (Cell(1, 1, "back"),)
    assert all_cells(_Model(), BackpatchConfig(cells=explicit)) == list(explicit)
    with pytest.raises(InputError, match="out of range"):
        all_cells(_Model(), BackpatchConfig(cells=(Cell(9, 1, "back"),)))
    with pytest.raises(InputError, match="unknown patch kinds"):
        all_cells(_Model(), BackpatchConfig(kinds=("sideways",)))  # type: ignore[arg-type]


def test_cell_rates_hand_computed():
    rows = [dict(id=i, position="t2", source_layer=2, target_layer=0, kind="back", alias_match=ok,
                 subset="incorrect", split=split) for i, ok, split in (("a", True, "x"), ("b", False, "x"),
                                                                        ("c", True, "y"))]
    rates = cell_rates(pd.DataFrame(rows).astype({"alias_match": "boolean"})).set_index("split")
    assert rates.loc["x", ["cases", "successes", "rate"]].tolist() == [2, 1, 0.5]
    assert rates.loc["all", ["cases", "successes"]].tolist() == [3, 2]  # every split pooled


def test_bootstrap_interval():
    low, high = bootstrap_ci([])
    assert np.isnan(low) and np.isnan(high)
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    low, high = bootstrap_ci([0, 1] * 20)
    assert 0.3 < low < 0.5 < high < 0.7


def test_evaluation_subset_columns_mean_what_they_say():
    """The vocabulary's own words (documented and checked on every write)."""
    from latent_hops.evaluation import EVALUATION

    kinds = {c.name: c.kind for c in EVALUATION.columns}
    assert kinds["composition_alias_match"] == "boolean" and kinds["t1"] == "Int64" and kinds["skip_reason"] == "str"
    assert Path(__file__).parent.joinpath("..", "docs", "columns.md").resolve().read_text().count("skip_reason") >= 3


# ---------------------------------------------------------------------------- statistics


def test_rate_intervals_against_their_closed_forms():
    from latent_hops.stats import rate_interval

    z = 1.959963984540054  # the 97.5% normal quantile
    for k, n in ((0, 10), (3, 10), (10, 10), (7, 25)):
        p = k / n
        centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(
            p * (1 - p) / n + z * z / (4 * n * n))
        low, high = rate_interval(k, n)
        assert low == pytest.approx(max(0.0, centre - half), abs=1e-9)
        assert high == pytest.approx(min(1.0, centre + half), abs=1e-9)
    low, high = rate_interval(0, 10, method="exact")  # Clopper-Pearson: 1 - 0.025 ** (1 / n)
    assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    assert rate_interval(10, 10, method="exact")[0] == pytest.approx(0.025 ** (1 / 10), abs=1e-9)
    assert all(np.isnan(rate_interval(0, 0)))
    with pytest.raises(ValueError, match="unknown interval method"):
        rate_interval(1, 2, method="bootstrap")


def test_mcnemar_counts_discordant_pairs_exactly():
    from latent_hops.stats import mcnemar

    test = mcnemar([True, True, True, False, True], [False, False, False, False, True])
    assert (test.only_a, test.only_b) == (3, 0) and test.p_value == pytest.approx(2 * 0.5 ** 3)
    assert mcnemar([True, False], [True, False]).p_value == 1.0  # no discordant pair
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_paired_permutation():
    from latent_hops.stats import paired_permutation

    assert paired_permutation([1.0, 2.0], [1.0, 2.0]) == 1.0
    strong = paired_permutation([1.0] * 12, [0.0] * 12)
    assert strong < 0.001 and paired_permutation([0.5, 0.4, 0.6, 0.5], [0.5, 0.5, 0.5, 0.5]) > 0.5
    assert strong == paired_permutation([1.0] * 12, [0.0] * 12)  # seeded: reproducible


def test_a_converted_checkpoint_carries_what_older_transformers_read(tmp_path):
    """transformers 4.40-4.57 read ``rope_theta`` (4.57 ignores 5.x's ``rope_parameters`` and falls
    back to 10,000), ``rope_scaling``, Gemma 3's ``rope_local_base_freq`` and ``torch_dtype``; their
    tokenizers know ``PreTrainedTokenizerFast``, not ``TokenizersBackend``; a Llama's generate
    refuses ``token_type_ids``. The real model: tests/test_real_model.py."""
    from latent_hops.gguf import make_portable

    def convert(config: dict, tokenizer: dict) -> tuple[dict, dict]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
        make_portable(tmp_path)
        return (json.loads((tmp_path / "config.json").read_text()),
                json.loads((tmp_path / "tokenizer_config.json").read_text()))

    config, tokenizer = convert({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                                 "dtype": "float32"}, {"tokenizer_class": "TokenizersBackend"})
    assert config["rope_theta"] == 100000.0 and "rope_scaling" not in config and config["torch_dtype"] == "float32"
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}  # 5.x's own kept
    assert tokenizer == {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"]}
    gemma = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    config, _ = convert(gemma, {"tokenizer_class": "GemmaTokenizer"})
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    _, tokenizer = convert({}, {"tokenizer_class": "GemmaTokenizer"})
    assert tokenizer["tokenizer_class"] == "GemmaTokenizer"  # a class older versions know is kept
    # BPE merges as "a b" strings (tokenizers < 0.20, i.e. transformers 4.40, reads only those)
    for merges, written in (([["a", "b"], ["ab", "c"]], ["a b", "ab c"]), ([["a", " "]], [["a", " "]])):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": merges}}))
        convert({}, {})
        assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"] == written


def test_probe_layers_count_only_where_the_probe_beats_its_control():
    from latent_hops.analyses.probe import probe_accuracy, probe_layers

    rows = []
    for qid in ("a", "b", "c", "d"):
        for layer in (0, 1, 2):
            hit = layer >= (1 if qid in "ab" else 2)  # a, b from layer 1; c, d from layer 2
            control = layer == 0  # the control hits everything at layer 0 only
            rows.append(dict(id=qid, entity="e2", position="t2", hidden_layer=layer, token_match=hit,
                             control_token_match=control, candidates=5))
            rows.append(dict(id=qid, entity="e2", position="t1", hidden_layer=layer, token_match=layer == 2,
                             control_token_match=layer == 2, candidates=5))  # never beats its control
    probed = pd.DataFrame(rows)
    acc = probe_accuracy(probed).set_index(["position", "hidden_layer"])
    assert acc.loc[("t2", 1), ["cases", "accuracy", "control"]].tolist() == [4, 0.5, 0.0]
    layers = probe_layers(probed, margin=0.10).set_index("id")
    assert layers.e2_at_t2_layer.to_dict() == {"a": 1, "b": 1, "c": 2, "d": 2}
    assert layers.first_hop_layer.isna().all() and layers.second_hop_layer.isna().all()
    assert probe_layers(probed, margin=0.6).set_index("id").e2_at_t2_layer.to_dict() == {"a": 2, "b": 2, "c": 2,
                                                                                           "d": 2}


def test_knockout_edges_of_each_preset():
    from latent_hops.analyses.knockout import edges
    from latent_hops.cases import Case

    case = Case("q", "", {"t1": 4, "t2": 7}, {}, r1_tokens=[1, 2])
    assert edges(case, "last_to_t1") == ([7], [4])
    assert edges(case, "all_to_t1") == ([5, 6, 7], [4])
    assert edges(case, "last_to_r1") == ([7], [1, 2])
    assert "unknown" in edges(Case("q", "", {"t1": 4, "t2": 7}, {}), "last_to_r1")
    with pytest.raises(InputError, match="unknown knockout preset"):
        edges(case, "sideways")
