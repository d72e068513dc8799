"""Everything that depends on TransformerLens lives here, and only here.

``Backend`` (``base.py``) is the contract every analysis relies on: reads at sites, edits,
greedy generation, resuming a prompt pass from a layer, and what a model can do
(``Capabilities``). Two implementations ship, chosen by ``load_model(backend=)``:

- ``hooked`` (``hooked.py``): TL 3.x ``HookedTransformer``, weights converted by TL;
- ``bridge`` (``bridge.py``): TL 4's ``TransformerBridge`` around the HF model (also in TL 3.9).

What both share (hook names, reads and edits through hook points) is in ``tl.py``;
``decoding.py`` is the greedy loop, ``architectures.py`` maps HF configs to TL configs.
"""

from __future__ import annotations

from typing import TypeAlias

from latent_hops.backend.architectures import DEFAULT_MAX_CONTEXT, UnsupportedArchitecture
from latent_hops.backend.base import (
    EMBEDDINGS,
    SITE_KINDS,
    Backend,
    Capabilities,
    Edit,
    PromptWalk,
    ResumedRows,
    Site,
    free_memory_mb,
    tokenizer_adds_bos,
)
from latent_hops.backend.bridge import BridgeBackend
from latent_hops.backend.decoding import Decoding, GreedyOutput, Sampler
from latent_hops.backend.hooked import HookedBackend
from latent_hops.backend.tl import hidden_state_hook, hook_name
from latent_hops.errors import InputError

Model: TypeAlias = Backend
"""What ``load_model`` returns and every analysis receives (a ``Backend``)."""

BACKENDS: dict[str, type[HookedBackend] | type[BridgeBackend]] = {
    "hooked": HookedBackend,
    "bridge": BridgeBackend,
}
"""The backends by name."""

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_CONTEXT",
    "EMBEDDINGS",
    "SITE_KINDS",
    "Backend",
    "BridgeBackend",
    "Capabilities",
    "Edit",
    "GreedyOutput",
    "HookedBackend",
    "Model",
    "PromptWalk",
    "ResumedRows",
    "Sampler",
    "Decoding",
    "Site",
    "UnsupportedArchitecture",
    "free_memory_mb",
    "hidden_state_hook",
    "hook_name",
    "resolve_backend",
    "tokenizer_adds_bos",
    "transformer_lens_version",
]


def transformer_lens_version() -> str:
    from importlib.metadata import version

    return version("transformer_lens")


def hooked_available() -> bool:
    """Whether this TransformerLens has ``HookedTransformer`` (3.x; TL 4 removed it)."""
    return int(transformer_lens_version().split(".")[0]) < 4


def resolve_backend(name: str) -> str:
    """``"auto"`` -> ``"hooked"`` on TransformerLens 3.x, ``"bridge"`` on 4.x; a name is
    checked against what the installed TransformerLens offers."""
    if name not in ("auto", *BACKENDS):
        raise InputError(f"unknown backend {name!r}; use auto, {', '.join(BACKENDS)}", code="model")
    if name == "auto":
        return "hooked" if hooked_available() else "bridge"
    if name == "hooked" and not hooked_available():
        raise InputError(
            f"the hooked backend needs TransformerLens 3.x (HookedTransformer); this is "
            f"TransformerLens {transformer_lens_version()}: use backend='bridge' (or 'auto')",
            code="model",
        )
    return name
