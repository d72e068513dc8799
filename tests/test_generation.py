"""Greedy generation: equal to Hugging Face's, batched == unbatched under left padding,
KV cache == no-cache loop; and the paper's alias scoring."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from latent_hops.generation import alias_match, generate
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import iter_queries, load_dataset

MIXED = ["Paris is", "the spouse of the performer of Imagine is", "the mayor of Saint-Étienne is",
         "John Lennon", "the author of the book of Kavo is Lennon and"]


def toy_prompts(n=12):
    qs = iter_queries(load_dataset("toy").iloc[:n])
    return [p for q in qs for p in (q.prompts()["first_hop"], q.prompts()["composition"],
                                     q.prompts()["relation_shortcut"])]


@pytest.mark.parametrize("name", ["toy", "tiny_llama", "tiny_gpt2"])
def test_batched_equals_unbatched(request, name):
    model = request.getfixturevalue(name)
    prompts = toy_prompts() if name == "toy" else MIXED
    one_by_one = [generate(model, [p], batch_size=1)[0] for p in prompts]
    assert generate(model, prompts, batch_size=7) == one_by_one
    assert generate(model, prompts, batch_size=len(prompts)) == one_by_one


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_kv_cache_equals_no_cache_loop(request, name):
    model = request.getfixturevalue(name)
    batch = tokenize_prompts(model, MIXED)
    cached = model.greedy_generate(batch.tokens, batch.attention_mask, 10, use_kv_cache=True)
    loop = model.greedy_generate(batch.tokens, batch.attention_mask, 10, use_kv_cache=False)
    assert torch.equal(cached.tokens, loop.tokens)
    torch.testing.assert_close(cached.first_logits, loop.first_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_equals_hugging_face_greedy(request, name):
    path = request.getfixturevalue(name)
    model = request.getfixturevalue(name.removesuffix("_dir"))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    for prompt in MIXED:
        tokens = tokenize_prompts(model, [prompt]).tokens
        ref = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=10, do_sample=False,
                          pad_token_id=model.tokenizer.pad_token_id)[0, tokens.shape[1]:].tolist()
        ours = model.greedy_generate(tokens, torch.ones_like(tokens), 10).tokens[0].tolist()
        eos = model.tokenizer.eos_token_id
        cut = lambda ids: ids[: ids.index(eos) + 1] if eos in ids else ids  # noqa: E731
        assert cut(ours) == cut(ref), prompt


def test_alias_scoring():
    assert alias_match(" Yoko Ono and", ["Yoko Ono"])
    assert alias_match("YOKO ONO", ["yoko ono"])
    assert not alias_match(" Yoko", ["Yoko Ono"])
    assert not alias_match(" a b c", ["a", "Yoko Ono"])  # one-character aliases never count
    assert alias_match(" the Beatles' Ono", ["x", "Ono"])
    assert not alias_match("", ["Ono"])
