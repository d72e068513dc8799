"""Causal tracing (latent_hops/analyses/causal_tracing.py): the invariants of the method (no
noise: nothing to recover; noise and no restoration: the corrupted run; the last layer at
t2 and a one-token e1's embedding: everything), equality with a naive one-restoration-per-
forward reference (hidden states and sublayer windows), the known answer on the GPT-2 toy
(the two-hop answer flows through t1 until its last block reads it), bad input, and the
analysis end to end: CLI command, table, stage measure, report section."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import load_script

from latent_hops.analyses.causal_tracing import (
    CausalTracingConfig,
    causal_trace,
    first_hop_e1_span,
    noise_edit,
    peak_layers,
    trace_noise,
    traced_prompt,
    window_blocks,
)
from latent_hops.backend import EMBEDDINGS, Edit, Site
from latent_hops.cli import main
from latent_hops.errors import InputError
from latent_hops.patching import patch_edit, write_positions
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import TwoHopQuery, iter_queries, load_dataset


@pytest.fixture(scope="module")
def queries():
    return iter_queries(load_dataset("toy").query("split == 'test_id'").head(3))


def _prob(model, item, edits=()):
    tok = tokenize_prompts(model, [item.text])
    logits = model.last_logits(tok.tokens, tok.attention_mask, edits)
    return float(logits.float().softmax(-1)[0, item.answer_tokens].max())


def test_first_hop_span_comes_from_the_template():
    q = TwoHopQuery(id="q", e1_label="of", e2_label="b", e3_label="c", r1_template="the son of {}",
                    r2_template="the home of {}")
    prompt = q.prompts()["first_hop"]
    start, end = first_hop_e1_span(q)
    assert prompt[start:end] == "of" and start == len("the son of ")  # its own mention, not r1's "of"


def test_no_noise_leaves_nothing_to_recover(toy_gpt2, queries):
    table = causal_trace(toy_gpt2, queries[:2], CausalTracingConfig(noise_scale=0.0, trace_sites=("resid", "mlp_out"),
                                                                    trace_window=2))
    assert len(table) and table.skip_reason.isna().all()
    assert torch.allclose(torch.tensor(table.restored_prob.values), torch.tensor(table.clean_prob.values), atol=1e-5)
    assert (table.corrupted_prob - table.clean_prob).abs().max() < 1e-5 and table.indirect_effect.abs().max() < 1e-5


def test_the_corrupted_baseline_and_full_recoveries(toy_gpt2, queries):
    config = CausalTracingConfig(trace_layers="-1:", noise_samples=2, trace_prompts=("composition",))
    table = causal_trace(toy_gpt2, queries[:2], config)
    last = toy_gpt2.n_layers - 1
    for q in queries[:2]:
        item = traced_prompt(toy_gpt2, q, "composition")
        rows = table[table.id == q.id]
        noise = trace_noise(f"0|{q.id}|composition", 2, len(item.e1_columns), toy_gpt2.d_model, 1.0)
        tok = tokenize_prompts(toy_gpt2, [item.text])
        emb = toy_gpt2.read_sites(tok.tokens, tok.attention_mask, torch.tensor([item.e1_columns]),
                                  [Site("resid", EMBEDDINGS)])
        std = 3.0 * float(emb.float().std(unbiased=False))
        corrupted = [_prob(toy_gpt2, item, [noise_edit(item.e1_columns, noise[k : k + 1] * std)]) for k in range(2)]
        assert rows.corrupted_prob.iloc[0] == pytest.approx(sum(corrupted) / 2, abs=1e-6)
        assert rows.clean_prob.iloc[0] == pytest.approx(_prob(toy_gpt2, item), abs=1e-6)
        assert rows.clean_prob.iloc[0] > rows.corrupted_prob.iloc[0]  # the noise does hurt
        at_t2_last = rows[(rows.position == "t2") & (rows.hidden_layer == last)]
        assert at_t2_last.restored_prob.iloc[0] == pytest.approx(rows.clean_prob.iloc[0], abs=1e-5)
        if len(item.e1_columns) == 1:  # the one corrupted embedding restored: no noise left
            at_e1 = rows[(rows.token_index == item.e1_columns[0]) & (rows.hidden_layer == EMBEDDINGS)]
            assert at_e1.restored_prob.iloc[0] == pytest.approx(rows.clean_prob.iloc[0], abs=1e-5)


def test_batched_restorations_equal_one_forward_each(toy, queries):
    """Every restored probability equals a naive run with only that restoration (the noise
    edit, then a patch of the hidden state, or of each block of a sublayer window)."""
    config = CausalTracingConfig(trace_sites=("resid", "mlp_out", "attn_out"), trace_window=3, noise_samples=2,
                                 trace_layers="0,2,5,7", batch_rows=37)
    table = causal_trace(toy, queries[:1], config)
    q = queries[0]
    for prompt, rows in table.groupby("prompt"):
        item = traced_prompt(toy, q, prompt)
        tok = tokenize_prompts(toy, [item.text])
        n = tok.tokens.shape[1]
        positions = torch.arange(n)[None]
        emb = toy.read_sites(tok.tokens, tok.attention_mask, torch.tensor([item.e1_columns]),
                             [Site("resid", EMBEDDINGS)])
        std = 3.0 * float(emb.float().std(unbiased=False))
        noise = trace_noise(f"0|{q.id}|{prompt}", 2, len(item.e1_columns), toy.d_model, std)
        assert len(rows) == 3 * n * 4
        for row in rows.sample(25, random_state=0).itertuples():
            if row.site == "resid":
                sites = [Site("resid", row.hidden_layer)]
            else:
                sites = [Site(row.site, b) for b in window_blocks(row.window_center, 3, toy.n_layers)]
            clean = toy.read_sites(tok.tokens, tok.attention_mask, positions, sites)[0]
            got = []
            for k in range(2):
                edits = [noise_edit(item.e1_columns, noise[k : k + 1])]
                for j, site in enumerate(sites):
                    value = clean[row.token_index, j][None]
                    col = torch.tensor([row.token_index])
                    if site.kind == "resid":
                        edits.append(patch_edit(site.layer, col, value))
                    else:
                        edits.append(Edit(site, lambda a, col=col, value=value: write_positions(a, col, value)))
                got.append(_prob(toy, item, edits))
            assert row.restored_prob == pytest.approx(sum(got) / 2, abs=2e-5), row


def test_the_gpt2_toy_carries_the_two_hop_answer_through_t1(toy_gpt2):
    """The GPT-2 toy holds the bridge at t1 (README): with e1 corrupted, restoring t1's hidden
    state recovers the two-hop answer at every layer up to the last but one, restoring t2's
    recovers nothing before the last layer (the answer is read from t1 in the last block)."""
    queries = iter_queries(load_dataset("toy").query("split == 'test_id'").head(12))
    table = causal_trace(toy_gpt2, queries, CausalTracingConfig(trace_prompts=("composition",)))
    last = toy_gpt2.n_layers - 1
    share = (table.indirect_effect / (table.clean_prob - table.corrupted_prob)).rename("share")
    per = table.assign(share=share).groupby(["position", "hidden_layer"]).share.mean()
    assert all(per["t1", layer] > 0.8 for layer in range(last))
    assert per["t1", last] == 0 and per["t2", last] > 0.99
    assert all(abs(per["t2", layer]) < 0.1 for layer in range(last))
    peaks = peak_layers(table.assign(prompt="first_hop"), CausalTracingConfig()).trace_peak_layer
    assert peaks.notna().sum() >= 10 and peaks.max() < last


def test_bad_input_is_refused_or_skipped_with_its_reason(toy):
    with pytest.raises(InputError, match="unknown prompts/sites"):
        causal_trace(toy, [], CausalTracingConfig(trace_sites=("mlp",)))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="centred on blocks 0 and up"):
        causal_trace(toy, [], CausalTracingConfig(trace_sites=("mlp_out",), trace_layers="-1,2"))
    with pytest.raises(InputError, match="out of range"):
        causal_trace(toy, [], CausalTracingConfig(trace_layers="0,99"))
    q = iter_queries(load_dataset("toy").head(1))[0]
    moved = TwoHopQuery(**{**q.__dict__, "id": "odd", "source_prompt": "nothing of e1 here is"})
    table = causal_trace(toy, [moved], CausalTracingConfig(trace_layers="3"))
    composition = table[table.prompt == "composition"]
    assert len(composition) == 1 and "does not occur" in composition.skip_reason.iloc[0]
    assert table[table.prompt == "first_hop"].skip_reason.isna().all()  # its first hop is still traced
    assert window_blocks(0, 3, 8) == [0, 1, 2] and window_blocks(7, 3, 8) == [5, 6, 7]
    assert window_blocks(4, 4, 8) == [2, 3, 4, 5] and window_blocks(3, 20, 8) == list(range(8))


def test_the_analysis_end_to_end(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--model", "toy-gpt2", "--split", "test_id", "--limit", "60",
              "--max-cases", "2", "--device", "cpu"]
    tracing = ["--trace-sites", "resid,attn_out", "--trace-window", "2", "--noise-samples", "2"]
    assert main(["causal_tracing", *common, *tracing]) == 0
    table = pd.read_parquet(out / "causal_tracing.parquet")
    assert set(table.site) == {"resid", "attn_out"} and set(table.prompt) == {"first_hop", "composition"}
    assert table.hidden_layer.isna().eq(table.site != "resid").all()
    skip = "knockout,projection,patchscope,probe,interchange"
    assert main(["stages", *common, "--skip", skip + ",causal_tracing"]) == 0
    decoded = pd.read_parquet(out / "stages.parquet").set_index("id").first_hop_layer
    assert main(["stages", *common, *tracing, "--skip", skip]) == 0  # the same options: reused
    both = pd.read_parquet(out / "stages.parquet").set_index("id").first_hop_layer
    peak = peak_layers(table, CausalTracingConfig()).trace_peak_layer
    expected = pd.concat([decoded, peak], axis=1).mean(axis=1)  # the stage's measures, averaged
    assert both.notna().any() and (both - expected.reindex(both.index)).abs().max() < 1e-9
    assert main(["report", str(out)]) == 0
    assert "Causal tracing" in (out / "report.html").read_text()
    numbers = load_script("causal_numbers").tracing(out)  # what the docs quote for SmolLM2
    assert "| prompt | layer | t1 | t2 | McNemar |" in numbers and "composition" in numbers
