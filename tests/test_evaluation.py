"""evaluate(): generations, alias flags, subsets with reasons, rebalancing, and the CLI.

The rule that sorts queries into correct / incorrect / excluded is checked branch by branch
on a scripted model (its generations written here), against hand-written expectations; the
toy model checks that real generations land in the table row by row."""

import pandas as pd
import pytest
from conftest import bpe_tokenizer
from scripted import ScriptedModel

from latent_hops.cli import main
from latent_hops.evaluation import EvaluationConfig, evaluate, rebalance, summarize
from latent_hops.generation import generate
from latent_hops.models import toy_checkpoint_dir
from latent_hops.queries import (
    PROMPT_KINDS,
    TwoHopQuery,
    iter_queries,
    load_dataset,
    queries_to_table,
)


def _query(qid: str, e1: str = "Imagine", **kw) -> TwoHopQuery:
    return TwoHopQuery(id=qid, e1_label=e1, e2_label="John Lennon", e3_label="Yoko Ono",
                       r1_template="the performer of {}", r2_template="the spouse of {}",
                       e2_aliases=("Lennon",), e3_aliases=("Ono Yoko",), **kw)


def _script(first=" John Lennon", second=" Yoko Ono", composition=" Yoko Ono", entity=" nobody",
            relation=" nobody", e1="Imagine") -> dict[str, str]:
    return {f"the performer of {e1} is": first, "the spouse of John Lennon is": second,
            f"the spouse of the performer of {e1} is": composition,
            f"the spouse of {e1} is": entity, "the spouse of the performer of is": relation}


CASES = {  # id -> (what the model says per prompt, expected subset, expected reason)
    "correct": (_script(), "correct", None),
    "incorrect": (_script(composition=" Paul"), "incorrect", None),
    "alias": (_script(first=" lennon!", composition=" ONO YOKO"), "correct", None),  # aliases, any case
    "first": (_script(first=" Paul"), "excluded", "first hop unknown"),
    "second": (_script(second=" Paul"), "excluded", "second hop unknown"),
    "both": (_script(first=" Paul", second=" Paul"), "excluded", "first hop unknown; second hop unknown"),
    "entity": (_script(entity=" Yoko Ono"), "excluded", "entity shortcut gives e3"),
    "relation": (_script(relation=" Yoko Ono"), "excluded", "relation shortcut gives e3"),
    "shortcuts": (_script(entity=" Ono Yoko", relation=" yoko ono"), "excluded",
                  "entity shortcut gives e3; relation shortcut gives e3"),
    "everything": (_script(first=" Paul", entity=" Yoko Ono"), "excluded",
                   "first hop unknown; entity shortcut gives e3"),
}


@pytest.mark.parametrize("qid", sorted(CASES))
def test_each_branch_of_the_subset_rule(qid):
    script, subset, reason = CASES[qid]
    e1 = f"Imagine{len(qid)}"  # queries of their own: prompts differ
    model = ScriptedModel(bpe_tokenizer("gpt2"), {p.replace("Imagine", e1): a for p, a in script.items()})
    ev = evaluate(model, queries_to_table([_query(qid, e1)]))
    row = ev.iloc[0]
    assert (row.subset, row.skip_reason if pd.notna(row.skip_reason) else None) == (subset, reason)
    expected = {"first_hop": script["the performer of Imagine is"],
                "composition": script["the spouse of the performer of Imagine is"]}
    for kind, text in expected.items():
        assert row[f"{kind}_generation"] == text
    assert ev.t1.iloc[0] is not pd.NA and ev.t2.iloc[0] > ev.t1.iloc[0]


def test_alias_flags_name_the_right_entity():
    """The first hop is scored against e2, the rest against e3: a model that always says
    "John Lennon" passes the first hop only; one that always says "Yoko Ono" all but it."""
    tok = bpe_tokenizer("gpt2")
    table = queries_to_table([_query("q")])
    for default, expected in ((" John Lennon", {"first_hop"}), (" Yoko Ono", set(PROMPT_KINDS) - {"first_hop"})):
        row = evaluate(ScriptedModel(tok, {}, default), table).iloc[0]
        assert {k for k in PROMPT_KINDS if row[f"{k}_alias_match"]} == expected


def test_a_prompt_too_long_is_excluded_and_never_generated():
    tok = bpe_tokenizer("gpt2")
    table = queries_to_table([_query("short"), _query("long", e1="Imagine " * 12)])
    model = ScriptedModel(tok, _script(), context=28)  # 12 + 10 tokens fit, 23 + 10 do not
    ev = evaluate(model, table, EvaluationConfig(max_new_tokens=10)).set_index("id")
    assert ev.loc["short", "subset"] == "correct"
    long = ev.loc["long"]
    assert long.subset == "excluded" and "exceeds the model's context of 28 tokens" in long.skip_reason
    assert pd.isna(long.composition_generation) and pd.isna(long.composition_alias_match)
    assert not any(p.startswith("the spouse of the performer of Imagine Imagine") for p in model.generated)
    assert summarize(ev.reset_index()).loc["all", "composition"] == 1.0  # a null is not a wrong answer


def test_t1_not_found_is_excluded_with_the_reason():
    tok = bpe_tokenizer("gpt2")
    bad = _query("bad", source_prompt="the spouse of Nobody is")
    ev = evaluate(ScriptedModel(tok, _script()), queries_to_table([bad]))
    assert ev.loc[0, "subset"] == "excluded" and "does not occur" in ev.loc[0, "skip_reason"]
    assert pd.isna(ev.loc[0, "t1"])


def test_identical_prompts_are_generated_once():
    tok = bpe_tokenizer("gpt2")
    model = ScriptedModel(tok, _script())
    evaluate(model, queries_to_table([_query("a"), _query("b")]))
    assert len(model.generated) == len(set(model.generated)) == 5


@pytest.fixture(scope="module")
def toy_eval(toy):
    table = load_dataset("toy").groupby("split").head(40).reset_index(drop=True)
    return table, evaluate(toy, table, EvaluationConfig(batch_size=32))


def test_generations_are_the_models_own(toy, toy_eval):
    """Each stored generation is what the toy generates for that prompt on its own."""
    table, ev = toy_eval
    assert list(ev["id"]) == list(table["id"])
    for i in (5, 50, 100):
        q, row = iter_queries(table)[i], ev.iloc[i]
        for kind in PROMPT_KINDS:
            assert row[f"{kind}_generation"] == generate(toy, [q.prompts()[kind]])[0]


def test_toy_subsets_follow_the_rule(toy_eval):
    _, ev = toy_eval
    known = ev.first_hop_alias_match & ev.second_hop_alias_match & ~ev.entity_shortcut_alias_match \
        & ~ev.relation_shortcut_alias_match
    assert (ev.subset[known] == ev.composition_alias_match[known].map({True: "correct", False: "incorrect"})).all()
    assert (ev.subset[~known] == "excluded").all()
    assert ev.skip_reason[~known].notna().all() and ev.skip_reason[known].isna().all()
    assert set(ev.subset) == {"correct", "incorrect", "excluded"}  # every subset occurs in the sample


def test_empty_dataset_is_refused(toy):
    with pytest.raises(ValueError, match="empty"):
        evaluate(toy, load_dataset("toy").iloc[:0])


def test_rebalance_caps_per_bridge_type(toy_eval):
    table, ev = toy_eval
    capped = rebalance(ev, table, max_per_type=2)
    merged = capped.merge(table[["id", "e2_type"]], on="id")
    assert merged.groupby(["subset", "e2_type"]).size().max() == 2
    assert set(capped["id"]) < set(ev["id"])


def test_summary_table(toy_eval):
    _, ev = toy_eval
    summary = summarize(ev)
    test_id = ev[ev.split == "test_id"]
    assert summary.loc["test_id", "queries"] == 40
    assert summary.loc["test_id", "composition"] == test_id.composition_alias_match.sum() / 40
    assert summary.loc["test_id", "incorrect"] == (test_id.subset == "incorrect").sum()


def test_cli_evaluate_writes_parquet(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["evaluate", "--model", str(toy_checkpoint_dir()), "--dataset", "toy", "--out", str(out),
                 "--limit", "20", "--device", "cpu"]) == 0
    ev = pd.read_parquet(out / "evaluation.parquet")
    assert len(ev) == 20 and "composition_alias_match" in ev.columns
    assert "composition" in capsys.readouterr().out


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--dataset", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_datasets_own_two_hop_prompt_is_the_composition_prompt():
    """A query with a ``source_prompt`` (the paper's datasets) is asked that, not the template."""
    tok = bpe_tokenizer("gpt2")
    query = _query("own", source_prompt="Who is the spouse of the performer of Imagine? It is")
    model = ScriptedModel(tok, {**_script(), "Who is the spouse of the performer of Imagine? It is": " Paul"})
    row = evaluate(model, queries_to_table([query])).iloc[0]
    assert row.composition_generation == " Paul" and row.subset == "incorrect"
    assert "the spouse of the performer of Imagine is" not in model.generated


def test_an_over_long_reason_names_the_first_prompt_kind():
    tok = bpe_tokenizer("gpt2")
    model = ScriptedModel(tok, _script(), context=20)  # even the first hop (16 + 10 tokens) is too long
    ev = evaluate(model, queries_to_table([_query("long", e1="Imagine " * 12)]), EvaluationConfig(max_new_tokens=10))
    assert ev.skip_reason.iloc[0].startswith("first hop: prompt of ")


def test_summary_counts_every_subset_per_split():
    ev = pd.DataFrame({"id": list("abcd"), "split": ["x", "x", "y", "y"], "subset": ["correct", "incorrect", "correct", "correct"],
                       **{f"{k}_alias_match": pd.array([True, False, True, True], dtype="boolean") for k in PROMPT_KINDS}})
    summary = summarize(ev)
    assert list(summary.columns) == ["queries", *PROMPT_KINDS, "correct", "incorrect", "excluded"]
    assert summary.loc["y", ["queries", "correct", "incorrect", "excluded"]].tolist() == [2, 2, 0, 0]
    assert summary.loc["x", "composition"] == 0.5


def test_a_prompt_suffix_reaches_generation_and_positions():
    """``suffix`` ends every prompt: the generations asked are the suffixed prompts, and t2
    (the prompt's last token) moves with it, as t1 does not."""
    tok = bpe_tokenizer("gpt2")
    table = queries_to_table([_query("q")])
    plain = evaluate(ScriptedModel(tok, _script()), table).iloc[0]
    suffix = " is, in a word,"
    script = {p.removesuffix(" is") + suffix: a for p, a in _script().items()}
    model = ScriptedModel(tok, script)
    row = evaluate(model, table, EvaluationConfig(suffix=suffix)).iloc[0]
    assert row.subset == "correct" and all(p.endswith(suffix) for p in model.generated)
    extra = len(tok(suffix)["input_ids"]) - len(tok(" is")["input_ids"])
    assert (row.t1, row.t2) == (plain.t1, plain.t2 + extra) and extra > 0
