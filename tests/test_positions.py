"""t1 / t2 from character offsets: BOS or not, byte-level BPE, SentencePiece, word-level,
multi-token entities, names that occur twice, left padding."""

import pytest

from latent_hops.positions import resolve_positions, tokenize_prompts
from latent_hops.queries import TwoHopQuery, e1_span_in_composition

QUERIES = [
    TwoHopQuery(id="lennon", e1_label="John Lennon", e2_label="Yoko Ono", e3_label="Paris",
                r1_template="the spouse of {}", r2_template="the capital of {}"),
    TwoHopQuery(id="twice", e1_label="Paris", e2_label="France", e3_label="Paris",
                r1_template="the country of {}", r2_template="the Paris office of {}"),
    TwoHopQuery(id="accent", e1_label="Saint-Étienne", e2_label="France", e3_label="Ouagadougou",
                r1_template="the mayor of {}", r2_template="the birthplace of {}"),
]


def reference_t1(model, prompt: str, end: int, bos: bool) -> int:
    """Independent reference: the first token prefix whose decoded text covers e1's end."""
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for k in range(len(ids)):
        if len(model.tokenizer.decode(ids[: k + 1]).lstrip()) >= end - (len(prompt) - len(prompt.lstrip())):
            return k + int(bos)
    raise AssertionError("entity end never reached")


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("bos", [True, False])
def test_t1_matches_decoding_reference(request, name, bos):
    model = request.getfixturevalue(name)
    for q in QUERIES:
        prompt, span = q.composition_prompt(), e1_span_in_composition(q)
        tok = tokenize_prompts(model, [prompt], prepend_bos=bos)
        assert tok.char_span_position(0, span) == reference_t1(model, prompt, span[1], bos), (name, q.id)
        assert tok.last_position() == [tok.tokens.shape[1] - 1]


def test_name_occurring_twice_maps_to_its_own_mention(tiny_gpt2):
    q = QUERIES[1]
    prompt, (start, end) = q.composition_prompt(), e1_span_in_composition(q)
    assert prompt == "the Paris office of the country of Paris is" and start == prompt.rindex("Paris")
    tok = tokenize_prompts(tiny_gpt2, [prompt])
    t1 = tok.char_span_position(0, (start, end))
    assert tiny_gpt2.tokenizer.decode(tok.tokens[0, : t1 + 1]).endswith("of Paris")


def test_left_padding_keeps_positions(tiny_llama):
    prompts = [q.composition_prompt() for q in QUERIES]
    batch = tokenize_prompts(tiny_llama, prompts)
    for i, q in enumerate(QUERIES):
        alone = tokenize_prompts(tiny_llama, [prompts[i]])
        span = e1_span_in_composition(q)
        t1_batch, t1_alone = batch.char_span_position(i, span), alone.char_span_position(0, span)
        assert t1_batch - batch.n_pad[i] == t1_alone
        assert batch.tokens[i, t1_batch] == alone.tokens[0, t1_alone]
        assert batch.tokens[i, -1] == alone.tokens[0, -1]  # t2: the last column
        assert batch.attention_mask[i, : batch.n_pad[i]].sum() == 0


def test_right_padding_positions(tiny_gpt2):
    prompts = [q.composition_prompt() for q in QUERIES]
    left, right = tokenize_prompts(tiny_gpt2, prompts), tokenize_prompts(tiny_gpt2, prompts, padding_side="right")
    for i, q in enumerate(QUERIES):
        span = e1_span_in_composition(q)
        assert right.tokens[i, right.char_span_position(i, span)] == left.tokens[i, left.char_span_position(i, span)]
        t2 = right.last_position()[i]
        assert right.tokens[i, t2] == left.tokens[i, -1] and right.attention_mask[i, t2 + 1 :].sum() == 0


def test_tokenization_equals_transformer_lens(tiny_gpt2, tiny_llama, toy):
    for model in (tiny_gpt2, tiny_llama, toy):
        prompt = "the spouse of the performer of Kavo is"
        assert tokenize_prompts(model, [prompt]).tokens.tolist() == model.tl.to_tokens(prompt).tolist()


def test_toy_word_level_positions(toy):
    from latent_hops.queries import iter_queries, load_dataset

    q = iter_queries(load_dataset("toy").iloc[:3])
    pos = resolve_positions(toy, q)
    # <s> r2 r1 e1 is: t1 is the entity token, t2 the "is" token
    assert pos["t1"].tolist() == [3, 3, 3] and pos["t2"].tolist() == [4, 4, 4]
    assert pos["skip_reason"].isna().all()


def test_unresolvable_position_is_recorded_not_raised(toy):
    bad = TwoHopQuery(id="x", e1_label="Nowhere", e2_label="b", e3_label="c", r1_template="the author of {}",
                      r2_template="the spouse of {}", source_prompt="the spouse of the author of Kavo is")
    pos = resolve_positions(toy, [bad])
    assert pos["t1"].isna().all() and "does not occur" in pos.loc[0, "skip_reason"]
