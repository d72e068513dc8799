"""Hop evaluation: which queries a model answers, hop by hop, and the analysed subsets.

For each query the five prompts (first hop, second hop, composition, entity shortcut,
relation shortcut) are decoded greedily and scored with the paper's alias rule. A query is
``correct`` / ``incorrect`` (by its composition answer) when both single hops are known
and neither shortcut yields e3; otherwise it is ``excluded`` with the reason. Positions t1
and t2 of the composition prompt are resolved here too; a query whose t1 cannot be found is
``excluded`` with that reason, never given a wrong position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from latent_hops.backend import Model
from latent_hops.config import option, runtime
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, generate, is_correct
from latent_hops.positions import context_problems, tokenize_prompts
from latent_hops.queries import PROMPT_KINDS, PROMPT_SUFFIX, e1_span_in_composition, iter_queries
from latent_hops.rundir import Column, check_columns

TARGET_ENTITY = {
    "first_hop": "e2",
    "second_hop": "e3",
    "composition": "e3",
    "entity_shortcut": "e3",
    "relation_shortcut": "e3",
}
SUBSETS = ("correct", "incorrect", "excluded")

COLUMNS = (
    Column("id", "query id"),
    Column("split", "the dataset's split (toy: train, test_id, test_ood)"),
    *(
        column
        for kind in PROMPT_KINDS
        for column in (
            Column(
                f"{kind}_generation", f"greedy generation for the {kind.replace('_', ' ')} prompt"
            ),
            Column(
                f"{kind}_correct",
                f"an alias of {TARGET_ENTITY[kind]} is in that generation (case-insensitive)",
            ),
        )
    ),
    Column(
        "t1", "token index of e1's last token in the composition prompt (unpadded; null if none)"
    ),
    Column("t2", "token index of the composition prompt's last token (unpadded)"),
    Column("position_error", "why t1/t2 could not be resolved ('' when resolved)"),
    Column("subset", "correct / incorrect (by the composition answer) / excluded"),
    Column("exclusion_reason", "why an excluded query is excluded ('' otherwise)"),
)
"""evaluation.parquet: one row per query."""


@dataclass(frozen=True)
class EvaluationConfig:
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt")
    batch_size: int = runtime(128)
    suffix: str = PROMPT_SUFFIX
    progress: bool = runtime(False)


def resolve_positions(model: Model, queries, suffix: str = PROMPT_SUFFIX) -> pd.DataFrame:
    """t1 and t2 of each composition prompt as unpadded token indices, or a skip reason.

    Columns: ``id``, ``t1``, ``t2`` (nullable ints), ``position_error`` ("" when resolved).
    """
    rows = []
    for q in queries:
        span = e1_span_in_composition(q, suffix)
        prompt = q.composition_prompt(suffix)
        tok = tokenize_prompts(model, [prompt])
        t1 = tok.char_span_position(0, span) if isinstance(span, tuple) else None
        error = (
            span
            if isinstance(span, str)
            else (
                "" if t1 is not None else f"no token overlaps e1's characters {span} in {prompt!r}"
            )
        )
        n = tok.tokens.shape[1]
        rows.append({"id": q.id, "t1": t1, "t2": n - 1, "position_error": error})
    out = pd.DataFrame(rows)
    out["t1"] = out["t1"].astype("Int64")
    return out


def _subset(row: dict) -> tuple[str, str]:
    if row["position_error"]:
        return "excluded", row["position_error"]
    reasons = [
        msg
        for flag, msg in (
            (row["first_hop_correct"], "first hop unknown"),
            (row["second_hop_correct"], "second hop unknown"),
        )
        if not flag
    ]
    reasons += [
        f"{k.replace('_', ' ')} gives e3"
        for k in ("entity_shortcut", "relation_shortcut")
        if row[f"{k}_correct"]
    ]
    if reasons:
        return "excluded", "; ".join(reasons)
    return ("correct" if row["composition_correct"] else "incorrect"), ""


def evaluate(
    model: Model, table: pd.DataFrame, config: EvaluationConfig = EvaluationConfig()
) -> pd.DataFrame:
    """One row per query: generations, correctness flags, subset, t1/t2.

    Identical prompts across queries (a shared first hop, say) are generated once.
    """
    if len(table) == 0:
        raise InputError("cannot evaluate an empty dataset")
    queries = iter_queries(table)
    prompts = [
        q.prompts(config.suffix) | {"composition": q.composition_prompt(config.suffix)}
        for q in queries
    ]
    unique = list(dict.fromkeys(p[k] for p in prompts for k in PROMPT_KINDS))
    problems = dict(zip(unique, context_problems(model, unique, config.max_new_tokens)))
    fits = [p for p in unique if problems[p] is None]  # one over-long prompt must not sink the rest
    bar = tqdm(total=len(fits), desc="evaluate", unit="prompt", disable=not config.progress)
    texts = (
        dict(zip(fits, generate(model, fits, config.max_new_tokens, config.batch_size, bar)))
        if fits
        else {}
    )
    bar.close()
    rows = []
    for q, p in zip(queries, prompts):
        row: dict = {"id": q.id, "split": q.split}
        for kind in PROMPT_KINDS:
            text = texts.get(p[kind], "")
            row[f"{kind}_generation"] = text
            row[f"{kind}_correct"] = is_correct(text, q.names(TARGET_ENTITY[kind]))
        rows.append(row)
    out = pd.DataFrame(rows).merge(
        resolve_positions(model, queries, config.suffix), on="id", how="left"
    )
    out["subset"], out["exclusion_reason"] = zip(*(_subset(r) for r in out.to_dict("records")))
    too_long = [
        next(
            (f"{k.replace('_', ' ')}: {problems[p[k]]}" for k in PROMPT_KINDS if problems[p[k]]), ""
        )
        for p in prompts
    ]
    long_rows = [bool(reason) for reason in too_long]
    out.loc[long_rows, "subset"] = "excluded"
    out.loc[long_rows, "exclusion_reason"] = [r for r in too_long if r]
    check_columns(out, COLUMNS, "evaluate")
    return out


def summarize(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per split of each prompt kind, and subset sizes (a small table to print)."""
    flags = [f"{k}_correct" for k in PROMPT_KINDS]
    acc = (
        evaluation.groupby("split")[flags]
        .mean()
        .rename(columns=lambda c: c.removesuffix("_correct"))
    )
    sizes = evaluation.groupby(["split", "subset"]).size().unstack(fill_value=0)
    for s in SUBSETS:
        if s not in sizes:
            sizes[s] = 0
    out = acc.join(sizes[list(SUBSETS)])
    out.insert(0, "queries", evaluation.groupby("split").size())
    return out


def rebalance(
    evaluation: pd.DataFrame, table: pd.DataFrame, max_per_type: int = 100, seed: int = 0
) -> pd.DataFrame:
    """Cap the analysed cases at ``max_per_type`` per bridge (e2) type within each subset."""
    merged = evaluation.merge(table[["id", "e2_type"]], on="id", how="left")
    rng = np.random.default_rng(seed)
    merged["_key"] = rng.random(len(merged))
    kept = merged.sort_values("_key").groupby(["subset", "e2_type"], sort=False).head(max_per_type)
    return kept.sort_index().drop(columns=["_key", "e2_type"])
