"""The synthetic knowledge graph behind the shipped toy model.

Every (entity, relation) pair has exactly one object (never the entity itself), drawn from
a seeded RNG, so the graph, the training data and the toy dataset are reproducible from the
seed alone. 10% of the atomic facts are "out-of-distribution" (OOD): they are trained as
one-hop facts but never appear inside a training two-hop query (Wang et al. 2024), which
makes the toy model's OOD two-hop queries genuine knowledge failures.

Prompts keep the paper's order ("the spouse of the performer of Voliba is"); each relation
phrase ("the spouse of") is a single token of the toy tokenizer, each entity name too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RELATION_NAMES: tuple[str, ...] = (
    "spouse",
    "performer",
    "author",
    "capital",
    "mother",
    "father",
    "employer",
    "director",
    "founder",
    "composer",
    "creator",
    "owner",
    "manufacturer",
    "producer",
    "mentor",
    "rival",
    "sibling",
    "teacher",
    "neighbour",
    "successor",
)
ENTITY_TYPES: tuple[str, ...] = ("person", "place", "work", "organization")
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "tr",
    "st",
    "kl",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "eo")
_CODAS = ("", "", "n", "r", "s", "l", "m")


def relation_template(relation: str) -> str:
    """Prompt template of a toy relation: ``"the spouse of {}"``."""
    return f"the {relation} of {{}}"


def make_entity_names(
    n: int, rng: np.random.Generator, reserved: tuple[str, ...] = ()
) -> list[str]:
    """``n`` pronounceable one-word names, none a case-insensitive substring of another.

    The paper scores a generation as correct when an alias is a substring of it, so no
    name may hide inside another name or inside any other word of the vocabulary.
    """
    names: list[str] = []
    blocked = [w.lower() for w in reserved]
    while len(names) < n:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.integers(2, 4))]
        name = ("".join(syllables) + rng.choice(_CODAS)).capitalize()
        low = name.lower()
        if any(low in other or other in low for other in blocked):
            continue
        blocked.append(low)
        names.append(name)
    return names


@dataclass(frozen=True)
class KnowledgeGraph:
    """Entities, relations and the object of every (entity, relation) pair."""

    entities: list[str]
    entity_types: list[str]
    relations: list[str]
    objects: np.ndarray  # [n_entities, n_relations] -> entity index
    ood: np.ndarray  # [n_entities, n_relations] bool: fact never used inside a training composition
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n_entities(self) -> int:
        return len(self.entities)

    @property
    def n_relations(self) -> int:
        return len(self.relations)

    def triples(self) -> list[tuple[int, int, int]]:
        """All atomic facts as (subject, relation, object) index triples."""
        return [
            (e, r, int(self.objects[e, r]))
            for e in range(self.n_entities)
            for r in range(self.n_relations)
        ]


def build_knowledge_graph(
    n_entities: int = 200, n_relations: int = 20, ood_fraction: float = 0.1, seed: int = 0
) -> KnowledgeGraph:
    """Sample the toy knowledge graph from ``seed`` (same seed, same graph)."""
    if n_relations > len(RELATION_NAMES):
        raise ValueError(f"at most {len(RELATION_NAMES)} relations are named, got {n_relations}")
    rng = np.random.default_rng(seed)
    relations = list(RELATION_NAMES[:n_relations])
    reserved = tuple(relations) + ("the", "of", "is")
    entities = make_entity_names(n_entities, rng, reserved)
    types = [ENTITY_TYPES[i % len(ENTITY_TYPES)] for i in range(n_entities)]
    objects = rng.integers(0, n_entities - 1, size=(n_entities, n_relations))
    objects = objects + (objects >= np.arange(n_entities)[:, None])  # skip the subject itself
    ood = rng.random((n_entities, n_relations)) < ood_fraction
    return KnowledgeGraph(entities, types, relations, objects, ood, seed)


@dataclass(frozen=True)
class CompositionSplits:
    """Two-hop compositions (e1, r1, r2) as index arrays of shape [n, 3]."""

    train: np.ndarray
    test_id: np.ndarray
    test_ood: np.ndarray


def split_compositions(
    kg: KnowledgeGraph,
    train_per_fact: float = 15.0,
    n_test_id: int | None = None,
    n_test_ood: int = 3000,
    seed: int = 0,
) -> CompositionSplits:
    """Split all compositions with e1 != e2 != e3 != e1 into train / held-out sets.

    In-distribution (ID) compositions use two ID facts; ``train_per_fact * N * R`` of them
    are trained, the rest (or the first ``n_test_id``) are held out. ``n_test_ood`` OOD
    test compositions have an ID first hop and an OOD second hop.
    """
    n, r = kg.n_entities, kg.n_relations
    e1, r1, r2 = (
        a.ravel() for a in np.meshgrid(np.arange(n), np.arange(r), np.arange(r), indexing="ij")
    )
    e2 = kg.objects[e1, r1]
    e3 = kg.objects[e2, r2]
    valid = e3 != e1
    first_id = ~kg.ood[e1, r1]
    second_id = ~kg.ood[e2, r2]
    comps = np.stack([e1, r1, r2], axis=1)
    rng = np.random.default_rng(seed + 1)
    id_comps = rng.permutation(comps[valid & first_id & second_id])
    n_train = int(train_per_fact * n * r)
    n_test_id = len(id_comps) - n_train if n_test_id is None else n_test_id
    if n_train + n_test_id > len(id_comps) or n_test_id < 1:
        raise ValueError(
            f"only {len(id_comps)} ID compositions for {n_train} train + {n_test_id} test"
        )
    ood_comps = rng.permutation(comps[valid & first_id & ~second_id])[:n_test_ood]
    return CompositionSplits(id_comps[:n_train], id_comps[n_train : n_train + n_test_id], ood_comps)
