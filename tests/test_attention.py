"""Attention from t2 to t1 (latent_hops/analyses/attention.py): equal to TransformerLens' own
attention pattern, and a whole analysis from one module (CLI command, table, report)."""

import pandas as pd
import pytest
import torch
from test_positions import QUERIES

from latent_hops.analyses.attention import attention_to_t1
from latent_hops.cases import prepare_cases
from latent_hops.cli import main
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import queries_to_table


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_weights_equal_the_cached_pattern(request, name):
    model = request.getfixturevalue(name)
    cases, _ = prepare_cases(model, queries_to_table(QUERIES))
    table = attention_to_t1(model, cases, batch_size=2).set_index(["id", "block", "head"])  # batched, left-padded
    for case in cases:
        tok = tokenize_prompts(model, [case.prompt])
        _, cache = model.tl.run_with_cache(tok.tokens)
        for layer in range(model.n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, case.positions["t2"], case.positions["t1"]]
            got = torch.tensor([table.loc[(case.id, layer, h), "weight"] for h in range(model.tl.cfg.n_heads)],
                               dtype=torch.float32)
            torch.testing.assert_close(got, pattern.float(), atol=1e-5, rtol=1e-4)


def test_attention_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["attention", "--out", str(out), "--split", "test_id", "--max-cases", "2", "--device", "cpu"]) == 0
    table = pd.read_parquet(out / "attention.parquet")
    assert table.id.nunique() == 4 and table.weight.between(0, 1).all()
    assert main(["report", str(out)]) == 0
    assert "Attention from t2 to t1" in (out / "report.html").read_text()
