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

from latent_hops import gguf
from latent_hops.backend import (
    BACKENDS,
    DEFAULT_MAX_CONTEXT,
    Backend,
    UnsupportedArchitecture,
    resolve_backend,
)
from latent_hops.errors import InputError

TOY_SPEC = "toy"
# spec -> folder in latent_hops/toy
TOY_CHECKPOINTS = {"toy": "checkpoint", "toy-gpt2": "checkpoint-gpt2"}


class ModelLoadError(InputError):
    """A model spec that cannot be loaded, with the reason in words."""

    code = "model"


def toy_checkpoint_dir(spec: str = TOY_SPEC) -> Path:
    """Directory of a shipped toy model's Hugging Face checkpoint inside the installed package."""
    return Path(str(resources.files("latent_hops.toy") / TOY_CHECKPOINTS[spec]))


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    named = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in named:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(named)}")
    return named[dtype]


def _resolve_device(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {str(device)!r} requested but CUDA is not available on this machine"
        )
    if (
        parsed.type == "cuda"
        and parsed.index is not None
        and parsed.index >= torch.cuda.device_count()
    ):
        raise ModelLoadError(
            f"device {str(device)!r} requested but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' requested but MPS is not available on this machine")
    return str(parsed)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec and not spec.count("/") == 1


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _tokenizer_hint(err: Exception) -> str:
    text = str(err)
    for package in ("sentencepiece", "tiktoken", "protobuf"):
        if package in text.lower():
            return f"{_first_line(err)} -- this tokenizer may need `pip install {package}`"
    return _first_line(err)


def load_local_checkpoint(
    path: Path,
    dtype: torch.dtype,
    device: str,
    spec: str,
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    n_devices: int = 1,
    backend_name: str = "hooked",
) -> Backend:
    """A Hugging Face checkpoint directory, as a model of ``backend_name``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        arch = (json.loads(config_file.read_text()).get("architectures") or ["<none>"])[0]
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON: {err}") from None
    kind = BACKENDS[backend_name]
    supported = kind.supported_architectures()
    if arch not in supported:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported by the {backend_name} backend; "
            f"supported: {', '.join(supported)}"
        )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar is noise for small local checkpoints
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 -- transformers raises many types here
            raise ModelLoadError(
                f"{path}: could not load the tokenizer: {_tokenizer_hint(err)}"
            ) from None
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as err:  # noqa: BLE001 -- safetensors' own error type, OSError, ValueError, ...
            raise ModelLoadError(
                f"{path}: could not read the weights ({_first_line(err)}); the files may be "
                "truncated or corrupt: download the checkpoint again"
            ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    try:
        return kind.from_hf(hf_model, tokenizer, dtype, device, spec, max_context, n_devices)
    except UnsupportedArchitecture as err:
        raise ModelLoadError(f"{path}: {err}") from None
    except (ValueError, NotImplementedError) as err:  # the bridge has no adapter for it
        if backend_name != "bridge":
            raise
        raise ModelLoadError(
            f"{path}: the bridge backend cannot wrap it ({_first_line(err)})"
        ) from None


def load_model(
    spec: str | os.PathLike = TOY_SPEC,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    n_devices: int = 1,
    backend: str = "auto",
) -> Backend:
    """Load a model ready for analysis: a ``Backend`` handle holding a TransformerLens
    ``HookedTransformer`` (backend ``"hooked"``, TL 3.x) or ``TransformerBridge``
    (``"bridge"``, TL 4; also in TL 3.9) as ``.tl``, its tokenizer, the spec and what it can
    do (``.capabilities``).

    Args:
        spec: ``"toy"``, ``"toy-gpt2"``, ``"smollm2-135m"``, a ``.gguf`` file, a local HF
            checkpoint directory, or a TransformerLens name.
        device: defaults to CUDA when available, else CPU.
        dtype: torch dtype or its name ("float32", "bfloat16", ...); default float32 as in
            the paper.
        max_context: cap on the context length TransformerLens allocates for (its causal
            mask is n_ctx x n_ctx per layer); None keeps the model's own.
        n_devices: split the blocks over ``cuda:0 .. cuda:n_devices-1`` (TransformerLens'
            ``n_devices``) for models too big for one GPU (hooked backend only).
        backend: ``"auto"`` (hooked on TransformerLens 3.x, bridge on 4.x), ``"hooked"`` or
            ``"bridge"``. Both give the same results (tests check it); see the README.
    """
    try:
        name = resolve_backend(backend)
    except InputError as err:
        raise ModelLoadError(str(err)) from None
    return _load(
        str(spec), _resolve_dtype(dtype), _resolve_device(device), max_context, n_devices, name
    )


def _load(
    spec: str,
    dtype_: torch.dtype,
    device_: str,
    max_context: int | None,
    n_devices: int,
    backend_name: str,
) -> Backend:
    if (
        n_devices < 1
        or n_devices > 1
        and not (device_.startswith("cuda") and torch.cuda.device_count() >= n_devices)
    ):
        raise ModelLoadError(
            f"n_devices={n_devices} needs that many CUDA devices; "
            f"this machine has {torch.cuda.device_count()}"
        )
    spec = str(spec)
    if spec in TOY_CHECKPOINTS:
        return load_local_checkpoint(
            toy_checkpoint_dir(spec), dtype_, device_, spec, max_context, n_devices, backend_name
        )
    path = Path(spec).expanduser()
    if spec in gguf.PACKAGED_MODELS or path.suffix == ".gguf":
        try:
            gguf_file = gguf.packaged_gguf(spec) if spec in gguf.PACKAGED_MODELS else path
            return load_local_checkpoint(
                gguf.converted_checkpoint(gguf_file),
                dtype_,
                device_,
                spec,
                max_context,
                n_devices,
                backend_name,
            )
        except gguf.GGUFError as err:
            raise ModelLoadError(str(err)) from None
    if path.is_dir():
        return load_local_checkpoint(
            path, dtype_, device_, spec, max_context, n_devices, backend_name
        )
    if path.exists() or _looks_like_path(spec):
        raise ModelLoadError(f"{spec!r} is not a checkpoint directory (no such directory)")
    names = BACKENDS[backend_name].known_names()
    if names is not None and spec.lower() not in {n.lower() for n in names}:
        raise ModelLoadError(
            f"{spec!r} is neither a shipped model "
            f"({', '.join([*TOY_CHECKPOINTS, *gguf.PACKAGED_MODELS])}), "
            "a .gguf file, a local checkpoint directory, nor a TransformerLens model name "
            f"(e.g. 'gpt2', 'meta-llama/Llama-2-7b-hf'; {len(names)} names are known)"
        )
    try:
        return BACKENDS[backend_name].from_pretrained(spec, dtype_, device_, spec, n_devices)
    except OSError as err:  # transformers raises OSError when the hub cannot be reached
        raise ModelLoadError(
            f"could not download {spec!r} from the Hugging Face hub ({err.__class__.__name__}); "
            "offline machines need a local checkpoint directory instead (and HF_HUB_OFFLINE=1 "
            "fails at once, without the hub client's retries)"
        ) from None
