"""latent_hops: mechanistic interpretability of latent multi-hop reasoning on TransformerLens.

Reproduces and extends *Hopping Too Late* (Biran et al., EMNLP 2024). Start with
``load_model("toy")`` and ``load_dataset("toy")``.

The names below are imported when first used, so ``import latent_hops`` (and importing any
of its modules) loads torch, TransformerLens and plotly only where they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from latent_hops._version import __version__

if TYPE_CHECKING:
    from latent_hops.analyses.backpatch import BackpatchConfig
    from latent_hops.backend import Backend, Model, hidden_state_hook
    from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
    from latent_hops.models import ModelLoadError, load_model
    from latent_hops.plots import save_png
    from latent_hops.positions import tokenize_prompts
    from latent_hops.queries import DatasetError, TwoHopQuery, load_dataset, save_dataset
    from latent_hops.query_builder import BuilderConfig, build_queries
    from latent_hops.quick import BackpatchResult, run_backpatch
    from latent_hops.run import NoCasesError, Run, Selection
    from latent_hops.rundir import read_table

_EXPORTS = {
    "Backend": "latent_hops.backend",
    "BackpatchConfig": "latent_hops.analyses.backpatch",
    "BackpatchResult": "latent_hops.quick",
    "DatasetError": "latent_hops.queries",
    "EvaluationConfig": "latent_hops.evaluation",
    "Model": "latent_hops.backend",
    "ModelLoadError": "latent_hops.models",
    "NoCasesError": "latent_hops.run",
    "Run": "latent_hops.run",
    "Selection": "latent_hops.run",
    "TwoHopQuery": "latent_hops.queries",
    "evaluate": "latent_hops.evaluation",
    "hidden_state_hook": "latent_hops.backend",
    "load_dataset": "latent_hops.queries",
    "load_model": "latent_hops.models",
    "read_table": "latent_hops.rundir",
    "run_backpatch": "latent_hops.quick",
    "save_png": "latent_hops.plots",
    "build_queries": "latent_hops.query_builder",
    "BuilderConfig": "latent_hops.query_builder",
    "save_dataset": "latent_hops.queries",
    "summarize": "latent_hops.evaluation",
    "tokenize_prompts": "latent_hops.positions",
}
__all__ = [
    "__version__",
    "Backend",
    "BackpatchConfig",
    "BackpatchResult",
    "BuilderConfig",
    "DatasetError",
    "EvaluationConfig",
    "Model",
    "ModelLoadError",
    "NoCasesError",
    "Run",
    "Selection",
    "TwoHopQuery",
    "build_queries",
    "evaluate",
    "hidden_state_hook",
    "load_dataset",
    "load_model",
    "read_table",
    "run_backpatch",
    "save_dataset",
    "save_png",
    "summarize",
    "tokenize_prompts",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'latent_hops' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
