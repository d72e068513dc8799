"""Back-patching: the fast engine equals the naive reference cell by cell; invariants;
summaries against hand-computed values."""

import pandas as pd
import pytest
import torch
from test_positions import QUERIES

from latent_hops.analyses.backpatch import (
    BackpatchConfig,
    Cell,
    all_cells,
    non_oracle,
    oracle_rates,
    prepare_cases,
    sweep,
    sweep_naive,
    with_labels,
)
from latent_hops.backend import greedy_generate
from latent_hops.generation import generate
from latent_hops.patching import patch_hook
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import load_dataset, queries_to_table


def _cases(model, table, **kw):
    cases, skipped = prepare_cases(model, table, BackpatchConfig(**kw))
    assert skipped.empty
    return cases


@pytest.fixture(scope="module")
def toy_table():
    data = load_dataset("toy")
    return data[data.split == "test_id"].iloc[:4]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "toy"])
def test_fast_engine_equals_naive_reference(request, name, toy_table):
    model = request.getfixturevalue(name)
    table = toy_table if name == "toy" else queries_to_table(QUERIES)  # mixed prompt lengths
    config = BackpatchConfig(include_embeddings=True, batch_rows=13)
    cases = _cases(model, table)
    naive, fast = sweep_naive(model, cases, config), sweep(model, cases, config)
    n_cells = len(all_cells(model, config))
    assert len(fast) == len(cases) * 2 * n_cells
    pd.testing.assert_frame_equal(naive.drop(columns="e3_logprob"), fast.drop(columns="e3_logprob"))
    torch.testing.assert_close(torch.tensor(naive.e3_logprob.values), torch.tensor(fast.e3_logprob.values),
                               atol=1e-4, rtol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["tiny_llama", "toy"])
def test_patching_a_layer_onto_itself_changes_nothing(request, name, toy_table):
    model = request.getfixturevalue(name)
    table = toy_table if name == "toy" else queries_to_table(QUERIES)
    layers = range(-1, model.cfg.n_layers)
    config = BackpatchConfig(cells=tuple(Cell(s, s, "back") for s in layers))
    cases = _cases(model, table)
    clean = dict(zip([c.id for c in cases], generate(model, [c.prompt for c in cases])))
    for result in (sweep(model, cases, config), sweep_naive(model, cases, config)):
        assert (result.generation == result.id.map(clean)).all()


def test_batched_equals_unbatched(tiny_gpt2):
    cases = _cases(tiny_gpt2, queries_to_table(QUERIES))
    one = sweep(tiny_gpt2, cases, BackpatchConfig(batch_rows=1))
    many = sweep(tiny_gpt2, cases, BackpatchConfig(batch_rows=10_000))
    pd.testing.assert_frame_equal(one.drop(columns="e3_logprob"), many.drop(columns="e3_logprob"))


def test_patched_kv_cache_equals_no_cache_loop(tiny_llama):
    prompts = [q.composition_prompt() for q in QUERIES]
    tok = tokenize_prompts(tiny_llama, prompts)
    _, cache = tiny_llama.run_with_cache(tok.tokens, attention_mask=tok.attention_mask)
    pos = torch.tensor([tok.tokens.shape[1] - 1] * len(prompts))
    for source, target in [(2, 0), (1, -1), (0, 2)]:
        values = cache[f"blocks.{source}.hook_resid_post"][:, -1]
        hooks = [patch_hook(target, pos, values)]
        cached = greedy_generate(tiny_llama, tok.tokens, tok.attention_mask, 10, hooks, use_kv_cache=True)
        loop = greedy_generate(tiny_llama, tok.tokens, tok.attention_mask, 10, hooks, use_kv_cache=False)
        assert torch.equal(cached.tokens, loop.tokens)
        # and the patch did something on a random model
        clean = greedy_generate(tiny_llama, tok.tokens, tok.attention_mask, 10)
        assert not torch.equal(clean.tokens, cached.tokens)


def test_bad_layers_positions_and_kinds(tiny_gpt2):
    cases = _cases(tiny_gpt2, queries_to_table(QUERIES))
    with pytest.raises(ValueError, match="out of range"):
        sweep(tiny_gpt2, cases, BackpatchConfig(cells=(Cell(7, 0, "back"),)))
    with pytest.raises(ValueError, match="unknown positions"):
        prepare_cases(tiny_gpt2, queries_to_table(QUERIES), BackpatchConfig(positions=("t3",)))
    with pytest.raises(ValueError, match="unknown patch kinds"):
        sweep(tiny_gpt2, cases, BackpatchConfig(kinds=("sideways",)))


def test_unresolvable_case_is_skipped_with_reason(tiny_gpt2):
    bad = QUERIES[0].__class__(**{**QUERIES[0].__dict__, "id": "bad", "source_prompt": "nothing here is"})
    cases, skipped = prepare_cases(tiny_gpt2, queries_to_table([QUERIES[1], bad]))
    assert [c.id for c in cases] == ["twice"]
    assert skipped.id.tolist() == ["bad"] and "does not occur" in skipped.reason[0]


def _toy_results():
    rows = []
    # three incorrect cases (a, b, c), one correct (d); kind back cells (1->0), (2->0); forward (0->1)
    success = {("a", 1, 0): True, ("a", 2, 0): False, ("b", 1, 0): False, ("b", 2, 0): False,
               ("c", 1, 0): True, ("c", 2, 0): True, ("d", 1, 0): True, ("d", 2, 0): False}
    for (i, s, t), ok in success.items():
        rows.append(dict(id=i, position="t1", source_layer=s, target_layer=t, kind="back", success=ok,
                         subset="correct" if i == "d" else "incorrect", split="test"))
        rows.append(dict(id=i, position="t1", source_layer=t, target_layer=s, kind="forward", success=False,
                         subset="correct" if i == "d" else "incorrect", split="test"))
    return pd.DataFrame(rows)


def test_oracle_rates_hand_computed():
    rates = oracle_rates(_toy_results()).query("split == 'test'").set_index(["subset", "kind"])
    assert rates.loc[("incorrect", "back"), "rate"] == pytest.approx(2 / 3)
    assert rates.loc[("incorrect", "back"), "rescued"] == 2
    assert rates.loc[("incorrect", "forward"), "rate"] == 0
    lo, hi = rates.loc[("incorrect", "back"), ["ci_low", "ci_high"]]
    assert 0 <= lo <= 2 / 3 <= hi <= 1


def test_non_oracle_picks_on_train_and_reports_held_out():
    result = non_oracle(_toy_results(), train_fraction=0.5, seed=0).query("split == 'test'").set_index("kind").loc["back"]
    assert (result.source_layer, result.target_layer) in {(1, 0), (2, 0)}
    assert result.heldout_incorrect + result.train_cases == 3
    damage = {(1, 0): 0.0, (2, 0): 1.0}[(result.source_layer, result.target_layer)]
    assert result.damage == damage and result.correct_cases == 1


def test_first_token_screen_keeps_the_oracle_when_it_covers_every_success(toy):
    data = load_dataset("toy")
    cases = _cases(toy, data[data.split == "test_id"].iloc[:12])
    full = sweep(toy, cases, BackpatchConfig(positions=("t2",), batch_rows=64))
    k = int(full.loc[full.success, "e3_rank"].max())  # the worst first-step rank of any success
    screened = sweep(toy, cases, BackpatchConfig(positions=("t2",), batch_rows=64, screen=k))
    keys = ["id", "position", "source_layer", "target_layer", "kind"]
    assert screened[keys].equals(full[keys]) and screened.screened.any() and not full.screened.any()
    kept = ~screened.screened
    assert (screened.loc[kept, "e3_rank"] <= k).all()
    assert screened.generation[kept].tolist() == full.generation[kept].tolist()  # decoded as without the screen
    assert screened.success.tolist() == full.success.tolist()  # no success was screened out
    tighter = sweep(toy, cases, BackpatchConfig(positions=("t2",), batch_rows=64, screen=max(k - 1, 0)))
    assert tighter.screened.sum() >= screened.screened.sum()
    with pytest.raises(ValueError, match="fast engine"):
        sweep_naive(toy, cases[:1], BackpatchConfig(screen=3))


def test_success_samples_show_what_counted():
    from latent_hops.analyses.backpatch import success_samples

    rows = [("a", "t2", 3, 1, "back", "the Yen", True, "incorrect"), ("b", "t2", 3, 1, "back", "Yen!", True, "incorrect"),
            ("c", "t2", 3, 1, "back", "yen yen", True, "incorrect"), ("a", "t2", 2, 1, "back", "Yen", True, "incorrect"),
            ("a", "t2", 2, 1, "back", "no", False, "incorrect"), ("d", "t2", 3, 1, "back", "Yen", True, "correct")]
    table = pd.DataFrame(rows, columns=["id", "position", "source_layer", "target_layer", "kind", "generation",
                                        "success", "subset"])
    sample = success_samples(table, cells=1, per_cell=2)
    assert sample[["source_layer", "rescued"]].values.tolist() == [[3, 3], [3, 3]]  # the best cell, 2 examples
    assert sample.generation.tolist() == ["the Yen", "Yen!"] and "d" not in set(sample.id)  # incorrect cases only


def test_one_call_api_equals_the_steps_it_replaces(toy):
    import latent_hops as lh
    from latent_hops.evaluation import evaluate

    table = load_dataset("toy")
    table = table[table.split == "test_id"].iloc[:12]
    config = BackpatchConfig(source_layers=(3, 6), target_layers=(1, 4))
    result = lh.run_backpatch(toy, table, config, max_cases=2)
    # the nine steps by hand: evaluate, keep analysable subsets, head per subset, cases, sweep, labels
    evaluation = evaluate(toy, table)
    chosen = evaluation[evaluation.subset.isin(["incorrect", "correct"])].groupby("subset", sort=False).head(2)
    assert 0 < len(chosen) <= 4
    cases, _ = prepare_cases(toy, table[table.id.isin(set(chosen.id))], config)
    expected = with_labels(sweep(toy, cases, config), evaluation)
    pd.testing.assert_frame_equal(result.table, expected)
    assert not set(result.table.id) & set(evaluation[evaluation.subset == "excluded"].id)
    # grid (3, 6) x (1, 4): back 3->1, 6->1, 6->4; forward 3->4 only; random like back
    assert result.summary.groupby("kind").cells.max().to_dict() == {"back": 3, "forward": 1, "random": 3}
    assert set(result.summary.split) == {"all"}
    assert len(result.heatmap("incorrect" if "incorrect" in set(chosen.subset) else "correct", "t1").data) == 1


def test_non_oracle_picks_the_best_cell_not_the_worst():
    """A cell that rescues every incorrect case beats one that rescues none (idxmax, not idxmin)."""
    rows = [dict(id=f"q{i}", position="t2", source_layer=s, target_layer=0, kind="back", success=s == 1,
                 subset="incorrect", split="test") for i in range(10) for s in (1, 2)]
    rows += [dict(id="ok", position="t2", source_layer=s, target_layer=0, kind="back", success=s == 2,
                  subset="correct", split="test") for s in (1, 2)]
    best = non_oracle(pd.DataFrame(rows)).query("split == 'test'").iloc[0]
    assert (best.source_layer, best.target_layer, best.train_rate, best.gain) == (1, 0, 1.0, 1.0)
    assert best.damage == 1.0  # the chosen cell breaks the one correct case
