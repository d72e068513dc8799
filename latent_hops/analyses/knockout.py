"""Attention knockout (reference §2; Geva et al. 2023): block attention edges from a set of
query positions to a set of key positions, in every head of a window of layers
[l - k, l + k], by setting the pre-softmax score to -inf (``Model.block_attention``), on the
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
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from latent_hops.analysis import (
    Analysis,
    ReportInput,
    StageMeasure,
    first_layer,
    option,
    register,
    runtime,
)
from latent_hops.backend import Model
from latent_hops.cases import Case, case_batches
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, alias_match, decode
from latent_hops.plots import SUBSET_COLORS
from latent_hops.ranks import best_rank
from latent_hops.tables import ALIAS_MATCH, GENERATION, ID, SKIP_REASON, Column, TableSchema

EDGE_PRESETS = ("last_to_t1", "last_to_r1", "all_to_t1")
Preset = Literal["last_to_t1", "last_to_r1", "all_to_t1"]
TABLE = TableSchema(
    "knockout.parquet",
    "a case x preset x window of layers",
    (
        ID,
        Column("preset", "str", "the edges knocked out (EDGE_PRESETS)"),
        Column("window_center", "int", "centre block l of the window [l - k, l + k]"),
        Column("window_start", "int", "first blocked block (the window clipped to the model)"),
        Column("window_end", "int", "last blocked block"),
        GENERATION.described("greedy generation under the knockout (null: skipped)"),
        ALIAS_MATCH.described("an e3 alias is in it (null: skipped)"),
        Column(
            "changed",
            "boolean",
            "the generation differs from the clean one and not both are correct (null: skipped)",
        ),
        Column(
            "e3_logprob_delta",
            "float",
            "change of e3's first-token log-probability at t2 (NaN: skipped, or no known token)",
        ),
        SKIP_REASON.described("why the case has no knockout for this preset (null: none)"),
    ),
)
COLUMNS = TABLE.names


@dataclass(frozen=True)
class KnockoutConfig:
    presets: tuple[Preset, ...] = option(
        ("last_to_t1",), f"knockout edges: {','.join(EDGE_PRESETS)}"
    )
    window: int = option(3, "knockout window half-width k: layers [l - k, l + k]", minimum=0)
    max_new_tokens: int = option(
        DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt", minimum=1
    )
    stage_preset: str | None = option(
        None,
        "the preset whose layer measures information propagation in the stage table "
        "(default: the first of --presets)",
        flag="--knockout-preset",
    )
    batch_size: int = runtime(64)
    progress: bool = runtime(False)

    def __post_init__(self) -> None:
        for preset in self.presets:
            if preset not in EDGE_PRESETS:
                raise InputError(f"unknown knockout preset {preset!r}; use {EDGE_PRESETS}")
        if self.stage_preset is not None and self.stage_preset not in self.presets:
            raise InputError(
                f"--knockout-preset {self.stage_preset} is not among the knockout's --presets "
                f"{','.join(self.presets)}: add it, or choose another"
            )

    @property
    def measured_preset(self) -> str:
        """The preset of the stage table's knockout layer."""
        return self.stage_preset or self.presets[0]


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
    if config.window < 0:
        raise InputError(f"window must be >= 0, got {config.window}")
    n_layers = model.n_layers
    rows = []
    bar = tqdm(total=len(cases) * len(config.presets), desc="knockout", disable=not config.progress)
    for b in case_batches(model, cases, config.batch_size, ()):
        batch, tok = b.cases, b.tok
        clean = model.greedy_generate(tok.tokens, tok.attention_mask, config.max_new_tokens)
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
                reasons.append(e if isinstance(e, str) else None)
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
                out = model.greedy_generate(
                    tok.tokens,
                    tok.attention_mask,
                    config.max_new_tokens,
                    model.block_attention(window, mask),
                )
                lp = out.first_logits.log_softmax(-1)
                for qi, case in enumerate(batch):
                    where = {
                        "id": case.id,
                        "preset": preset,
                        "window_center": layer,
                        "window_start": window[0],
                        "window_end": window[-1],
                    }
                    if reasons[qi]:
                        rows.append(
                            {
                                **where,
                                "generation": None,
                                "alias_match": None,
                                "changed": None,
                                "e3_logprob_delta": float("nan"),
                                "skip_reason": reasons[qi],
                            }
                        )
                        continue
                    text = decode(model, out.tokens[qi].tolist())
                    ok = alias_match(text, case.e3_names)
                    was_ok = alias_match(clean_text[qi], case.e3_names)
                    _, new = best_rank(lp[qi], case.first_tokens["e3"])
                    _, old = best_rank(clean_lp[qi], case.first_tokens["e3"])
                    changed = text != clean_text[qi] and not (ok and was_ok)
                    rows.append(
                        {
                            **where,
                            "generation": text,
                            "alias_match": ok,
                            "changed": changed,
                            "e3_logprob_delta": float(new - old),
                            "skip_reason": None,
                        }
                    )
            bar.update(len(batch))
    bar.close()
    if not rows:
        return TABLE.empty()
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({"alias_match": "boolean", "changed": "boolean"})


def knockout_layer(knockout: pd.DataFrame, preset: str = "last_to_t1") -> pd.Series:
    """Per case, the min centre layer whose knockout of ``preset`` changes the answer; an
    error when the table holds no ``preset`` rows (never a column of NaN that looks measured)."""
    rows = knockout[knockout.preset == preset]
    if rows.empty:
        raise InputError(
            f"the knockout table has no {preset!r} rows (presets: {sorted(set(knockout.preset))}): "
            f"run the knockout with --presets {preset}"
        )
    return first_layer(rows, rows.changed, "knockout_layer", "window_center").reindex(
        knockout["id"].unique()
    )


def knockout_curves(knockout: pd.DataFrame, evaluation: pd.DataFrame) -> go.Figure:
    """% of cases whose answer changes when each window of layers is knocked out, per preset."""
    data = knockout[knockout.skip_reason.isna()].merge(evaluation[["id", "subset"]], on="id")
    fig = go.Figure()
    for (preset, subset), d in data.groupby(["preset", "subset"]):
        rate = d.astype({"changed": bool}).groupby("window_center")["changed"].mean() * 100
        fig.add_trace(
            go.Scatter(
                x=rate.index,
                y=rate.values,
                mode="lines+markers",
                name=f"{preset}, {subset}",
                line={"color": SUBSET_COLORS.get(subset)},
            )
        )
    fig.update_layout(
        title="Attention knockout: answer changed",
        xaxis_title="centre layer of the window",
        yaxis_title="% of cases",
        width=820,
        height=480,
    )
    return fig


def _report(section: ReportInput[KnockoutConfig]) -> str:
    return section.figure(knockout_curves(section.table, section.evaluation))


register(
    Analysis(
        name="knockout",
        title="Attention knockout",
        order=25,
        help="attention from t2 (or later positions) to t1 blocked in windows of layers: does "
        "the answer change -> knockout.parquet",
        config=KnockoutConfig,
        schema=TABLE,
        report=_report,
        run=lambda context, config: attention_knockout(context.model, context.cases, config),
        stage_measures=(
            StageMeasure(
                "knockout_layer",
                "info_propagation",
                "no knockout window changes the answer",
                "knockout",
            ),
        ),
        stage_layers=lambda table, config: knockout_layer(table, config.measured_preset).to_frame(),
        uses_positions=lambda config: ("t1", "t2"),
        note=lambda config: (
            "Attention knockout: edges from query to key positions "
            f"({', '.join(config.presets)}) are blocked (score −inf) in all heads of layers "
            f"[l − {config.window}, l + {config.window}], on the prompt pass; "
            f"{config.max_new_tokens} greedy tokens; a layer matters when the answer changes "
            "(and not both are correct)."
        ),
    )
)
