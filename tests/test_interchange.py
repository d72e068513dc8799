"""Bridge-swap interchange (latent_hops/analyses/interchange.py): the pairing rule on hand-built
queries, two invariants (a donor equal to the query changes nothing; a swap at the last layer
at t1 changes nothing, as that state feeds only t1's own prediction), the known answer on the
GPT-2 toy (which holds the bridge at t1), and the analysis end to end: CLI command, table,
stage measure, report section."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import load_script

from latent_hops.analyses.interchange import (
    InterchangeConfig,
    choose_donors,
    interchange,
    outcome_rates,
    paired_tests,
    swap_layers,
)
from latent_hops.cases import Case, prepare_cases
from latent_hops.cli import main
from latent_hops.evaluation import evaluate
from latent_hops.generation import generate
from latent_hops.queries import TwoHopQuery, load_dataset, queries_to_table


def _q(qid, e1, e2, e3, r1="the mother of {}", r2="the city of {}", e3_aliases=()):
    return TwoHopQuery(id=qid, e1_label=e1, e2_label=e2, e3_label=e3, r1_template=r1, r2_template=r2,
                       e3_aliases=e3_aliases)


def test_the_pairing_rule():
    queries = queries_to_table([
        _q("q", "Ann", "Bea", "Paris"),
        _q("other_bridge", "Cid", "Dot", "Rome"),
        _q("other_bridge_too", "Eve", "Fay", "Oslo"),
        _q("same_bridge", "Gus", "Bea", "Paris", r1="the aunt of {}"),  # the control may differ in r1
        _q("same_bridge_other_r2", "Gil", "Bea", "Lyon", r2="the job of {}"),
        _q("other_relation", "Hal", "Ivy", "Lima", r2="the job of {}"),
        _q("wrong", "Ian", "Jo", "Kiev"),
        _q("same_answer_name", "Kim", "Lou", "Paris Hilton"),  # 'Paris' is a substring: indistinguishable
        _q("lonely", "Max", "Ned", "Bonn", r1="the friend of {}"),
    ])
    subsets = {"wrong": "incorrect"}
    evaluation = pd.DataFrame({"id": queries.id, "subset": [subsets.get(i, "correct") for i in queries.id]})
    cases = [Case(i, "", {}, {}) for i in ("q", "wrong", "lonely")]
    chosen = choose_donors(cases, queries, evaluation, seed=0)
    assert chosen["q", "swap"] in {"other_bridge", "other_bridge_too"}
    assert chosen["q", "same_bridge"] == "same_bridge"
    assert chosen["wrong", "swap"].startswith("skip: not answered correctly")
    assert chosen["lonely", "swap"].startswith("skip: no correctly answered query with the same relations")
    assert chosen["lonely", "same_bridge"].startswith("skip: no correctly answered query with the same bridge")
    seeds = {choose_donors(cases[:1], queries, evaluation, seed=s)["q", "swap"] for s in range(20)}
    assert seeds == {"other_bridge", "other_bridge_too"}  # the seed, not dataset order, picks among equals


@pytest.fixture(scope="module")
def gpt2_cases(toy_gpt2):
    """Correctly answered test_id queries of the GPT-2 toy, their donors, the evaluation."""
    table = load_dataset("toy").query("split == 'test_id'")  # the donor pool: every test_id query
    evaluation = evaluate(toy_gpt2, table)
    correct = evaluation[evaluation.subset == "correct"].id
    cases, _ = prepare_cases(toy_gpt2, table[table.id.isin(set(correct.iloc[:24]))])
    chosen = choose_donors(cases, table, evaluation, seed=0)
    donor_ids = {v for v in chosen.values() if not v.startswith("skip: ")}
    prepared = {c.id: c for c in prepare_cases(toy_gpt2, table[table.id.isin(donor_ids)])[0]}
    donors = {k: prepared[v] if v in prepared else v.removeprefix("skip: ") for k, v in chosen.items()}
    return cases, donors


def test_a_donor_equal_to_the_query_changes_nothing(toy_gpt2, gpt2_cases):
    cases = gpt2_cases[0][:3]
    donors = {(c.id, "swap"): c for c in cases}
    table = interchange(toy_gpt2, cases, donors, InterchangeConfig(swap_kinds=("swap",)))
    clean = dict(zip([c.id for c in cases], generate(toy_gpt2, [c.prompt for c in cases])))
    assert len(table) == 3 * 2 * toy_gpt2.n_layers and (table.generation == table.id.map(clean)).all()
    assert (table.outcome == "both").all()  # its own answer is the donor's


def test_a_swap_at_the_last_layer_at_t1_changes_nothing(toy_gpt2, gpt2_cases):
    cases, donors = gpt2_cases
    last = toy_gpt2.n_layers - 1
    config = InterchangeConfig(positions=("t1",), swap_layers=(last,), swap_kinds=("swap", "random"))
    table = interchange(toy_gpt2, cases, donors, config)
    done = table[table.skip_reason.isna()]
    clean = dict(zip([c.id for c in cases], generate(toy_gpt2, [c.prompt for c in cases])))
    assert len(done) > 10 and (done.generation == done.id.map(clean)).all()
    assert set(done.outcome) == {"own"}


def test_the_gpt2_toy_reads_the_bridge_from_t1_early(toy_gpt2, gpt2_cases):
    """The GPT-2 toy resolves the bridge at t1 (README): swapping it there in the first layers
    moves most answers to the donor's, while a donor with the same bridge moves none."""
    cases, donors = gpt2_cases
    table = interchange(toy_gpt2, cases, donors, InterchangeConfig(positions=("t1",)))
    rates = outcome_rates(table).set_index(["kind", "hidden_layer"])
    assert rates.loc[("swap", 0), "donor"] > 0.5 and rates.loc[("swap", 0), "cases"] >= 10
    assert rates.xs("same_bridge").donor.max() == 0 and rates.loc[("same_bridge", 0), "own"] > 0.8
    assert rates.loc[("random", 0), "donor"] == 0  # no donor answer to reach
    late = rates.loc[("swap", toy_gpt2.n_layers - 1), "donor"]
    assert late == 0  # after the last layer nothing is read from t1 any more
    layers = swap_layers(table, InterchangeConfig()).swap_layer
    assert layers.notna().sum() > 10 and layers.max() < toy_gpt2.n_layers - 1
    tests = paired_tests(table).set_index("hidden_layer")
    assert tests.loc[0, "swap_only"] > tests.loc[0, "control_only"] and tests.loc[0, "p_value"] < 0.01


def test_the_analysis_end_to_end(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--model", "toy-gpt2", "--split", "test_id", "--limit", "200",
              "--max-cases", "4", "--device", "cpu", "--swap-layers", "0,3"]
    assert main(["interchange", *common]) == 0
    table = pd.read_parquet(out / "interchange.parquet")
    assert set(table.hidden_layer) == {0, 3} and set(table.kind) == {"swap", "same_bridge", "random"}
    incorrect = table[table.skip_reason.str.startswith("not answered", na=False)]
    assert len(incorrect) and incorrect[["generation", "outcome"]].isna().all().all()  # skipped: null
    skip = "knockout,projection,patchscope,probe"
    assert main(["stages", *common, "--skip", skip]) == 0
    stages = pd.read_parquet(out / "stages.parquet")
    assert stages.info_propagation_measures.str.contains("swap").any()
    assert main(["report", str(out)]) == 0
    assert "Bridge-swap interchange" in (out / "report.html").read_text()
    text = load_script("causal_numbers").interchange(out)  # what the docs quote for SmolLM2
    assert "swap → donor's answer" in text and "Without a swap" in text
