"""Shared fixtures: the shipped toy model, and tiny random Llama / GPT-2 checkpoints whose
tokenizers are trained inside the tests (no downloads).

``make test`` runs the suite on two pytest-xdist workers (one per core): each computes with
one torch thread (and so do the processes the tests start), and both share one
converted-model cache (GGUF conversions take a lock, so a model is converted once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from latent_hops import load_model


def load_script(name: str):
    """``scripts/<name>.py`` as a module (scripts are not a package), registered in
    ``sys.modules`` so its dataclasses resolve."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:  # two workers on two cores: one thread each, for torch and for the processes started
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

NAMES = ["Imagine", "John Lennon", "Yoko Ono", "Paris", "Saint-Étienne", "Ouagadougou", "Kavo", "Lennon"]
CORPUS = [
    "the spouse of the performer of Imagine is Yoko Ono",
    "the performer of Imagine is John Lennon",
    "the capital of the country of Paris is Paris",
    "the mayor of Saint-Étienne is someone from Ouagadougou",
    "the author of the book of Kavo is Lennon",
] * 20
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def bpe_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained here: "gpt2" (byte-level, leading-space tokens) or
    "sentencepiece" (Llama-2-style: a normaliser turns spaces into "▁" and prepends one;
    no pre-tokeniser, so merges may even cross words, a harder case for offsets)."""
    tok = Tokenizer(models.BPE(unk_token=None if style == "gpt2" else "<unk>"))
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIALS.values()), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIALS)


def save_tiny(kind: str, path: Path, style: str = "gpt2", **overrides) -> Path:
    """A random tiny Llama or GPT-2 checkpoint directory with a trained tokenizer."""
    tokenizer = bpe_tokenizer(style)
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=overrides.pop("kv_heads", 4),
                          max_position_embeddings=128, initializer_range=0.2, **ids, **overrides)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=128,
                         initializer_range=0.2, **ids, **overrides)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One converted-model cache per test run (GGUF models are dequantized once, shared by the
    tests and the notebooks' kernels), never the user's own cache."""
    from latent_hops.gguf import CACHE_ENV

    base = tmp_path_factory.getbasetemp()
    path = (base.parent if WORKER else base) / "latent-hops-cache"  # one for all workers
    path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def toy():
    return load_model("toy", device="cpu")


@pytest.fixture(scope="session")
def toy_gpt2():
    return load_model("toy-gpt2", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), style="sentencepiece")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), style="gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    return load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    return load_model(tiny_gpt2_dir, device="cpu")
