"""Analyses: logit lens, sublayer projection, attention knockout, Patchscopes, stages."""

import pandas as pd
import pytest
import torch
from test_positions import QUERIES

from latent_hops.analyses.knockout import KnockoutConfig, attention_knockout, edges
from latent_hops.analyses.logit_lens import logit_lens, onset_layer, resolution_layers
from latent_hops.analyses.patchscopes import (
    PatchscopeConfig,
    TargetPrompt,
    classify,
    patchscope,
    patchscope_layers,
)
from latent_hops.analyses.projection import projection_layers, sublayer_projection
from latent_hops.backend.tl import as_hooks
from latent_hops.cases import Case, prepare_cases
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import load_dataset, queries_to_table


@pytest.fixture(scope="module")
def llama_cases(tiny_llama):
    cases, skipped = prepare_cases(tiny_llama, queries_to_table(QUERIES))
    assert skipped.empty
    return cases


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_logit_lens_at_last_layer_is_the_model(request, name):
    model = request.getfixturevalue(name)
    tok = tokenize_prompts(model, [q.composition_prompt() for q in QUERIES])
    logits, cache = model.tl.run_with_cache(tok.tokens, attention_mask=tok.attention_mask)
    last = cache[f"blocks.{model.n_layers - 1}.hook_resid_post"][:, -1]
    torch.testing.assert_close(model.project_to_vocab(last), logits[:, -1].log_softmax(-1), atol=1e-5, rtol=0)


def test_logit_lens_table(tiny_llama, llama_cases):
    lens = logit_lens(tiny_llama, llama_cases)
    assert len(lens) == len(llama_cases) * 2 * (tiny_llama.n_layers + 1)
    top = lens[(lens.position == "t2") & (lens.hidden_layer == tiny_llama.n_layers - 1)].set_index("id").top_token
    tok = tokenize_prompts(tiny_llama, [c.prompt for c in llama_cases])
    predicted = tiny_llama.tl(tok.tokens, attention_mask=tok.attention_mask)[:, -1].argmax(-1).tolist()
    assert [top[c.id] for c in llama_cases] == predicted
    assert ((lens.e2_rank >= 0) & (lens.e2_prob <= 1)).all()
    assert lens.e2_rank.dtype == "Int64"  # nullable: a missing rank is null, never -1


def test_resolution_and_onset_layers_hand_made():
    rows = [("a", "t1", 0, 3, 5), ("a", "t1", 1, 0, 5), ("a", "t2", 0, 2, 20), ("a", "t2", 1, 0, 4),
            ("a", "t2", 2, 1, 12), ("a", "t2", 3, 0, 0), ("b", "t1", 0, 1, 1), ("b", "t2", 0, 1, 50),
            ("b", "t2", 1, 1, 50), ("b", "t2", 2, 1, 50), ("b", "t2", 3, 1, 50)]
    lens = pd.DataFrame(rows, columns=["id", "position", "hidden_layer", "e2_rank", "e3_rank"]).astype(
        {"e2_rank": "Int64", "e3_rank": "Int64"})
    res = resolution_layers(lens).set_index("id")
    assert res.loc["a", "first_hop_layer"] == 1 and pd.isna(res.loc["b", "first_hop_layer"])
    assert res.loc["a", "second_hop_layer"] == 3 and res.loc["a", "e2_at_t2_layer"] == 1
    onset = onset_layer(lens, k=10)
    assert onset["a"] == 3  # rank 4 at layer 1 leaves the top 10 again at layer 2
    assert pd.isna(onset["b"])
    assert onset_layer(lens, k=20)["a"] == 0


def test_sublayer_projection(tiny_llama, llama_cases):
    proj = sublayer_projection(tiny_llama, llama_cases)
    assert len(proj) == len(llama_cases) * tiny_llama.n_layers * 2
    assert set(proj.sublayer) == {"attn", "mlp"}
    layers = projection_layers(proj)
    assert list(layers.id) == [c.id for c in llama_cases]



def test_sublayer_projection_reads_the_named_sublayer(tiny_llama, llama_cases):
    """Each row's ranks are those of that block's attention (MLP) output at t2, read through
    TransformerLens' own cache: swapping the labels fails here."""
    proj = sublayer_projection(tiny_llama, llama_cases).set_index(["id", "block", "sublayer"])
    hooks = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}
    differs = False
    for case in llama_cases:
        tok = tokenize_prompts(tiny_llama, [case.prompt])
        _, cache = tiny_llama.tl.run_with_cache(tok.tokens)
        for layer in range(tiny_llama.n_layers):
            ranks = {}
            for sub, hook in hooks.items():
                logprobs = tiny_llama.project_to_vocab(cache[f"blocks.{layer}.{hook}"][0, -1])
                best = logprobs[case.first_tokens["e3"]].max()
                ranks[sub] = int((logprobs > best).sum())
                assert proj.loc[(case.id, layer, sub), "e3_rank"] == ranks[sub]
            differs |= ranks["attn"] != ranks["mlp"]
    assert differs  # the two sublayers are distinguishable on this model


def test_knockout_with_no_edges_changes_nothing(tiny_llama):
    tok = tokenize_prompts(tiny_llama, [q.composition_prompt() for q in QUERIES])
    clean = tiny_llama.greedy_generate(tok.tokens, tok.attention_mask, 10)
    none = torch.zeros((len(QUERIES),) + (tok.tokens.shape[1],) * 2, dtype=torch.bool)
    knocked = tiny_llama.greedy_generate(tok.tokens, tok.attention_mask, 10,
                                         tiny_llama.block_attention(range(tiny_llama.n_layers), none))
    assert torch.equal(clean.tokens, knocked.tokens)
    torch.testing.assert_close(clean.first_logits, knocked.first_logits)


def test_knockout_blocks_exactly_the_edges(tiny_llama, llama_cases):
    case = llama_cases[0]
    tok = tokenize_prompts(tiny_llama, [case.prompt])
    queries, keys = edges(case, "last_to_t1")
    mask = torch.zeros((1,) + (tok.tokens.shape[1],) * 2, dtype=torch.bool)
    mask[0, queries, keys] = True
    with tiny_llama.tl.hooks(fwd_hooks=as_hooks(tiny_llama.block_attention([1], mask))):
        _, cache = tiny_llama.tl.run_with_cache(tok.tokens)
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # [head, q, k]
    assert torch.all(pattern[:, queries[0], keys[0]] == 0)
    assert torch.all(cache["blocks.0.attn.hook_pattern"][0][:, queries[0], keys[0]] > 0)  # outside the window
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_knockout_table_and_skips(tiny_llama, llama_cases):
    odd = Case("odd", llama_cases[0].prompt, llama_cases[0].positions, llama_cases[0].names,
               llama_cases[0].first_tokens, r1_tokens=None)
    ko = attention_knockout(tiny_llama, llama_cases + [odd], KnockoutConfig(presets=("last_to_t1", "last_to_r1"), window=1))
    assert len(ko) == (len(llama_cases) + 1) * 2 * tiny_llama.n_layers
    skipped = ko[(ko.id == "odd") & (ko.preset == "last_to_r1")]
    assert skipped.skip_reason.notna().all() and ko.drop(skipped.index).skip_reason.isna().all()
    # a skipped row holds no result: never counted as "unchanged" or as a wrong answer
    assert skipped[["generation", "alias_match", "changed"]].isna().all().all()
    assert skipped.e3_logprob_delta.isna().all()
    assert ko.loc[ko.window_center == 0, "window_end"].eq(1).all()
    assert ko.loc[ko.window_center == 0, "window_start"].eq(0).all()


def test_classify_patterns_and_priority():
    names = {"e1": ("Imagine",), "e2": ("John Lennon", "Lennon"), "e3": ("Yoko Ono",)}
    assert classify("x: John Lennon is an English musician", names) == "e2"
    assert classify("x: Yoko Ono, Imagine: Imagine is a song", names) == "e1"  # e1 has priority
    assert classify("x: Yoko Ono", names) == "e3"  # end of text counts as a space
    assert classify("x: a song by Lennon", names) == "other"


def test_patchscope_onto_itself_reproduces_the_clean_generation(tiny_llama):
    target = TargetPrompt.from_text("the spouse of the performer of x is")
    tok = tokenize_prompts(tiny_llama, [target.text])
    slot = tok.char_span_position(0, target.placeholder)
    case = Case("self", target.text, {"t1": slot, "t2": tok.tokens.shape[1] - 1}, {"e1": (), "e2": (), "e3": ()},
                {"e2": [], "e3": []})
    n = tiny_llama.n_layers
    scopes = patchscope(tiny_llama, [case], PatchscopeConfig(target=target, positions=("t1",),
                                                             layer_pairs=tuple((s, s) for s in range(n))))
    out = tiny_llama.greedy_generate(tok.tokens, tok.attention_mask, 10)
    clean = tiny_llama.tokenizer.decode(tok.tokens[0, slot:].tolist() + out.tokens[0].tolist(),
                                        skip_special_tokens=True)
    assert (scopes.generation == clean).all() and len(scopes) == n


def test_patchscope_table_and_layers(tiny_llama, llama_cases):
    scopes = patchscope(tiny_llama, llama_cases, PatchscopeConfig(target=TargetPrompt.from_text("Paris: Paris, x")))
    n = tiny_llama.n_layers
    assert len(scopes) == len(llama_cases) * 2 * n * n
    assert set(scopes.decoded) <= {"e1", "e2", "e3", "other"}
    sampled = patchscope(tiny_llama, llama_cases[:1], PatchscopeConfig(
        target=TargetPrompt.from_text("Paris: Paris, x"), seeds=(0, 1), layer_pairs=((0, 0),)))
    assert sorted(sampled.seed) == [0, 0, 1, 1] and scopes.seed.isna().all()  # greedy: no seed
    assert list(patchscope_layers(scopes).columns) == ["id", "first_hop_layer", "e2_at_t2_layer", "second_hop_layer"]
    with pytest.raises(ValueError, match="placeholder"):
        TargetPrompt.from_text("no placeholder here", placeholder="zzz")


def test_probe_split_never_trains_on_the_scored_entities(toy):
    from latent_hops.analyses.probe import entity_folds

    table = load_dataset("toy")
    cases, _ = prepare_cases(toy, table[table.split == "train"].iloc[:300])
    scored = {c.id for c in cases[:100]}
    shared = {}
    for strict in (False, True):
        splits = entity_folds(cases, "e2", scored, folds=5, hold_out_target=strict)
        assert sorted(i for _, test, _ in splits for i in test) == list(range(100))  # each scored case once
        shared[strict] = 0
        for _, test, train in splits:
            assert len(train) > 0
            for i in test:
                assert not {j for j in train if cases[j].names["e1"][0] == cases[i].names["e1"][0]}
                shared[strict] += len({j for j in train if cases[j].names["e2"][0] == cases[i].names["e2"][0]})
    # folds by e1 alone keep other queries with the scored case's bridge in training; the strict
    # split removes every one of them
    assert shared[False] > 0 and shared[True] == 0


def test_probe_reads_the_bridge_and_its_control_does_not(toy):
    from latent_hops.analyses.probe import cross_validated_probe, probe_accuracy, probe_layers

    table = load_dataset("toy")
    cases, _ = prepare_cases(toy, table[table.split == "train"].iloc[:400])
    last = toy.n_layers - 1
    probed = cross_validated_probe(toy, cases[:100], cases[100:], "e2", "t2", layers=[0, 3, last])
    assert len(probed) == 3 * 100 and set(probed.hidden_layer) == {0, 3, last}
    acc = probe_accuracy(probed).set_index("hidden_layer")
    assert acc.loc[3, "accuracy"] > 0.3 > 0.1 > acc.loc[3, "control"]  # e2 is linearly at t2 by layer 3
    layers = probe_layers(probed)
    assert list(layers.columns) == ["id", "first_hop_layer", "e2_at_t2_layer", "second_hop_layer"]
    # a layer whose probe does not beat the control by the margin gives no case a layer
    weak = probed.assign(control_token_match=probed.token_match)
    assert probe_layers(weak)["e2_at_t2_layer"].isna().all()
