"""latent_hops: mechanistic interpretability of latent multi-hop reasoning on TransformerLens.

Reproduces and extends *Hopping Too Late* (Biran et al., EMNLP 2024). Start with
``load_model("toy")`` and ``load_dataset("toy")``.
"""

from latent_hops.backend import hidden_state_hook
from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
from latent_hops.models import ModelLoadError, load_model
from latent_hops.positions import tokenize_prompts
from latent_hops.queries import DatasetError, TwoHopQuery, load_dataset, save_dataset
from latent_hops.quick import BackpatchResult, run_backpatch

__version__ = "0.1.0"
__all__ = [
    "BackpatchResult",
    "DatasetError",
    "EvaluationConfig",
    "ModelLoadError",
    "TwoHopQuery",
    "evaluate",
    "hidden_state_hook",
    "load_dataset",
    "load_model",
    "run_backpatch",
    "save_dataset",
    "summarize",
    "tokenize_prompts",
]
