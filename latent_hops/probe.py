"""Linear probes: which layer's hidden state at t1 (t2) linearly encodes e2 (e3).

The logit lens only sees what is already aligned with the unembedding, and underestimates
early layers; a probe reads what is linearly there. One multinomial logistic regression
per layer maps the hidden state at a position to the entity's first token, trained on one
set of cases (labels are the dataset's entities, not the model's answers) and applied to
another. Per case: the min layer whose probe names the entity (``probe_layers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from latent_hops.cases import Case
from latent_hops.generation import length_batches
from latent_hops.patching import hidden_states_at
from latent_hops.positions import tokenize_prompts

COLUMNS = ["id", "entity", "position", "layer", "predicted", "target", "correct"]


@dataclass
class LayerProbes:
    """One linear classifier per layer, over the classes seen in training."""

    entity: str
    position: str
    layers: list[int]
    classes: torch.Tensor  # [n_classes] token ids
    mean: torch.Tensor  # [layers, d]
    std: torch.Tensor  # [layers, d]
    weight: torch.Tensor  # [layers, d, n_classes]
    bias: torch.Tensor  # [layers, n_classes]


@torch.no_grad()
def states_for(model: HookedTransformer, cases: Sequence[Case], position: str, layers: Sequence[int],
               batch_size: int = 256) -> torch.Tensor:
    """Hidden states [case, layer, d_model] at ``position`` (float32, CPU)."""
    out = torch.empty(len(cases), len(layers), model.cfg.d_model)
    for idx in length_batches([len(c.prompt) for c in cases], batch_size):
        batch = [cases[i] for i in idx]
        tok = tokenize_prompts(model, [c.prompt for c in batch])
        cols = torch.tensor([[n + c.positions[position]] for c, n in zip(batch, tok.n_pad)])
        out[idx] = hidden_states_at(model, tok.tokens, tok.attention_mask, cols, layers)[:, 0].float().cpu()
    return out


def _labels(cases: Sequence[Case], entity: str) -> torch.Tensor:
    return torch.tensor([c.first_tokens[entity][0] if c.first_tokens[entity] else -1 for c in cases])


def fit_probes(model: HookedTransformer, cases: Sequence[Case], entity: str = "e2", position: str = "t1",
               layers: Sequence[int] | None = None, l2: float = 1e-3, steps: int = 300, seed: int = 0) -> LayerProbes:
    """Fit one probe per layer on ``cases`` (full-batch L-BFGS, L2-regularised)."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    labels = _labels(cases, entity)
    keep = labels >= 0
    if keep.sum() < 2:
        raise ValueError(f"need at least 2 cases with a known {entity} token to fit a probe")
    x = states_for(model, [c for c, k in zip(cases, keep) if k], position, layers)
    classes, y = torch.unique(labels[keep], return_inverse=True)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(seed)
    weights, biases = [], []
    for li in range(len(layers)):
        w = torch.zeros(x.shape[-1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[:, li] @ w + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        weights.append(w.detach())
        biases.append(b.detach())
    return LayerProbes(entity, position, layers, classes, mean, std, torch.stack(weights), torch.stack(biases))


def apply_probes(model: HookedTransformer, probes: LayerProbes, cases: Sequence[Case]) -> pd.DataFrame:
    """One row per case x layer: the probe's predicted token, the true one, and whether they match."""
    x = (states_for(model, cases, probes.position, probes.layers) - probes.mean) / probes.std
    logits = torch.einsum("nld,ldc->nlc", x, probes.weight) + probes.bias
    predicted = probes.classes[logits.argmax(-1)]
    target = _labels(cases, probes.entity)
    rows = [(c.id, probes.entity, probes.position, layer, int(predicted[i, li]), int(target[i]),
             bool(predicted[i, li] == target[i]))
            for i, c in enumerate(cases) for li, layer in enumerate(probes.layers)]
    return pd.DataFrame(rows, columns=COLUMNS)


def probe_layers(probed: pd.DataFrame, min_accuracy: float = 0.25) -> pd.DataFrame:
    """Per case: first-hop layer (probe names e2 at t1), e2 at t2, second-hop layer (e3 at t2).

    A layer counts only where its probe is right on at least ``min_accuracy`` of the
    probed cases: a probe at chance level names the right entity now and then, which is
    no evidence for the case.
    """
    accuracy = probed.groupby(["entity", "position", "layer"])["correct"].transform("mean")
    reliable = probed[accuracy >= min_accuracy]

    def first(entity: str, position: str, name: str) -> pd.Series:
        hit = reliable[(reliable.entity == entity) & (reliable.position == position) & reliable.correct]
        return hit.groupby("id")["layer"].min().rename(name)

    out = pd.concat([first("e2", "t1", "first_hop_layer"), first("e2", "t2", "e2_at_t2_layer"),
                     first("e3", "t2", "second_hop_layer")], axis=1)
    return out.reindex(probed["id"].unique()).rename_axis("id").reset_index()
