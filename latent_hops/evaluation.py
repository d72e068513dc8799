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
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, alias_match, generate
from latent_hops.positions import context_problems, resolve_positions
from latent_hops.queries import PROMPT_KINDS, PROMPT_SUFFIX, iter_queries
from latent_hops.tables import (
    ALIAS_MATCH,
    GENERATION,
    ID,
    SKIP_REASON,
    SPLIT,
    SUBSET,
    Column,
    TableSchema,
    register_schema,
)

TARGET_ENTITY = {
    "first_hop": "e2",
    "second_hop": "e3",
    "composition": "e3",
    "entity_shortcut": "e3",
    "relation_shortcut": "e3",
}
SUBSETS = ("correct", "incorrect", "excluded")

EVALUATION = register_schema(
    TableSchema(
        "evaluation.parquet",
        "a query: its five prompts' generations, its positions and its subset",
        (
            ID,
            SPLIT,
            *(
                column
                for kind in PROMPT_KINDS
                for column in (
                    GENERATION.described(
                        f"greedy generation for the {kind.replace('_', ' ')} prompt (null: the "
                        "prompt is too long for the model)"
                    ).renamed(f"{kind}_generation"),
                    ALIAS_MATCH.described(
                        f"an alias of {TARGET_ENTITY[kind]} is in that generation "
                        "(case-insensitive; null: not generated)"
                    ).renamed(f"{kind}_alias_match"),
                )
            ),
            Column(
                "t1",
                "Int64",
                "token index of e1's last token in the composition prompt (unpadded; null: "
                "e1 not found)",
            ),
            Column("t2", "Int64", "token index of the composition prompt's last token (unpadded)"),
            SUBSET,
            SKIP_REASON.described(
                "why the query is excluded from the analyses (null when correct or incorrect)"
            ),
        ),
    )
)
"""evaluation.parquet: one row per query."""


@dataclass(frozen=True)
class EvaluationConfig:
    max_new_tokens: int = option(
        DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt", minimum=1
    )
    batch_size: int = runtime(128)
    suffix: str = PROMPT_SUFFIX
    progress: bool = runtime(False)


def _subset(row: dict, too_long: str) -> tuple[str, str | None]:
    """(subset, why it is excluded): a prompt too long to run, t1 not found, a single hop
    not known, a shortcut that gives e3 -- else correct / incorrect by the composition."""
    if too_long:
        return "excluded", too_long
    if not pd.isna(row["skip_reason"]):
        return "excluded", row["skip_reason"]
    reasons = [
        msg
        for flag, msg in (
            (row["first_hop_alias_match"], "first hop unknown"),
            (row["second_hop_alias_match"], "second hop unknown"),
        )
        if not flag
    ]
    reasons += [
        f"{k.replace('_', ' ')} gives e3"
        for k in ("entity_shortcut", "relation_shortcut")
        if row[f"{k}_alias_match"]
    ]
    if reasons:
        return "excluded", "; ".join(reasons)
    return ("correct" if row["composition_alias_match"] else "incorrect"), None


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
            text = texts.get(p[kind])
            row[f"{kind}_generation"] = text
            matched = None if text is None else alias_match(text, q.names(TARGET_ENTITY[kind]))
            row[f"{kind}_alias_match"] = matched
        rows.append(row)
    out = pd.DataFrame(rows)
    for kind in PROMPT_KINDS:
        out[f"{kind}_alias_match"] = out[f"{kind}_alias_match"].astype("boolean")
    out = out.merge(resolve_positions(model, queries, config.suffix), on="id", how="left")
    too_long = [
        next(
            (f"{k.replace('_', ' ')}: {problems[p[k]]}" for k in PROMPT_KINDS if problems[p[k]]), ""
        )
        for p in prompts
    ]
    labels = [_subset(r, why) for r, why in zip(out.to_dict("records"), too_long)]
    out["subset"] = [subset for subset, _ in labels]
    out["skip_reason"] = pd.Series([why for _, why in labels], dtype="object")
    out = out[EVALUATION.names]
    EVALUATION.check(out, "evaluate")
    return out


def summarize(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per split of each prompt kind, and subset sizes (a small table to print)."""
    flags = [f"{k}_alias_match" for k in PROMPT_KINDS]
    acc = (
        evaluation.groupby("split")[flags]
        .mean()
        .astype(float)
        .rename(columns=lambda c: c.removesuffix("_alias_match"))
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
