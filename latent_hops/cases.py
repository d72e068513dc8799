"""Cases: queries made ready for an analysis on one model — the composition prompt, its
token positions (t1, t2) and the first tokens of the bridge (e2) and answer (e3).

Every analysis (back-patching, logit lens, knockout, projection, Patchscopes) starts from
``prepare_cases``; a query whose positions cannot be resolved is skipped with its reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Int

from latent_hops.backend import Model
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, length_batches
from latent_hops.positions import (
    TokenizedPrompts,
    answer_first_tokens,
    context_problems,
    resolve_positions,
    tokenize_prompts,
)
from latent_hops.queries import PROMPT_SUFFIX, composition_spans, iter_queries
from latent_hops.tables import SKIPPED

POSITIONS = ("t1", "t2")


@dataclass
class Case:
    """A query ready for analysis on one model."""

    id: str
    prompt: str
    positions: dict[str, int]  # unpadded token index of t1 and t2
    names: dict[str, tuple[str, ...]]  # "e1" / "e2" / "e3" -> label and aliases
    first_tokens: dict[str, list[int]] = field(
        default_factory=dict
    )  # "e2" / "e3" -> first answer tokens
    r1_tokens: list[int] | None = (
        None  # unpadded indices of the first-hop relation's tokens (not e1's)
    )

    @property
    def e3_names(self) -> tuple[str, ...]:
        return self.names["e3"]


def prepare_cases(
    model: Model,
    table: pd.DataFrame,
    positions: tuple[str, ...] = POSITIONS,
    suffix: str = PROMPT_SUFFIX,
    new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> tuple[list[Case], pd.DataFrame]:
    """Cases for the queries of ``table``, and a table (``id``, ``skip_reason``) of skipped ones
    (e1 not found in the tokens; a prompt that with ``new_tokens`` generated ones would not
    fit the model's context)."""
    unknown = set(positions) - set(POSITIONS)
    if unknown:
        raise InputError(f"unknown positions {sorted(unknown)}; use {POSITIONS}")
    queries = iter_queries(table)
    if not queries:
        return [], pd.DataFrame(columns=SKIPPED.names)
    pos = resolve_positions(model, queries, suffix).set_index("id")
    too_long = dict(
        zip(
            (q.id for q in queries),
            context_problems(model, [q.composition_prompt(suffix) for q in queries], new_tokens),
        )
    )
    cases, skipped = [], []
    for q in queries:
        reason = pos.loc[q.id, "skip_reason"]
        error = (None if pd.isna(reason) else reason) or too_long[q.id]
        if error:
            skipped.append({"id": q.id, "skip_reason": error})
            continue
        prompt = q.composition_prompt(suffix)
        names = {e: q.names(e) for e in ("e1", "e2", "e3")}
        first = {e: answer_first_tokens(model, prompt, names[e]) for e in ("e2", "e3")}
        cases.append(
            Case(
                q.id,
                prompt,
                {p: int(pos.loc[q.id, p]) for p in positions},
                names,
                first,
                _r1_tokens(model, prompt, composition_spans(q, suffix)),
            )
        )
    return cases, pd.DataFrame(skipped, columns=SKIPPED.names)


def _r1_tokens(model: Model, prompt: str, spans: dict | str) -> list[int] | None:
    if isinstance(spans, str) or "r1" not in spans:  # a str is a skip reason
        return None
    tok = tokenize_prompts(model, [prompt])
    e1_tokens = set(tok.overlapping(0, spans["e1"]))
    return [i for i in tok.overlapping(0, spans["r1"]) if i not in e1_tokens]


@dataclass
class CaseBatch:
    """A batch of cases of similar length, tokenised (left-padded), with the padded columns
    of the requested positions."""

    index: list[int]  # the cases' indices in the caller's sequence
    cases: list[Case]
    tok: TokenizedPrompts
    columns: Int[torch.Tensor, "batch n_positions"]


def case_batches(
    model: Model,
    cases: Sequence[Case],
    batch_size: int,
    positions: Sequence[str] = POSITIONS,
    lengths: Sequence[int] | None = None,
) -> Iterator[CaseBatch]:
    """The batching every analysis starts with: batches of ``cases`` of similar ``lengths``
    (default: characters), tokenised, with the columns of ``positions`` in the padded batch."""
    lengths = [len(c.prompt) for c in cases] if lengths is None else lengths
    unprepared = [c.id for c in cases if not set(positions) <= set(c.positions)]
    if unprepared:
        raise InputError(
            f"cases {unprepared[:5]} have no token position for some of {list(positions)}: "
            "prepare the cases with the positions (or config) of the analysis that uses them"
        )
    for idx in length_batches(lengths, batch_size):
        batch = [cases[i] for i in idx]
        tok = tokenize_prompts(model, [c.prompt for c in batch])
        cols = torch.tensor(
            [[n + c.positions[p] for p in positions] for c, n in zip(batch, tok.n_pad)],
            dtype=torch.long,
        ).reshape(len(batch), len(positions))
        yield CaseBatch(idx, batch, tok, cols)
