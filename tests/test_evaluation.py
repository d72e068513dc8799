"""evaluate(): generations, flags, subsets with reasons, rebalancing, and the CLI."""


import pandas as pd
import pytest

from latent_hops.cli import main
from latent_hops.evaluation import EvaluationConfig, evaluate, rebalance, summarize
from latent_hops.generation import generate, is_correct
from latent_hops.models import toy_checkpoint_dir
from latent_hops.queries import PROMPT_KINDS, iter_queries, load_dataset, queries_to_table

REQUIRED = ["id", "first_hop_correct", "second_hop_correct", "composition_correct", "entity_shortcut_correct",
            "relation_shortcut_correct", "subset"]


@pytest.fixture(scope="module")
def toy_eval(toy):
    table = load_dataset("toy").groupby("split").head(40).reset_index(drop=True)
    return table, evaluate(toy, table, EvaluationConfig(batch_size=32))


def test_rows_flags_and_generations_agree(toy, toy_eval):
    table, ev = toy_eval
    assert list(ev["id"]) == list(table["id"]) and set(REQUIRED) <= set(ev.columns)
    q = iter_queries(table)[5]
    row = ev.iloc[5]
    for kind in PROMPT_KINDS:
        text = generate(toy, [q.prompts()[kind]])[0]
        assert row[f"{kind}_generation"] == text
    assert row["composition_correct"] == is_correct(row["composition_generation"], q.names("e3"))
    assert row["first_hop_correct"] == is_correct(row["first_hop_generation"], q.names("e2"))


def test_subset_rule(toy_eval):
    _, ev = toy_eval
    known = ev.first_hop_correct & ev.second_hop_correct & ~ev.entity_shortcut_correct & ~ev.relation_shortcut_correct
    assert (ev.subset[known] == ev.composition_correct[known].map({True: "correct", False: "incorrect"})).all()
    assert (ev.subset[~known] == "excluded").all()
    assert (ev.exclusion_reason[~known] != "").all() and (ev.exclusion_reason[known] == "").all()


def test_unresolvable_query_is_excluded_with_reason(toy):
    q = iter_queries(load_dataset("toy").iloc[:1])[0]
    bad = queries_to_table([q.__class__(**{**q.__dict__, "id": "bad", "source_prompt": "the spouse of Nobody is"})])
    ev = evaluate(toy, bad)
    assert ev.loc[0, "subset"] == "excluded" and "does not occur" in ev.loc[0, "exclusion_reason"]


def test_empty_dataset_is_refused(toy):
    with pytest.raises(ValueError, match="empty"):
        evaluate(toy, load_dataset("toy").iloc[:0])


def test_rebalance_caps_per_bridge_type(toy_eval):
    table, ev = toy_eval
    capped = rebalance(ev, table, max_per_type=2)
    merged = capped.merge(table[["id", "e2_type"]], on="id")
    assert merged.groupby(["subset", "e2_type"]).size().max() <= 2
    assert set(capped["id"]) <= set(ev["id"])


def test_summary_table(toy_eval):
    _, ev = toy_eval
    summary = summarize(ev)
    assert summary.loc["test_id", "queries"] == 40
    assert summary.loc["test_id", "composition"] == pytest.approx(ev[ev.split == "test_id"].composition_correct.mean())


def test_cli_evaluate_writes_parquet(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["evaluate", "--model", str(toy_checkpoint_dir()), "--dataset", "toy", "--out", str(out),
                 "--limit", "20", "--device", "cpu"]) == 0
    ev = pd.read_parquet(out / "evaluation.parquet")
    assert len(ev) == 20 and set(REQUIRED) <= set(ev.columns)
    assert "composition" in capsys.readouterr().out


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--dataset", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
