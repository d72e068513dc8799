"""Build two-hop queries from any knowledge base, the way the paper samples them.

Input: a triples table (columns ``subject``, ``relation``, ``object``: a DataFrame or a CSV
file), and optionally an entities table (``id``, ``label``; optional ``aliases``, ``type``)
and a relations table (``id``, ``template`` with one ``{}``; optional ``type``). Without
them an entity's label is its id and a relation's template is ``"the {relation} of {}"``.
Paths are
enumerated bridge first (e1 -r1-> e2 -r2-> e3), with e1, e2, e3 pairwise distinct, and
deduplicated; optionally only (subject, relation) pairs with a unique object are used and
the number of queries per bridge is capped. The toy dataset is built through this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from latent_hops.errors import InputError
from latent_hops.queries import PROMPT_SUFFIX, build_prompts, normalize_table


@dataclass(frozen=True)
class BuilderConfig:
    unique_objects: bool = True  # drop (subject, relation) pairs with several objects
    max_per_bridge: int | None = None  # cap on queries per bridge entity (seeded sample)
    suffix: str = PROMPT_SUFFIX
    seed: int = 0


def _check(table: pd.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{name} table: missing columns: {', '.join(missing)}")


def build_queries(
    triples: pd.DataFrame | str | Path,
    entities: pd.DataFrame | None = None,
    relations: pd.DataFrame | None = None,
    config: BuilderConfig = BuilderConfig(),
) -> pd.DataFrame:
    """Every two-hop path of the knowledge base as a normalised query table (module
    docstring for the inputs).

    Query ids are the path ``"{e1}|{r1}|{e2}|{r2}|{e3}"``, so that a query keeps its id
    whatever else the knowledge base contains.
    """
    if not isinstance(triples, pd.DataFrame):
        try:
            triples = pd.read_csv(triples, dtype=str, keep_default_na=False)
        except (OSError, pd.errors.ParserError) as err:
            raise InputError(f"triples {triples}: cannot be read ({err})", code="dataset") from None
    _check(triples, "triples", ("subject", "relation", "object"))
    if entities is None:
        ids = sorted(set(triples["subject"].astype(str)) | set(triples["object"].astype(str)))
        entities = pd.DataFrame({"id": ids, "label": ids})
    if relations is None:
        names = sorted(set(triples["relation"].astype(str)))
        relations = pd.DataFrame({"id": names, "template": [f"the {r} of {{}}" for r in names]})
    _check(entities, "entities", ("id", "label"))
    _check(relations, "relations", ("id", "template"))
    facts = triples[["subject", "relation", "object"]].astype(str).drop_duplicates()
    if config.unique_objects:
        n_obj = facts.groupby(["subject", "relation"])["object"].transform("size")
        facts = facts[n_obj == 1]
    hop1 = facts.rename(columns={"subject": "e1", "relation": "r1", "object": "e2"})
    hop2 = facts.rename(columns={"subject": "e2", "relation": "r2", "object": "e3"})
    paths = hop1.merge(hop2, on="e2")  # bridge first: join on the bridge entity
    paths = paths[(paths.e1 != paths.e2) & (paths.e2 != paths.e3) & (paths.e1 != paths.e3)]
    paths = paths.drop_duplicates(["e1", "r1", "e2", "r2", "e3"]).sort_values(
        ["e2", "e1", "r1", "r2", "e3"]
    )
    if config.max_per_bridge is not None:
        rng = np.random.default_rng(config.seed)
        keys = rng.random(len(paths))
        paths = (
            paths.assign(_k=keys)
            .sort_values(["e2", "_k"])
            .groupby("e2")
            .head(config.max_per_bridge)
        )
        paths = paths.drop(columns="_k").sort_values(["e2", "e1", "r1", "r2", "e3"])

    ent = entities.assign(id=entities["id"].astype(str)).set_index("id")
    rel = relations.assign(id=relations["id"].astype(str)).set_index("id")
    unknown = (set(paths.e1) | set(paths.e2) | set(paths.e3)) - set(ent.index)
    if unknown:
        raise InputError(f"entities table lacks ids used by triples: {sorted(unknown)[:10]}")
    aliases = ent["aliases"] if "aliases" in ent else pd.Series([[]] * len(ent), index=ent.index)
    types = ent["type"] if "type" in ent else pd.Series([""] * len(ent), index=ent.index)
    rtypes = rel["type"] if "type" in rel else rel.index.to_series()
    out = pd.DataFrame(
        {"id": paths.e1 + "|" + paths.r1 + "|" + paths.e2 + "|" + paths.r2 + "|" + paths.e3}
    )
    for k in ("e1", "r1", "e2", "r2", "e3"):
        out[k] = paths[k].to_numpy()
    for k in ("e1", "e2", "e3"):
        out[f"{k}_label"] = ent["label"].reindex(paths[k]).to_numpy()
        out[f"{k}_aliases"] = [list(a) for a in aliases.reindex(paths[k])]
        out[f"{k}_type"] = types.reindex(paths[k]).to_numpy()
    for k in ("r1", "r2"):
        out[f"{k}_template"] = rel["template"].reindex(paths[k]).to_numpy()
        out[f"{k}_type"] = rtypes.reindex(paths[k]).to_numpy()
    out["source_prompt"] = [
        build_prompts(t1, t2, e1, "", config.suffix)["composition"]
        for t1, t2, e1 in zip(out.r1_template, out.r2_template, out.e1_label)
    ]
    return normalize_table(out.reset_index(drop=True), "built queries")
