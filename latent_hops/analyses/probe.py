"""Linear probes: which layer's hidden state at t1 (t2) linearly encodes e2 (e3).

The logit lens only sees what is already aligned with the unembedding, and underestimates
early layers; a probe reads what is linearly there. Per layer, a ridge regression maps the
(standardised) hidden state at a position to the unembedding vector of the entity's first
token; the probe names the candidate (the first token of every entity of that role in the
probed cases) whose unembedding is nearest.

The split is by entity, so a probe cannot "resolve the first hop" by memorising
e1 -> e2 from the e1 token itself (which made a probe trained "on other queries" fire at
layer 0 on SmolLM2: 7 of 8 scored cases shared their city with training queries):

- **Grouped cross-validation by e1.** Cases are split into folds by e1; each fold is scored
  by a probe trained on the other folds, so no training case shares a scored case's e1.
- ``hold_out_target=True`` also drops every training case that shares a scored case's
  target entity (e2 for the bridge probes). Because the probe regresses onto unembedding
  vectors, it can still name an entity it never saw in training — where the model's states
  are aligned with its vocabulary (real LLMs); on the toy models, whose internal codes are
  not, such a probe reads nothing (measured), so it is an option, not the default.
- **A control probe** (same data, targets shuffled within the training folds) gives the
  accuracy reached without entity information. ``probe_layers`` counts a layer only where
  the probe beats its control by ``margin`` (10 points by default).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from latent_hops.analysis import (
    DECODED_MEASURES,
    Analysis,
    Context,
    Results,
    decoded_layers,
    option,
    register,
    runtime,
)
from latent_hops.backend import Model
from latent_hops.cases import Case, case_batches, prepare_cases
from latent_hops.errors import InputError
from latent_hops.patching import hidden_states_at
from latent_hops.tables import HIDDEN_LAYER, ID, POSITION, Column, TableSchema

TABLE = TableSchema(
    "probe.parquet",
    "a scored case x probed entity x position x hidden-state layer",
    (
        ID,
        Column("entity", "str", "e2 or e3: what the probe names"),
        POSITION,
        HIDDEN_LAYER,
        Column("fold", "int", "cross-validation fold that scored the case"),
        Column("candidates", "int", "entities the probe chooses among"),
        Column("predicted", "int", "token id it names"),
        Column("target", "int", "the entity's first token id (its label's first token)"),
        Column("token_match", "bool", "predicted == target: an exact token-id match"),
        Column("control_token_match", "bool", "the shuffled-target control's token_match"),
        Column("grouping", "str", "how folds were split"),
    ),
)
COLUMNS = TABLE.names
GROUPINGS = {
    False: "folds by e1: no training case shares the scored case's e1",
    True: "folds by e1; training also excludes cases sharing the scored case's target entity",
}
DEFAULT_MARGIN = 0.10


PROBE_TARGETS = (("e2", "t1"), ("e2", "t2"), ("e3", "t2"))  # (entity, position) of the CLI's probes


@dataclass(frozen=True)
class ProbeConfig:
    folds: int = 5
    ridge: float = 10.0  # L2 penalty of the regression on standardised states
    margin: float = option(
        DEFAULT_MARGIN,
        "a probe layer counts in the stage table where it beats its control by this margin",
        flag="--probe-margin",
    )
    hold_out_target: bool = option(
        False, "also keep the scored cases' target entities out of training"
    )
    seed: int = 0
    probe_train: int = option(
        2000, "queries beside the analysed cases that join the probes' training folds", minimum=0
    )
    batch_size: int = runtime(256)
    progress: bool = runtime(False)


@torch.no_grad()
def states_for(
    model: Model, cases: Sequence[Case], position: str, layers: Sequence[int], batch_size: int = 256
) -> Float[torch.Tensor, "case layer d_model"]:
    """Hidden states [case, layer, d_model] at ``position`` (float32, CPU)."""
    out = torch.empty(len(cases), len(layers), model.d_model)
    for b in case_batches(model, cases, batch_size, (position,)):
        states = hidden_states_at(model, b.tok.tokens, b.tok.attention_mask, b.columns, layers)
        out[b.index] = states[:, 0].float().cpu()
    return out


def _fold_of(name: str, folds: int, seed: int) -> int:
    return zlib.crc32(f"{seed}|{name}".encode()) % folds


def entity_folds(
    cases: Sequence[Case],
    entity: str,
    scored: set[str],
    folds: int = 5,
    seed: int = 0,
    hold_out_target: bool = False,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(fold, scored indices, training indices) of the split by entity (module docstring)."""
    e1 = np.array([c.names["e1"][0] for c in cases])
    target = np.array([c.names[entity][0] for c in cases])
    fold = np.array([_fold_of(name, folds, seed) for name in e1])
    is_scored = np.array([c.id in scored for c in cases])
    out = []
    for k in range(folds):
        test = np.flatnonzero((fold == k) & is_scored)
        if len(test):
            train = (fold != k) & ~np.isin(target, target[test]) if hold_out_target else fold != k
            out.append((k, test, np.flatnonzero(train)))
    return out


def _ridge(
    x: torch.Tensor, y: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardisation and ridge weights mapping x [n, d] to y [n, k]: (mean, std, W [d+1, k])."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1).double()
    penalty = ridge * torch.eye(z.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0  # no penalty on the intercept
    w = torch.linalg.solve(z.T @ z + penalty, z.T @ y.double())
    return mean, std, w.float()


def cross_validated_probe(
    model: Model,
    scored: Sequence[Case],
    pool: Sequence[Case] = (),
    entity: str = "e2",
    position: str = "t1",
    layers: Sequence[int] | None = None,
    config: ProbeConfig = ProbeConfig(),
) -> pd.DataFrame:
    """One row per scored case x layer: the entity the probe names, and the control's hit.

    ``pool`` adds training-only cases (never scored); both are split by the grouping of the
    module docstring. Cases without a known first token of ``entity`` are left out.
    """
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    ids = {c.id for c in scored}
    cases = [
        c for c in [*scored, *(c for c in pool if c.id not in ids)] if c.first_tokens.get(entity)
    ]
    if len(cases) < 2 * config.folds:
        raise InputError(
            f"too few cases with a known {entity} token to probe ({len(cases)}; need "
            f">= {2 * config.folds}): use more queries"
        )
    first = torch.tensor([c.first_tokens[entity][0] for c in cases])
    candidates = torch.unique(first)
    unembed = model.unembedding_vectors()  # the regression targets
    y, keys = unembed[first], unembed[candidates]
    x = states_for(model, cases, position, layers, config.batch_size)
    rng = np.random.default_rng(config.seed)
    rows: list[dict] = []
    grouping = GROUPINGS[config.hold_out_target]
    bar = tqdm(
        total=config.folds * len(layers),
        desc=f"probe {entity} at {position}",
        unit="fit",
        disable=not config.progress,
    )
    for k, test, train in entity_folds(
        cases, entity, ids, config.folds, config.seed, config.hold_out_target
    ):
        if len(train) < 2:
            raise InputError(
                f"fold {k} of the {entity} probe has no training cases left after the entity split"
            )
        shuffled = rng.permutation(train)
        for li, layer in enumerate(layers):
            bar.update()
            for control, targets in ((False, y[train]), (True, y[shuffled])):
                mean, std, w = _ridge(x[train, li], targets, config.ridge)
                z = torch.cat([(x[test, li] - mean) / std, torch.ones(len(test), 1)], 1)
                pred = candidates[((z @ w) @ keys.T).argmax(-1)]
                hit = pred == first[test]
                if control:
                    for row, h in zip(rows[-len(test) :], hit.tolist()):
                        row["control_token_match"] = bool(h)
                    continue
                rows += [
                    {
                        "id": cases[i].id,
                        "entity": entity,
                        "position": position,
                        "hidden_layer": layer,
                        "fold": k,
                        "candidates": len(candidates),
                        "predicted": int(p),
                        "target": int(first[i]),
                        "token_match": bool(h),
                        "control_token_match": False,
                        "grouping": grouping,
                    }
                    for i, p, h in zip(test, pred.tolist(), hit.tolist())
                ]
    bar.close()
    return pd.DataFrame(rows, columns=COLUMNS) if rows else TABLE.empty()


def probe_accuracy(probed: pd.DataFrame) -> pd.DataFrame:
    """Accuracy of the probe and of its control per entity x position x layer."""
    g = probed.groupby(["entity", "position", "hidden_layer"])
    return g.agg(
        cases=("id", "size"),
        accuracy=("token_match", "mean"),
        control=("control_token_match", "mean"),
        candidates=("candidates", "max"),
    ).reset_index()


def probe_layers(probed: pd.DataFrame, margin: float = DEFAULT_MARGIN) -> pd.DataFrame:
    """Per case: first-hop layer (probe names e2 at t1), e2 at t2, second-hop layer (e3 at t2).

    A layer counts only where its probe beats the shuffled-target control by ``margin`` on
    the probed cases: a probe no better than its control names the right entity now and
    then, which is no evidence for the case.
    """
    acc = probe_accuracy(probed)
    keys = ["entity", "position", "hidden_layer"]
    reliable = acc[acc.accuracy >= acc.control + margin][keys]
    hits = probed[probed.token_match].merge(reliable, on=keys)

    return (
        decoded_layers(hits, lambda rows, entity: rows.entity == entity, "hidden_layer")
        .set_index("id")
        .reindex(probed["id"].unique())
        .rename_axis("id")
        .reset_index()
    )


def _run(context: Context, config: ProbeConfig) -> pd.DataFrame:
    """The probes of PROBE_TARGETS: the analysed cases are scored; up to ``probe_train``
    other queries of the run join the training folds."""
    analysed = {c.id for c in context.cases}
    others = context.queries[~context.queries["id"].isin(analysed)].iloc[: config.probe_train]
    pool, _ = prepare_cases(context.model, others) if len(others) else ([], None)
    return pd.concat(
        [
            cross_validated_probe(context.model, context.cases, pool, e, p, config=config)
            for e, p in PROBE_TARGETS
        ],
        ignore_index=True,
    )


def _summary(results: Results[ProbeConfig]) -> str:
    probed = results.table
    table = probe_accuracy(probed).pivot_table(
        index="hidden_layer", columns=["entity", "position"], values=["accuracy", "control"]
    )
    return (
        f"probe accuracy vs shuffled-target control, % of {probed.id.nunique()} cases "
        f"({probed.grouping.iloc[0]}):\n" + (100 * table).round(0).astype(int).to_string()
    )


register(
    Analysis(
        name="probe",
        title="Linear probes",
        order=60,
        help="linear probes (e2 at t1/t2, e3 at t2), cross-validated by entity, with a "
        "shuffled-target control -> probe.parquet",
        config=ProbeConfig,
        schema=TABLE,
        run=_run,
        summary=_summary,
        report=lambda section: section.html_table(probe_accuracy(section.table)),
        stage_measures=DECODED_MEASURES,
        stage_layers=lambda table, config: probe_layers(table, config.margin).set_index("id"),
        note=lambda config: (
            "Linear probes (ridge regression onto the entity's unembedding vector, nearest "
            "candidate wins), cross-validated by entity: "
            f"{GROUPINGS[config.hold_out_target]}. Control: the same probe with shuffled "
            "targets. A layer counts for the stage table only where the probe beats its control "
            f"by {config.margin:.0%} (--probe-margin)."
        ),
    )
)
