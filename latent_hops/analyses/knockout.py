"""Attention knockout (reference §2; Geva et al. 2023): block attention edges from a set of
query positions to a set of key positions, in every head of a window of layers
[l - k, l + k], by setting the pre-softmax score to -inf (``backend.block_attention``), on the
prompt pass only. A layer matters when the greedy generation changes from the clean one
(and not both are correct); the change in e3's log-probability is recorded too.

Edge presets: ``last_to_t1`` (t2 -> t1), ``last_to_r1`` (t2 -> the first-hop relation's
tokens), ``all_to_t1`` (every position after t1 -> t1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from latent_hops import backend, plots
from latent_hops.analysis import (
    Analysis,
    Column,
    ReportInput,
    first_layer,
    option,
    register,
    runtime,
)
from latent_hops.backend import Model, greedy_generate
from latent_hops.cases import Case, case_batches
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, decode, is_correct
from latent_hops.ranks import best_rank

EDGE_PRESETS = ("last_to_t1", "last_to_r1", "all_to_t1")
Preset = Literal["last_to_t1", "last_to_r1", "all_to_t1"]
TABLE = (
    Column("id", "query id"),
    Column("preset", "the edges knocked out (EDGE_PRESETS)"),
    Column("layer", "centre layer l of the window"),
    Column("window_start", "first blocked layer"),
    Column("window_end", "last blocked layer"),
    Column("generation", "greedy generation under the knockout"),
    Column("correct", "an e3 alias in it"),
    Column("changed", "the generation differs from the clean one (and not both are correct)"),
    Column("e3_logprob_delta", "change of e3's first-token log-probability at t2"),
    Column("skip_reason", "why the case has no knockout for this preset ('' = none)"),
)
COLUMNS = [c.name for c in TABLE]


@dataclass(frozen=True)
class KnockoutConfig:
    presets: tuple[Preset, ...] = option(
        ("last_to_t1",), f"knockout edges: {','.join(EDGE_PRESETS)}"
    )
    window: int = option(3, "knockout window half-width k: layers [l - k, l + k]")
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt")
    batch_size: int = runtime(64)
    progress: bool = runtime(False)


def edges(case: Case, preset: str) -> tuple[list[int], list[int]] | str:
    """(query positions, key positions) of a preset, as unpadded indices, or a skip reason."""
    t1, t2 = case.positions["t1"], case.positions["t2"]
    if preset == "last_to_t1":
        return [t2], [t1]
    if preset == "all_to_t1":
        return list(range(t1 + 1, t2 + 1)), [t1]
    if preset == "last_to_r1":
        if not case.r1_tokens:
            return "first-hop relation tokens unknown (source_prompt differs from the templates)"
        return [t2], case.r1_tokens
    raise InputError(f"unknown knockout preset {preset!r}; use {EDGE_PRESETS}")


@torch.no_grad()
def attention_knockout(
    model: Model, cases: Sequence[Case], config: KnockoutConfig = KnockoutConfig()
) -> pd.DataFrame:
    """One row per case x preset x centre layer l (window [l - k, l + k] clipped)."""
    for preset in config.presets:
        if preset not in EDGE_PRESETS:
            raise InputError(f"unknown knockout preset {preset!r}; use {EDGE_PRESETS}")
    if config.window < 0:
        raise InputError(f"window must be >= 0, got {config.window}")
    n_layers = backend.n_layers(model)
    rows = []
    bar = tqdm(total=len(cases) * len(config.presets), desc="knockout", disable=not config.progress)
    for b in case_batches(model, cases, config.batch_size, ()):
        batch, tok = b.cases, b.tok
        clean = greedy_generate(model, tok.tokens, tok.attention_mask, config.max_new_tokens)
        clean_text = [decode(model, r) for r in clean.tokens.tolist()]
        clean_lp = clean.first_logits.log_softmax(-1)
        for preset in config.presets:
            mask = torch.zeros(
                (len(batch),) + (tok.tokens.shape[1],) * 2,
                dtype=torch.bool,
                device=tok.tokens.device,
            )
            reasons = []
            for qi, (case, pad) in enumerate(zip(batch, tok.n_pad)):
                e = edges(case, preset)
                reasons.append(e if isinstance(e, str) else "")
                if not isinstance(e, str):
                    queries, keys = e
                    mask[
                        qi,
                        [pad + q for q in queries for _ in keys],
                        [pad + k for _ in queries for k in keys],
                    ] = True
            for layer in range(n_layers):
                window = range(
                    max(0, layer - config.window), min(n_layers, layer + config.window + 1)
                )
                out = greedy_generate(
                    model,
                    tok.tokens,
                    tok.attention_mask,
                    config.max_new_tokens,
                    backend.block_attention(model, window, mask),
                )
                lp = out.first_logits.log_softmax(-1)
                for qi, case in enumerate(batch):
                    where = {
                        "id": case.id,
                        "preset": preset,
                        "layer": layer,
                        "window_start": window[0],
                        "window_end": window[-1],
                    }
                    if reasons[qi]:
                        rows.append(
                            {
                                **where,
                                "generation": "",
                                "correct": False,
                                "changed": False,
                                "e3_logprob_delta": float("nan"),
                                "skip_reason": reasons[qi],
                            }
                        )
                        continue
                    text = decode(model, out.tokens[qi].tolist())
                    ok = is_correct(text, case.e3_names)
                    was_ok = is_correct(clean_text[qi], case.e3_names)
                    _, new = best_rank(lp[qi], case.first_tokens["e3"])
                    _, old = best_rank(clean_lp[qi], case.first_tokens["e3"])
                    changed = text != clean_text[qi] and not (ok and was_ok)
                    rows.append(
                        {
                            **where,
                            "generation": text,
                            "correct": ok,
                            "changed": changed,
                            "e3_logprob_delta": float(new - old),
                            "skip_reason": "",
                        }
                    )
            bar.update(len(batch))
    bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)


def knockout_layer(knockout: pd.DataFrame, preset: str = "last_to_t1") -> pd.Series:
    """Per case, the min centre layer whose knockout of ``preset`` changes the answer; an
    error when the table holds no ``preset`` rows (never a column of NaN that looks measured)."""
    rows = knockout[knockout.preset == preset]
    if rows.empty:
        raise InputError(
            f"the knockout table has no {preset!r} rows (presets: {sorted(set(knockout.preset))}): "
            f"run the knockout with --presets {preset}"
        )
    return first_layer(rows, rows.changed, "knockout_layer").reindex(knockout["id"].unique())


def _report(section: ReportInput) -> str:
    return section.figure(plots.knockout_curves(section.table, section.evaluation))


register(
    Analysis(
        name="knockout",
        title="Attention knockout",
        order=40,
        help="attention knockout -> knockout.parquet",
        config=KnockoutConfig,
        columns=TABLE,
        report=_report,
        run=lambda context, config: attention_knockout(context.model, context.cases, config),
        stage_layers=lambda table, stages: knockout_layer(table, stages.knockout_preset).to_frame(),
        uses_positions=lambda config: ("t1", "t2"),
        note=lambda config: (
            f"Attention knockout: edges from query to key positions ({', '.join(config.presets)}) "
            "are "
            f"blocked (score −inf) in all heads of layers [l − {config.window}, l + "
            f"{config.window}], "
            f"on the prompt pass; {config.max_new_tokens} greedy tokens; a layer matters when the "
            "answer changes (and not both are correct)."
        ),
    )
)
