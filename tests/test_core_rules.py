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


def test_merged_parts_keep_each_cases_rows_in_order(tmp_path):
    """A case's rows (its layers, cells...) come back in the order they were written, whatever
    order the cases are asked for: a stable sort, also for many rows per case."""
    folder = tmp_path / "rows"
    for key, ids in (("first", ["b", "a"]), ("second", ["c"])):
        frame = pd.DataFrame({"id": [i for i in ids for _ in range(40)], "row": [r for _ in ids for r in range(40)]})
        rundir.write_part(folder, frame, key)
    merged = rundir.merge_parts(folder, order=["c", "a", "b"])
    assert list(merged.id) == ["c"] * 40 + ["a"] * 40 + ["b"] * 40
    assert list(merged.row) == list(range(40)) * 3


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
    if Path("/proc/self").is_dir():  # a directory nobody can write to, root included
        with pytest.raises(RunDirError, match="cannot write there"):
            rundir.check_run_dir(Path("/proc/self/run"))
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
    every = all_cells(_Model(), BackpatchConfig(kinds=("forward",), include_embeddings=True,
                                                source_layers="every:2", target_layers="every:2"))
    assert every == [Cell(-1, 1, "forward"), Cell(-1, 3, "forward"), Cell(1, 3, "forward")]  # from the embedding
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
    assert paired_permutation([1.0], [0.0]) == 1.0  # one case: +d and -d are equally extreme
    assert paired_permutation([1.0, 1.0], [0.0, 0.0]) == 0.5  # exact: 2 of the 4 sign patterns
    strong = paired_permutation([1.0] * 12, [0.0] * 12)
    assert strong < 0.001 and paired_permutation([0.5, 0.4, 0.6, 0.5], [0.5, 0.5, 0.5, 0.5]) > 0.5
    assert strong == paired_permutation([1.0] * 12, [0.0] * 12)  # seeded: reproducible


def test_paired_permutation_equals_scipy_one_resample_at_a_time():
    """The statistic runs on all resamples at once (``vectorized``): the p-values are exactly
    those of scipy's reference loop, one resample at a time, in the exact regime (2**n sign
    patterns <= 999 resamples: n <= 9) and the randomised one."""
    from scipy import stats

    from latent_hops.stats import paired_permutation

    rng = np.random.default_rng(3)
    for n in (5, 9, 10, 40):
        x, y = rng.integers(0, 8, n) / 7, rng.integers(0, 8, n) / 7
        reference = stats.permutation_test((x, y), lambda u, v: np.mean(u - v), permutation_type="samples",
                                           n_resamples=999, random_state=np.random.default_rng(0))
        assert paired_permutation(x, y, n_resamples=999) == reference.pvalue, n


def test_paired_permutation_of_success_flags_and_its_resamples():
    """Success flags (booleans) are compared as numbers, and ``n_resamples`` sets the
    resolution of a randomized p-value: (hits + 1) / (n_resamples + 1)."""
    from latent_hops.stats import paired_permutation

    wins = [True] * 9 + [False] * 3
    assert paired_permutation(wins, [False] * 12) == paired_permutation([1.0] * 9 + [0.0] * 3, [0.0] * 12)
    assert paired_permutation([False] * 12, wins) == paired_permutation([0.0] * 12, [1.0] * 9 + [0.0] * 3)
    rng = np.random.default_rng(1)
    a = rng.normal(size=40)
    b = a + rng.normal(0.2, 1.0, size=40)  # 2**40 sign patterns: randomized, not exact
    coarse = paired_permutation(a, b, n_resamples=99)
    assert coarse * 100 == pytest.approx(round(coarse * 100)) and 0 < coarse < 1
    assert coarse != paired_permutation(a, b)


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


# ---------------------------------------------------------------------------- edges the mutation run found


def test_shard_bounds_and_messages():
    assert rundir.parse_shard("0/1") == (0, 1) and rundir.parse_shard("0/3") == (0, 3)  # one shard; the first
    with pytest.raises(InputError, match=r"must look like i/n \(e\.g\. 0/4\), got 'x'"):
        rundir.parse_shard("x")
    with pytest.raises(InputError, match="--shard 3/3: need 0 <= i < n"):
        rundir.parse_shard("3/3")


def test_provenance_differences_of_mixed_and_several_keys():
    assert rundir.differences({"config": {"w": 1}}, {"config": 3}) == ["config: {'w': 1} != 3"]
    old = {"a": 1, "config": {"w": 1, "k": 2}, "z": 0}
    new = {"a": 2, "config": {"w": 2, "k": 3}, "z": 0}
    assert rundir.differences(old, new) == ["a: 1 != 2", "config.k: 2 != 3", "config.w: 1 != 2"]


def test_provenance_is_written_canonically_whatever_its_key_order(tmp_path):
    """The same provenance in another key order (or holding a path) writes the same bytes, so
    two runs made the same way give identical files."""
    frame = pd.DataFrame({"id": ["a"], "x": [1]})
    one = {"model": "toy", "data": Path("/d/x.csv"), "tables": SCHEMA_VERSION}
    two = {"tables": SCHEMA_VERSION, "data": Path("/d/x.csv"), "model": "toy"}
    for made_by, name in ((one, "1"), (two, "2")):
        rundir.write_table(frame, tmp_path / f"{name}.parquet", made_by)
        rundir.check_config(tmp_path / f"parts{name}" / "deep", made_by)  # parents made as needed
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()
    config_one = (tmp_path / "parts1" / "deep" / "config.json").read_text()
    assert config_one == (tmp_path / "parts2" / "deep" / "config.json").read_text()
    assert json.loads(config_one)["data"] == "/d/x.csv" and rundir.made_by_of(tmp_path / "1.parquet")["data"] == "/d/x.csv"
    assert rundir.differences(one, two) == []


def test_tables_keep_their_dtypes_and_drop_their_index(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b"], "rank": pd.array([1, None], dtype="Int64")}, index=[7, 9])
    path = rundir.write_table(frame, tmp_path / "new" / "deeper" / "t.parquet", MADE_BY)
    table = rundir.read_table(path)
    assert list(table.columns) == ["id", "rank"] and list(table.index) == [0, 1]
    assert str(table["rank"].dtype) == "Int64" and pd.isna(table["rank"][1])
    assert rundir.made_by_of(rundir.write_table(frame, tmp_path / "plain.parquet")) is None  # no provenance
    assert rundir.write_text(tmp_path / "x" / "y" / "z.txt", "hi").read_text() == "hi"
    part = rundir.write_part(tmp_path / "p" / "q", frame.reset_index(drop=True), "a|b")
    assert part.parent == tmp_path / "p" / "q" and part.name.startswith("part-")


def test_refusals_name_where_and_why(tmp_path, caplog):
    path = tmp_path / "t.parquet"
    rundir.write_table(pd.DataFrame({"id": ["a", "b"]}), path, MADE_BY)
    assert list(rundir.reusable_table(path, MADE_BY, {"a", "b"}).id) == ["a", "b"]  # exactly its ids
    with caplog.at_level(logging.INFO, logger="latent_hops"):
        rundir.reusable_table(path, {**MADE_BY, "model": "other", "seed": 1})
    assert f"not reusing {path}: made differently (model: 'toy' != 'other'; seed: None != 1)" in caplog.text
    with pytest.raises(InputError) as missing:
        rundir.read_table(tmp_path / "nope.parquet")
    assert missing.value.code == "run-dir"
    old = tmp_path / "old.parquet"
    rundir.write_table(pd.DataFrame({"id": ["a"]}), old, {"model": "toy"})
    for refuse in (rundir.read_table, lambda p: rundir.reusable_table(p, MADE_BY)):
        with pytest.raises(RunDirError, match=f"^{old} was written by an older"):
            refuse(old)
    folder = tmp_path / "parts"
    rundir.check_config(folder, MADE_BY)
    with pytest.raises(InputError, match=r"\(model: 'toy' != 'x'; seed: None != 2\)"):
        rundir.check_config(folder, {**MADE_BY, "model": "x", "seed": 2})
    (folder / "config.json").write_text(json.dumps({"model": "toy"}))
    with pytest.raises(RunDirError, match=f"^{folder} was written by an older"):
        rundir.check_config(folder, MADE_BY)


def test_parts_one_case_at_a_time_merge_to_a_plain_table(tmp_path):
    cases = [_Case("q0"), _Case("q1")]
    compute = lambda part: pd.DataFrame({"id": [c.id for c in part], "v": [1] * len(part)})  # noqa: E731
    assert rundir.run_in_parts(tmp_path / "s", cases, 1, compute, made_by=MADE_BY) == 0
    assert len(list((tmp_path / "s").glob("part-*.parquet"))) == 2
    for merged in (rundir.merge_parts(tmp_path / "s"), rundir.merge_parts(tmp_path / "s", order=["q1", "q0"])):
        assert list(merged.columns) == ["id", "v"] and list(merged.index) == [0, 1]


def test_stale_temporary_files_of_other_hosts_are_left_and_live_writers_untouched(tmp_path):
    import subprocess

    writer = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".tmp-part-y-{rundir.HOST}-{writer.pid}"
        elsewhere = tmp_path / ".tmp-part-z-elsewhere-999999999"  # a dead pid, but another host's
        for f in (live, elsewhere):
            f.write_text("half")
        rundir.remove_stale_temp(tmp_path)
        assert live.exists() and elsewhere.exists()
        assert writer.poll() is None  # asking whether it lives sends it no signal
    finally:
        writer.kill()
        writer.wait()


def test_the_manifest_records_versions_and_utc_times(tmp_path):
    from latent_hops._version import __version__

    rundir.record_run(tmp_path, "evaluate", {"dataset": Path("/d/x.csv")}, None, 0.0)
    text = (tmp_path / "manifest.json").read_text()
    entry = json.loads(text)["runs"][0]
    assert entry["started"] == "1970-01-01T00:00:00+00:00" and entry["finished"].endswith("+00:00")
    assert entry["package_version"] == __version__ and entry["config"] == {"dataset": "/d/x.csv"}
    assert set(entry["versions"]) == {"torch", "transformer-lens", "transformers", "tokenizers"}
    assert all(entry["versions"].values())  # all four installed here
    assert len(text.splitlines()) > 5  # indented: a person reads it


def test_an_existing_run_directory_is_accepted(tmp_path):
    rundir.check_run_dir(tmp_path)
    (tmp_path / "run").mkdir()
    rundir.check_run_dir(tmp_path / "run")
    assert not list(tmp_path.rglob(".write-check-*"))  # the probe file is gone


def _labelled(rows):
    return pd.DataFrame(rows, columns=["id", "position", "source_layer", "target_layer", "kind", "alias_match",
                                       "subset", "split"]).astype({"alias_match": "boolean"})


def test_rates_of_a_table_already_pooled_are_not_pooled_twice():
    rows = [("a", "t2", 1, 0, "back", True, "incorrect", "all"), ("b", "t2", 1, 0, "back", False, "incorrect", "all")]
    rates = cell_rates(_labelled(rows))
    assert rates[["split", "cases", "successes"]].values.tolist() == [["all", 2, 1]]


def test_oracle_rates_carry_wilson_intervals_of_their_counts():
    from latent_hops.analyses.backpatch import oracle_rates
    from latent_hops.stats import rate_interval

    rows = [(f"q{i}", "t2", s, 0, "back", i % 3 == 0 and s == 1, "incorrect", "x") for i in range(12) for s in (1, 2)]
    rate = oracle_rates(_labelled(rows)).query("split == 'x'").iloc[0]
    assert (rate.cases, rate.cells, rate.successes, rate.rate) == (12, 2, 4, 4 / 12)
    assert (rate.ci_low, rate.ci_high) == rate_interval(4, 12) and 0.1 < rate.ci_low < 0.2 < 0.6 < rate.ci_high < 0.7
    none = oracle_rates(_labelled([(f"q{i}", "t2", 1, 0, "back", False, "incorrect", "x") for i in range(5)]))
    assert none.ci_low.iloc[0] == 0 and none.ci_high.iloc[0] > 0.4  # no success: (0, 0.43), not (0, 0)


def test_oracle_tests_pair_back_patching_with_each_control_case_by_case():
    from latent_hops.analyses.backpatch import oracle_tests
    from latent_hops.stats import mcnemar, paired_permutation

    rows = []
    for i in range(10):  # back: q0..q7 rescued by cell (2, 0); forward: q0 only; random: q8 only
        rows += [(f"q{i}", "t2", 2, 0, "back", i < 8, "incorrect", "x"), (f"q{i}", "t2", 3, 0, "back", False, "incorrect", "x"),
                 (f"q{i}", "t2", 0, 2, "forward", i == 0, "incorrect", "x"),
                 (f"q{i}", "t2", 2, 0, "random", i == 8, "incorrect", "x")]
    rows += [("q10", "t2", 2, 0, "back", True, "incorrect", "x")]  # no control cells: not paired
    tests = oracle_tests(_labelled(rows)).query("split == 'x'").set_index("control")
    assert list(tests.index) == ["forward", "random"] and (tests.cases == 10).all()
    back = [i < 8 for i in range(10)]
    forward = mcnemar(back, [i == 0 for i in range(10)])
    assert tests.loc["forward", ["back_only", "control_only"]].tolist() == [7, 0]
    assert tests.loc["forward", "oracle_p"] == forward.p_value == pytest.approx(2 * 0.5 ** 7)
    assert tests.loc["random", ["back_only", "control_only"]].tolist() == [8, 1]
    assert tests.loc["random", "back_cell_rate"] == 0.4 and tests.loc["random", "control_cell_rate"] == 0.1
    shares = [0.5 if b else 0.0 for b in back]
    assert tests.loc["random", "cell_rate_p"] == paired_permutation(shares, [float(i == 8) for i in range(10)])
    assert set(oracle_tests(_labelled(rows)).split) == {"x", "all"}
    partial = [(f"p{i}", "t1", 2, 0, kind, i == 0 and kind == "back", "incorrect", "x")
               for i in range(3) for kind in ("back", "forward")]
    partial += [("p0", "t1", 2, 0, "random", False, "incorrect", "x")]  # one case has a random cell too
    only = oracle_tests(_labelled(partial)).query("split == 'x'").set_index("control")
    assert only.loc["forward", "cases"] == 3 and only.loc["random", "cases"] == 1  # pairs per control
    no_random = oracle_tests(_labelled(partial[:-1])).query("split == 'x'")
    assert no_random.control.tolist() == ["forward"]  # a control that was not run: no row


def test_non_oracle_reports_every_column_and_empty_halves():
    from latent_hops.analyses.backpatch import non_oracle
    from latent_hops.stats import rate_interval

    rows = []
    for i in range(8):  # incorrect q0..q7: cell (2, 0) rescues the even ones; correct c0..c3: (2, 0) breaks c0
        rows += [(f"q{i}", "t2", 2, 0, "back", i % 2 == 0, "incorrect", "x"),
                 (f"q{i}", "t2", 1, 0, "back", False, "incorrect", "x")]
    for i in range(4):
        rows += [(f"c{i}", "t2", 2, 0, "back", i != 0, "correct", "x"), (f"c{i}", "t2", 1, 0, "back", True, "correct", "x")]
    labelled = _labelled(rows)
    for seed in (0, 3):
        row = non_oracle(labelled, seed=seed).query("split == 'x'").iloc[0]
        inc = np.array(sorted(f"q{i}" for i in range(8)))
        np.random.default_rng(seed).shuffle(inc)
        held = sorted(inc[4:])
        gain = [int(h[1:]) % 2 == 0 for h in held]
        assert (row.source_layer, row.target_layer, row.train_cases, row.heldout_incorrect) == (2, 0, 4, 4)
        assert row.gain == np.mean(gain) and (row.gain_ci_low, row.gain_ci_high) == rate_interval(sum(gain), 4)
        assert row.damage == 0.25 and (row.damage_ci_low, row.damage_ci_high) == rate_interval(1, 4)
    assert non_oracle(labelled).equals(non_oracle(labelled, seed=0))
    everything = non_oracle(labelled[labelled.subset == "incorrect"], train_fraction=1.0).query("split == 'x'").iloc[0]
    assert everything.heldout_incorrect == 0 and np.isnan(everything.gain) and np.isnan(everything.gain_ci_low)
    assert everything.correct_cases == 0 and np.isnan(everything.damage) and np.isnan(everything.damage_ci_high)


def test_success_samples_order_and_defaults():
    from latent_hops.analyses.backpatch import success_samples

    rows = []
    for position, kind, cells in (("t2", "back", {(3, 1): 3, (2, 1): 1}), ("t1", "back", {(3, 0): 1, (2, 0): 2}),
                                  ("t1", "random", {(1, 0): 1})):
        for (s, t), n in cells.items():
            rows += [dict(id=f"{position}{kind}{s}{t}{i}", position=position, kind=kind, source_layer=s, target_layer=t,
                          generation=f"g{i}", alias_match=True, subset="incorrect") for i in range(n)]
    sample = success_samples(pd.DataFrame(rows))
    assert list(sample.columns) == ["position", "kind", "source_layer", "target_layer", "rescued", "id", "generation"]
    assert list(sample.index) == list(range(len(sample)))
    got = sample[["position", "kind", "source_layer", "rescued"]].values.tolist()
    assert got == [["t1", "back", 2, 2], ["t1", "back", 2, 2], ["t1", "back", 3, 1], ["t1", "random", 1, 1],
                   ["t2", "back", 3, 3], ["t2", "back", 3, 3], ["t2", "back", 2, 1]]  # 2 per cell by default
    many = [dict(id=f"m{s}{i}", position="t2", kind="back", source_layer=s, target_layer=0, generation="g",
                 alias_match=True, subset="incorrect") for s in range(7) for i in range(s + 1)]
    assert sorted(set(success_samples(pd.DataFrame(many)).source_layer)) == [2, 3, 4, 5, 6]  # the 5 best cells
    ties = [dict(id=f"t{s}-{i}", position="t2", kind="back", source_layer=s, target_layer=0, generation="g",
                 alias_match=True, subset="incorrect") for s in range(40) for i in range(1 + s % 2)]
    assert sorted(set(success_samples(pd.DataFrame(ties)).source_layer)) == [1, 3, 5, 7, 9]  # ties: layer order


def test_mcnemar_of_both_kinds_of_discordant_pairs():
    from latent_hops.stats import mcnemar

    test = mcnemar([1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0])  # 0/1 values are outcomes too
    assert (test.only_a, test.only_b) == (3, 1) and test.p_value == pytest.approx(0.625)  # 2 * P(X >= 3), n = 4
    with pytest.raises(ValueError, match="two outcomes per case"):
        mcnemar([True], [True, False])


def test_rate_interval_level_and_paired_permutation_exactly():
    from latent_hops.stats import paired_permutation, rate_interval

    wide, narrow = rate_interval(3, 10, level=0.99), rate_interval(3, 10, level=0.8)
    assert wide[0] < rate_interval(3, 10)[0] < narrow[0] and narrow[1] < rate_interval(3, 10)[1] < wide[1]
    # four pairs, every difference +1: of the 16 sign flips, 2 have |mean| >= 1
    assert paired_permutation([1, 2, 3, 4], [0, 1, 2, 3]) == pytest.approx(2 / 16)
    a, b = np.linspace(0, 1, 20), np.linspace(0, 1, 20)[::-1] * 0.9  # 2^20 flips: resampled
    p = paired_permutation(a, b)
    assert p == paired_permutation(a, b) == paired_permutation(a, b, seed=0) != paired_permutation(a, b, seed=1)


def test_best_rank_over_a_batch_of_positions():
    import torch

    from latent_hops.ranks import best_rank

    logprobs = torch.tensor([[[-1.0, -3.0, -0.5], [-2.0, -1.0, -3.0]], [[-0.25, -0.5, -0.75], [-3.0, -2.0, -1.0]]])
    rank, best = best_rank(logprobs, [1])
    assert rank.tolist() == [[2, 0], [1, 1]] and best.tolist() == [[-3.0, -1.0], [-0.5, -2.0]]
    rank, best = best_rank(logprobs, [])
    assert rank.shape == (2, 2) and rank.dtype == torch.long and (rank == -1).all() and best.isnan().all()


def test_onset_and_resolution_thresholds():
    from latent_hops.analyses.logit_lens import LogitLensConfig, onset_layer, resolution_layers
    from latent_hops.analysis import get

    rows = [("a", "t1", 0, 1, 50), ("a", "t1", 1, 0, 50), ("a", "t2", 0, 2, 11), ("a", "t2", 1, 1, 2),
            ("a", "t2", 2, 0, 0), ("b", "t1", 0, 0, 50), ("b", "t2", 0, 9, 3), ("b", "t2", 1, 9, None)]
    lens = pd.DataFrame(rows, columns=["id", "position", "hidden_layer", "e2_rank", "e3_rank"]).astype(
        {"e2_rank": "Int64", "e3_rank": "Int64"})
    loose = resolution_layers(lens, second_hop_k=2).set_index("id")
    assert loose.loc["a", "second_hop_layer"] == 1 and loose.loc["a", "e2_at_t2_layer"] == 2  # k is e3's only
    assert loose.loc["a", "first_hop_layer"] == 1 and pd.isna(loose.loc["b", "second_hop_layer"])
    assert onset_layer(lens)["a"] == 1 and onset_layer(lens, k=11)["a"] == 0  # the default k is 10
    assert pd.isna(onset_layer(lens, k=50)["b"])  # an unknown token at the last layer is not "inside"
    stage = get("logit_lens")
    assert stage.measured_layers(lens, LogitLensConfig(onset_k=11)).loc["a", "second_hop_onset_layer"] == 0


def test_reducers_keep_every_case_in_order_of_appearance():
    """A case whose measure never holds (or has no rows of the preset) is a missing value, in
    the order the table lists its cases -- never dropped, never re-sorted."""
    from latent_hops.analyses.knockout import knockout_layer
    from latent_hops.analyses.probe import probe_accuracy, probe_layers

    ko = pd.DataFrame({"id": ["z", "z", "m", "a", "a"], "preset": ["last_to_t1"] * 2 + ["all_to_t1"] + ["last_to_t1"] * 2,
                       "window_center": [0, 1, 0, 0, 1], "changed": [False, False, True, False, True]})
    layers = knockout_layer(ko)
    assert list(layers.index) == ["z", "m", "a"] and pd.isna(layers["z"]) and pd.isna(layers["m"]) and layers["a"] == 1
    rows = [dict(id=i, entity="e2", position="t2", hidden_layer=layer, token_match=(i == "a" and layer == 1),
                 control_token_match=False, candidates=3 + layer) for i in ("z", "a") for layer in (0, 1)]
    probed = pd.DataFrame(rows)
    assert probe_accuracy(probed).candidates.tolist() == [3, 4]
    assert probe_layers(probed, margin=0.5).id.tolist() == ["z", "a"]  # accuracy 0.5 = control + 0.5 counts
    assert probe_layers(probed, margin=0.5).e2_at_t2_layer.tolist()[1] == 1
    assert probe_layers(probed, margin=0.51).e2_at_t2_layer.isna().all()
    projection = pd.DataFrame([("z", b, s, 5, 5) for b in range(2) for s in ("attn", "mlp")]
                              + [("a", b, s, 0, 0) for b in range(2) for s in ("attn", "mlp")],
                              columns=["id", "block", "sublayer", "e2_rank", "prediction_rank"])
    assert projection_layers(projection).id.tolist() == ["z", "a"]
    table = pd.DataFrame({"id": ["z", "a"], "position": "t1", "source_layer": 0, "decoded": ["none", "e2"]})
    assert decoded_layers(table, lambda r, e: r.decoded == e, "source_layer").id.tolist() == ["z", "a"]


def test_an_analysis_registers_under_its_name_once():
    from dataclasses import replace

    from latent_hops.analysis import REGISTRY, register

    model = get("projection")
    mine = replace(model, name="projection_twin", aliases=(), schema=replace(model.schema, file="projection_twin.parquet"))
    try:
        assert register(mine) is mine and get("projection_twin") is mine
        assert register(mine) is mine  # the same analysis again (a module imported twice) is fine
        with pytest.raises(ValueError, match="two analyses are named 'projection_twin'"):
            register(replace(mine, run=lambda context, config: pd.DataFrame()))
    finally:
        REGISTRY.pop("projection_twin", None)


def test_a_live_writer_is_asked_about_never_signalled():
    """Whether a part's writer still runs is asked with signal 0, which delivers nothing."""
    import subprocess

    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert rundir._alive(proc.pid) and not rundir._alive(os.getpid())
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)  # still running after being asked
    finally:
        proc.kill()
        proc.wait()
    assert not rundir._alive(proc.pid)


def test_rebalance_is_a_seeded_random_sample_per_subset_and_type():
    from latent_hops.evaluation import rebalance

    ids = [f"q{i:03d}" for i in range(140)]
    evaluation = pd.DataFrame({"id": ids, "subset": ["correct"] * 120 + ["incorrect"] * 20})
    table = pd.DataFrame({"id": ids[::-1], "e2_type": (["city"] * 20 + ["person"] * 120)})  # other order
    kept = rebalance(evaluation, table)  # default: 100 per subset and type
    types = kept.merge(table, on="id").groupby(["subset", "e2_type"]).size().to_dict()
    assert types == {("correct", "person"): 100, ("incorrect", "city"): 20}
    assert list(kept.columns) == ["id", "subset"] and kept.index.is_monotonic_increasing
    few = rebalance(evaluation, table, max_per_type=10)
    assert few.equals(rebalance(evaluation, table, max_per_type=10, seed=0))  # the default seed is 0
    assert set(few.id) != set(rebalance(evaluation, table, max_per_type=10, seed=1).id)
    assert set(few.id[few.subset == "incorrect"]) != set(ids[120:130])  # random, not the first ten


def test_heatmaps_shown_together_share_one_colour_scale():
    """Two back-patching heatmaps of one page (0-3% beside 0-25%) get the same scale, 0 to
    the highest rate of any back cell; alone, a heatmap spans its own range."""
    from latent_hops.analyses.backpatch import backpatch_heatmap
    from latent_hops.analyses.backpatch.report import shared_zmax

    rows = [("all", "incorrect", "t1", "back", 1, 0, 100, 3, 0.03), ("all", "incorrect", "t2", "back", 1, 0, 100, 25, 0.25),
            ("all", "incorrect", "t2", "random", 1, 0, 100, 60, 0.60)]
    cells = pd.DataFrame(rows, columns=["split", "subset", "position", "kind", "source_layer", "target_layer", "cases",
                                        "successes", "rate"])
    assert shared_zmax(cells) == 25.0 and shared_zmax(cells.iloc[:0]) == 0.0  # random cells are not drawn
    low = backpatch_heatmap(cells, "incorrect", "t1", zmax=shared_zmax(cells)).data[0]
    high = backpatch_heatmap(cells, "incorrect", "t2", zmax=shared_zmax(cells)).data[0]
    assert low.zmax == high.zmax == 25.0 and "0–25" in low.colorbar.title.text
    assert backpatch_heatmap(cells, "incorrect", "t1").data[0].zmax == 3.0
