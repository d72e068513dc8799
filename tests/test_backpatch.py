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
from latent_hops.errors import InputError
from latent_hops.generation import generate
from latent_hops.patching import patch_edit
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
    # the tiny models: every cell; the 8-layer toy: a grid from the embeddings to the last layer
    grid = "-1,0,3,7" if name == "toy" else None
    config = BackpatchConfig(include_embeddings=True, batch_rows=13, source_layers=grid, target_layers=grid)
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
    layers = range(-1, model.n_layers)
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
    _, cache = tiny_llama.tl.run_with_cache(tok.tokens, attention_mask=tok.attention_mask)
    pos = torch.tensor([tok.tokens.shape[1] - 1] * len(prompts))
    for source, target in [(2, 0), (1, -1), (0, 2)]:
        values = cache[f"blocks.{source}.hook_resid_post"][:, -1]
        edits = [patch_edit(target, pos, values)]
        cached = tiny_llama.greedy_generate(tok.tokens, tok.attention_mask, 10, edits, use_kv_cache=True)
        loop = tiny_llama.greedy_generate(tok.tokens, tok.attention_mask, 10, edits, use_kv_cache=False)
        assert torch.equal(cached.tokens, loop.tokens)
        # and the patch did something on a random model
        clean = tiny_llama.greedy_generate(tok.tokens, tok.attention_mask, 10)
        assert not torch.equal(clean.tokens, cached.tokens)


def test_bad_layers_positions_and_kinds(tiny_gpt2):
    cases = _cases(tiny_gpt2, queries_to_table(QUERIES))
    with pytest.raises(ValueError, match="out of range"):
        sweep(tiny_gpt2, cases, BackpatchConfig(cells=(Cell(7, 0, "back"),)))
    with pytest.raises(ValueError, match="unknown positions"):
        prepare_cases(tiny_gpt2, queries_to_table(QUERIES), BackpatchConfig(positions=("t3",)))
    with pytest.raises(ValueError, match="unknown patch kinds"):
        sweep(tiny_gpt2, cases, BackpatchConfig(kinds=("sideways",)))
    for budget in (0.0, -5.0, float("nan")):  # not one row per forward, silently
        with pytest.raises(InputError, match="memory_budget_mb must be > 0"):
            sweep(tiny_gpt2, cases, BackpatchConfig(memory_budget_mb=budget))


def test_no_queries_make_no_cases(tiny_gpt2):
    cases, skipped = prepare_cases(tiny_gpt2, queries_to_table(QUERIES).iloc[:0])
    assert cases == [] and list(skipped.columns) == ["id", "skip_reason"] and skipped.empty


def test_unresolvable_case_is_skipped_with_reason(tiny_gpt2):
    bad = QUERIES[0].__class__(**{**QUERIES[0].__dict__, "id": "bad", "source_prompt": "nothing here is"})
    cases, skipped = prepare_cases(tiny_gpt2, queries_to_table([QUERIES[1], bad]))
    assert [c.id for c in cases] == ["twice"]
    assert skipped.id.tolist() == ["bad"] and "does not occur" in skipped.skip_reason[0]


def _toy_results():
    rows = []
    # three incorrect cases (a, b, c), one correct (d); kind back cells (1->0), (2->0); forward (0->1)
    success = {("a", 1, 0): True, ("a", 2, 0): False, ("b", 1, 0): False, ("b", 2, 0): False,
               ("c", 1, 0): True, ("c", 2, 0): True, ("d", 1, 0): True, ("d", 2, 0): False}
    for (i, s, t), ok in success.items():
        rows.append(dict(id=i, position="t1", source_layer=s, target_layer=t, kind="back", alias_match=ok,
                         subset="correct" if i == "d" else "incorrect", split="test"))
        rows.append(dict(id=i, position="t1", source_layer=t, target_layer=s, kind="forward", alias_match=False,
                         subset="correct" if i == "d" else "incorrect", split="test"))
    return pd.DataFrame(rows)


def test_oracle_rates_hand_computed():
    rates = oracle_rates(_toy_results()).query("split == 'test'").set_index(["subset", "kind"])
    assert rates.loc[("incorrect", "back"), "rate"] == pytest.approx(2 / 3)
    assert rates.loc[("incorrect", "back"), "successes"] == 2
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
    k = int(full.loc[full.alias_match, "e3_rank"].max())  # the worst first-step rank of any success
    screened = sweep(toy, cases, BackpatchConfig(positions=("t2",), batch_rows=64, screen=k))
    keys = ["id", "position", "source_layer", "target_layer", "kind"]
    assert screened[keys].equals(full[keys]) and screened.screened.any() and not full.screened.any()
    kept = ~screened.screened
    assert (screened.loc[kept, "e3_rank"] <= k).all()
    assert screened.generation[kept].tolist() == full.generation[kept].tolist()  # decoded as without the screen
    assert screened.alias_match.tolist() == full.alias_match.tolist()  # no success was screened out
    assert screened.generation[screened.screened].isna().all()  # not decoded: null, not ""
    tighter = sweep(toy, cases, BackpatchConfig(positions=("t2",), batch_rows=64, screen=max(k - 1, 0)))
    assert tighter.screened.sum() >= screened.screened.sum()
    with pytest.raises(ValueError, match="fast engine"):
        sweep_naive(toy, cases[:1], BackpatchConfig(screen=3))


def test_stopping_decided_cells_keeps_every_success_and_rank(toy):
    """With --stop-when-decided a cell's decoding ends once an e3 alias has appeared (and its
    row leaves the batch): the same successes, ranks and screen; a success's generation is
    the full one cut after the alias, every other generation is the full one."""
    data = load_dataset("toy")
    cases = _cases(toy, data[data.split == "test_id"].iloc[:12])
    for screen in (None, 3):
        with toy.count_work() as work_full:
            full = sweep(toy, cases, BackpatchConfig(batch_rows=64, screen=screen))
        with toy.count_work() as work_cut:
            cut = sweep(toy, cases, BackpatchConfig(batch_rows=64, screen=screen, stop_when_decided=True))
        same = ["id", "position", "source_layer", "target_layer", "kind", "alias_match", "e3_rank", "screened"]
        pd.testing.assert_frame_equal(cut[same], full[same])
        torch.testing.assert_close(torch.tensor(cut.e3_logprob.values), torch.tensor(full.e3_logprob.values),
                                   atol=1e-5, rtol=0, equal_nan=True)
        won = full.alias_match.to_numpy(dtype=bool)
        assert won.sum() > 50
        assert cut.generation[~won].tolist() == full.generation[~won].tolist()
        pairs = list(zip(cut.generation[won], full.generation[won]))
        assert all(f.startswith(c) for c, f in pairs)
        # the toy answers with one word, then EOS: a success's step that would give the EOS is
        # not run, and rows that ended leave the batch; less work, the same table
        assert work_cut.unembedded < 0.8 * work_full.unembedded
        assert work_cut.block_tokens < work_full.block_tokens
    with pytest.raises(ValueError, match="fast engine"):
        sweep_naive(toy, cases[:1], BackpatchConfig(stop_when_decided=True))


def test_cases_prepared_for_other_positions_are_refused(toy, toy_table):
    cases = _cases(toy, toy_table, positions=("t2",))
    with pytest.raises(InputError, match="prepare the cases"):
        sweep(toy, cases, BackpatchConfig(positions=("t1",)))


def test_success_samples_show_what_counted():
    from latent_hops.analyses.backpatch import success_samples

    rows = [("a", "t2", 3, 1, "back", "the Yen", True, "incorrect"), ("b", "t2", 3, 1, "back", "Yen!", True, "incorrect"),
            ("c", "t2", 3, 1, "back", "yen yen", True, "incorrect"), ("a", "t2", 2, 1, "back", "Yen", True, "incorrect"),
            ("a", "t2", 2, 1, "back", "no", False, "incorrect"), ("d", "t2", 3, 1, "back", "Yen", True, "correct")]
    table = pd.DataFrame(rows, columns=["id", "position", "source_layer", "target_layer", "kind", "generation",
                                        "alias_match", "subset"])
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
    rows = [dict(id=f"q{i}", position="t2", source_layer=s, target_layer=0, kind="back", alias_match=s == 1,
                 subset="incorrect", split="test") for i in range(10) for s in (1, 2)]
    rows += [dict(id="ok", position="t2", source_layer=s, target_layer=0, kind="back", alias_match=s == 2,
                  subset="correct", split="test") for s in (1, 2)]
    best = non_oracle(pd.DataFrame(rows)).query("split == 'test'").iloc[0]
    assert (best.source_layer, best.target_layer, best.train_rate, best.gain) == (1, 0, 1.0, 1.0)
    assert best.damage == 1.0  # the chosen cell breaks the one correct case


# ---------------------------------------------------------------------------- shared pieces
# Both engines read states with ``read_sites``, build patch values with ``_patch_value`` and
# rows with ``_records``: a bug there is invisible to fast == naive, so each is checked here
# against an independent reference.


def test_best_rank_hand_computed():
    from latent_hops.ranks import best_rank

    logprobs = torch.tensor([[-1.0, -3.0, -0.5, -2.0], [-4.0, -1.0, -1.0, -3.0]])
    rank, best = best_rank(logprobs, [1, 3])
    assert rank.tolist() == [2, 0]  # row 0: token 3 (-2) is beaten by -1 and -0.5; row 1: a tie is not a loss
    assert best.tolist() == [-2.0, -1.0]
    rank, best = best_rank(logprobs, [])
    assert rank.tolist() == [-1, -1] and torch.isnan(best).all()  # no known token


def test_read_sites_equals_transformer_lens_cache(tiny_llama):
    from latent_hops.backend import Site

    tok = tokenize_prompts(tiny_llama, [q.composition_prompt() for q in QUERIES])
    cols = torch.tensor([[n + 1, tok.tokens.shape[1] - 1] for n in tok.n_pad])
    layers = [-1, 0, 2]
    states = tiny_llama.read_sites(tok.tokens, tok.attention_mask, cols, [Site("resid", x) for x in layers])
    _, cache = tiny_llama.tl.run_with_cache(tok.tokens, attention_mask=tok.attention_mask)
    for li, layer in enumerate(layers):
        name = "blocks.0.hook_resid_pre" if layer == -1 else f"blocks.{layer}.hook_resid_post"
        for row in range(len(QUERIES)):
            for pi in range(2):
                torch.testing.assert_close(states[row, pi, li], cache[name][row, cols[row, pi]])


def test_random_direction_has_the_norm_and_is_fixed_by_its_key():
    from latent_hops.analyses.backpatch import random_direction

    like = torch.arange(16, dtype=torch.float32) - 3.0
    cell = Cell(5, 2, "random")
    v = random_direction("q1", "t1", cell, like, seed=0)
    assert v.shape == like.shape and torch.isclose(v.norm(), like.norm())
    assert torch.equal(v, random_direction("q1", "t1", cell, like, seed=0))  # reproducible
    others = [random_direction("q2", "t1", cell, like, 0), random_direction("q1", "t2", cell, like, 0),
              random_direction("q1", "t1", Cell(5, 3, "random"), like, 0), random_direction("q1", "t1", cell, like, 1)]
    for w in others:  # any other query, position, cell or seed: another direction
        assert abs(float(torch.nn.functional.cosine_similarity(v, w, dim=0))) < 0.9
    # the direction depends on the key only, never on the source state's values
    twice = random_direction("q1", "t1", cell, 2 * like, seed=0)
    torch.testing.assert_close(twice, 2 * v)
    half = random_direction("q1", "t1", cell, like.to(torch.bfloat16), seed=0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), v, atol=0.05, rtol=0.02)


def test_patch_values_by_kind(toy, toy_table):
    from latent_hops.analyses.backpatch.engine import _patch_value

    case = _cases(toy, toy_table)[0]
    state = torch.randn(toy.d_model)
    assert _patch_value(case, "t1", Cell(3, 1, "back"), state, 0) is state
    assert _patch_value(case, "t1", Cell(1, 3, "forward"), state, 0) is state
    random = _patch_value(case, "t1", Cell(3, 1, "random"), state, 0)
    assert not torch.equal(random, state) and torch.isclose(random.norm(), state.norm())


def test_records_from_a_known_output(toy, toy_table):
    """A row from known generated tokens and first-step logits: text, alias match, rank."""
    from latent_hops.analyses.backpatch.engine import _records
    from latent_hops.backend import GreedyOutput

    case = _cases(toy, toy_table)[0]
    e3 = case.first_tokens["e3"][0]
    answer = toy.tokenizer(" " + case.names["e3"][0], add_special_tokens=False)["input_ids"]
    tokens = torch.full((2, 10), toy.pad_id)
    tokens[0, : len(answer)] = torch.tensor(answer)
    logits = torch.zeros(2, toy.d_vocab)
    logits[:, e3] = 1.0
    logits[0, :2] = 5.0  # two tokens beat e3 in row 0 (neither is e3: special tokens)
    out = GreedyOutput(tokens, logits)
    rows = [(case, "t2", Cell(3, 1, "back")), (case, "t1", Cell(1, 3, "forward"))]
    first, second = _records(toy, rows, out)
    assert (first["alias_match"], first["e3_rank"], first["generation"].strip()) == (True, 2, case.names["e3"][0])
    assert (second["alias_match"], second["e3_rank"], second["generation"]) == (False, 0, "")
    assert (first["source_layer"], first["target_layer"], first["kind"], first["position"]) == (3, 1, "back", "t2")
    screened = _records(toy, rows, out, screen=1)
    assert screened[0]["screened"] and screened[0]["generation"] is None and not screened[0]["alias_match"]
    assert not screened[1]["screened"]  # rank 0 <= 1: decoded


def test_cli_and_api_choose_the_same_cases(tmp_path):
    """One meaning of --max-cases / max_cases: per split x subset, in dataset order."""
    import latent_hops as lh
    from latent_hops.cli import main

    table = load_dataset("toy").groupby("split").head(30)
    path = tmp_path / "queries.parquet"
    lh.save_dataset(table, path)
    out = tmp_path / "run"
    grid = ["--positions", "t2", "--kinds", "back", "--source-layers", "7", "--target-layers", "0"]
    assert main(["backpatch", "--dataset", str(path), "--out", str(out), "--max-cases", "2", "--device", "cpu",
                 *grid]) == 0
    cli_ids = set(pd.read_parquet(out / "backpatch.parquet").id)
    model = lh.load_model("toy", device="cpu")
    config = BackpatchConfig(positions=("t2",), kinds=("back",), source_layers=(7,), target_layers=(0,))
    api_ids = set(lh.run_backpatch(model, table, config, max_cases=2, progress=False).table.id)
    assert cli_ids == api_ids and len(api_ids) == 12  # 3 splits x 2 subsets x 2 cases
