"""The toy dataset: the toy knowledge graph's two-hop queries in the paper's schema.

Built through the general ``query_builder.build_queries`` from the knowledge graph's
tables, then restricted to three splits (column ``split``):
``train`` (a sample of trained compositions), ``test_id`` (held-out in-distribution
compositions) and ``test_ood`` (ID first hop, OOD second hop).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from latent_hops.query_builder import BuilderConfig, build_queries
from latent_hops.toy.knowledge_graph import CompositionSplits, KnowledgeGraph, relation_template


def entity_id(i: int) -> str:
    return f"E{i:03d}"


def relation_id(i: int) -> str:
    return f"R{i:02d}"


def knowledge_base_tables(kg: KnowledgeGraph) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(triples, entities, relations) tables of the toy graph, as ``build_queries`` takes them."""
    triples = pd.DataFrame(
        [(entity_id(s), relation_id(r), entity_id(o)) for s, r, o in kg.triples()],
        columns=["subject", "relation", "object"],
    )
    entities = pd.DataFrame(
        {
            "id": [entity_id(i) for i in range(kg.n_entities)],
            "label": kg.entities,
            "aliases": [[name] for name in kg.entities],
            "type": kg.entity_types,
        }
    )
    relations = pd.DataFrame(
        {
            "id": [relation_id(i) for i in range(kg.n_relations)],
            "template": [relation_template(r) for r in kg.relations],
            "type": kg.relations,
        }
    )
    return triples, entities, relations


def composition_ids(kg: KnowledgeGraph, comps: np.ndarray) -> list[str]:
    """Query ids of (e1, r1, r2) index rows, as ``build_queries`` names them."""
    ids = []
    for e1, r1, r2 in comps:
        e2 = kg.objects[e1, r1]
        e3 = kg.objects[e2, r2]
        ids.append(
            "|".join(
                [entity_id(e1), relation_id(r1), entity_id(e2), relation_id(r2), entity_id(e3)]
            )
        )
    return ids


def build_toy_dataset(
    kg: KnowledgeGraph, splits: CompositionSplits, n_train: int = 1000
) -> pd.DataFrame:
    """The shipped toy dataset: ``n_train`` trained compositions plus both test sets."""
    queries = build_queries(*knowledge_base_tables(kg), BuilderConfig()).set_index("id", drop=False)
    parts = []
    for split, comps in (
        ("train", splits.train[:n_train]),
        ("test_id", splits.test_id),
        ("test_ood", splits.test_ood),
    ):
        part = queries.loc[composition_ids(kg, comps)].copy()
        part["split"] = split
        parts.append(part)
    return pd.concat(parts).reset_index(drop=True)
