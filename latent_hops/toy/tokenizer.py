"""The toy model's word-level tokenizer: one token per entity name and per relation phrase.

Relation phrases ("the spouse of") are single tokens, so prompts read as English ("the
spouse of the performer of Voliba is") while the model sees the compact sequence that trains
fastest (see the model card). It is a standard Hugging Face fast tokenizer, with character
offsets, so every loader (transformers, TransformerLens, nnsight) can use it.
"""

from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from latent_hops.toy.knowledge_graph import KnowledgeGraph, relation_template

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
PUNCTUATION = ("is", ":", ",", "x")  # "x" is the Patchscopes placeholder


def toy_vocabulary(kg: KnowledgeGraph) -> list[str]:
    """Token strings in id order: specials, punctuation, relation phrases, entities."""
    phrases = [relation_template(r).format("").strip() for r in kg.relations]
    return list(SPECIAL_TOKENS.values()) + list(PUNCTUATION) + phrases + list(kg.entities)


def bos_post_processor(bos_id: int) -> processors.TemplateProcessing:
    """Prepend BOS to every encoding: the toy models were trained with it, so the shipped
    tokenizer adds it itself and plain transformers users get the model's own inputs."""
    bos = SPECIAL_TOKENS["bos_token"]
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
    )


def build_toy_tokenizer(kg: KnowledgeGraph) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose pieces are the relation phrases and whitespace-separated words."""
    vocab = {tok: i for i, tok in enumerate(toy_vocabulary(kg))}
    phrases = sorted((t for t in vocab if " " in t), key=len, reverse=True)
    pattern = "|".join([re.escape(p) for p in phrases] + [r"\S+"])
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    core.post_processor = bos_post_processor(vocab[SPECIAL_TOKENS["bos_token"]])
    return PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", **SPECIAL_TOKENS)
