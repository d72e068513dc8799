"""Bridge-swap interchange (an interchange intervention; Geiger et al.): does the model *use*
the bridge it holds at t1 (or t2), rather than merely hold it where a decoder can read it?

For a query q = (e1, r1, r2) the model answers correctly, take a donor q' = (e1', r1, r2)
with the same relations and another bridge (e2' != e2, so another answer e3' != e3), also
answered correctly. q''s hidden state of layer l at its t1 (t2) is written into q's run at
t1 (t2), layer l, on the prompt pass only, and the model generates greedily. If the answer
becomes e3', the swap carried the bridge: at layer l the answer is still read from q's t1
(t2). Controls on the same cases, positions and layers:

- ``same_bridge``: a donor with the same bridge (e2' = e2), the same second relation and
  another e1' (its first relation may differ): its swap should change nothing;
- ``random``: a random direction with the norm of q's own hidden state there.

**Pairing rule** (the donor of every row is in column ``donor_id``): among the run's queries
the model answers correctly, the one with the smallest CRC-32 of ``"seed|q|q'"``
(deterministic, and no preference for dataset order) that has q's two relation templates,
another bridge, and an answer whose names share no substring with q's (so the alias rule tells
the two answers apart); for ``same_bridge``: q's bridge and second relation, another e1. A case
the model does not answer correctly, or without such a donor, has rows with a
``skip_reason`` (their measures null).

**Stage measure** ``swap_layer``: the last layer at which a t1 swap moves the answer to e3';
after it, the bridge has been read from t1 (an information-propagation measure, beside the
attention knockout).
"""

from __future__ import annotations

import html
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from latent_hops.analysis import (
    Analysis,
    Context,
    ReportInput,
    Results,
    StageMeasure,
    option,
    register,
    runtime,
)
from latent_hops.backend import GreedyOutput, Model
from latent_hops.cases import POSITIONS, Case, case_batches, prepare_cases
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, alias_match, decode
from latent_hops.patching import PatchRow, generate_with_patches, hidden_states_at, seeded_direction
from latent_hops.plots import layer_ticks
from latent_hops.positions import GRID_HELP, parse_layers
from latent_hops.queries import TwoHopQuery, iter_queries
from latent_hops.stats import mcnemar, rate_interval
from latent_hops.tables import (
    ALIAS_MATCH,
    GENERATION,
    HIDDEN_LAYER,
    ID,
    POSITION,
    SKIP_REASON,
    Column,
    TableSchema,
)

KINDS = ("swap", "same_bridge", "random")
Kind = Literal["swap", "same_bridge", "random"]
Position = Literal["t1", "t2"]
OUTCOMES = ("donor", "own", "both", "neither")
NEEDS_DONOR = ("swap", "same_bridge")

TABLE = TableSchema(
    "interchange.parquet",
    "a case x position x hidden-state layer x kind",
    (
        ID,
        POSITION.described("t1 or t2: where the donor's state is read and q's is replaced"),
        HIDDEN_LAYER.described("the hidden-state layer swapped (the same in both runs)"),
        Column("kind", "str", "swap (another bridge), same_bridge or random (controls)"),
        Column("donor_id", "str", "the donor query (null: random, or skipped)"),
        GENERATION.described("greedy generation of the swapped run (null: skipped)"),
        ALIAS_MATCH.described("an alias of q's own answer e3 is in it (null: skipped)"),
        Column(
            "donor_alias_match",
            "boolean",
            "an alias of the donor's answer e3' is in it (null: skipped, or no donor: random)",
        ),
        Column(
            "outcome",
            "str",
            "donor (e3' only: the swap carried the bridge), own (e3 only), both, neither "
            "(same_bridge, whose donor shares q's answer: own or neither; null: skipped)",
        ),
        SKIP_REASON.described("why the case has no swap of this kind (null: none)"),
    ),
)


@dataclass(frozen=True)
class InterchangeConfig:
    positions: tuple[Position, ...] = option(POSITIONS, "comma-separated: t1,t2")
    swap_kinds: tuple[Kind, ...] = option(KINDS, "comma-separated: swap,same_bridge,random")
    swap_layers: tuple[int, ...] | str | None = option(None, "layers swapped: " + GRID_HELP)
    max_new_tokens: int = option(
        DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt", minimum=1
    )
    seed: int = 0  # donor choice and the random control
    batch_rows: int = runtime(256)  # swapped rows per forward pass
    batch_size: int = runtime(64)
    progress: bool = runtime(False)


# ---------------------------------------------------------------------------- pairing


def _names_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether some alias of one is a substring of an alias of the other (case-insensitive):
    then the alias rule could not tell the two answers apart."""
    low_a, low_b = [x.lower() for x in a if len(x) > 1], [x.lower() for x in b if len(x) > 1]
    return any(x in y or y in x for x in low_a for y in low_b)


def _eligible(q: TwoHopQuery, d: TwoHopQuery, kind: str) -> bool:
    if d.id == q.id or d.r2_template != q.r2_template:
        return False
    if kind == "same_bridge":
        return d.e2_label == q.e2_label and d.e1_label != q.e1_label
    return (
        d.r1_template == q.r1_template
        and d.e2_label != q.e2_label
        and not _names_overlap(q.names("e3"), d.names("e3"))
    )


UNANSWERED = "not answered correctly (a swap needs known answers on both sides)"
NO_DONOR = {
    "swap": "no correctly answered query with the same relations and another bridge",
    "same_bridge": "no correctly answered query with the same bridge, the same second "
    "relation and another e1",
}


def choose_donors(
    cases: Sequence[Case],
    queries: pd.DataFrame,
    evaluation: pd.DataFrame,
    kinds: Sequence[str] = NEEDS_DONOR,
    seed: int = 0,
) -> dict[tuple[str, str], str]:
    """The donor id of each (case id, kind) by the pairing rule (module docstring), or the
    reason there is none (``"skip: <reason>"``)."""
    correct = set(evaluation.loc[evaluation["subset"] == "correct", "id"])
    by_id = {q.id: q for q in iter_queries(queries)}
    pool = [by_id[i] for i in by_id if i in correct]
    chosen: dict[tuple[str, str], str] = {}
    for case in cases:
        q = by_id[case.id]
        for kind in kinds:
            if case.id not in correct:
                chosen[case.id, kind] = f"skip: {UNANSWERED}"
                continue
            found = [d for d in pool if _eligible(q, d, kind)]
            if not found:
                chosen[case.id, kind] = f"skip: {NO_DONOR[kind]}"
                continue
            rank = lambda d: zlib.crc32(f"{seed}|{q.id}|{d.id}".encode())  # noqa: E731
            chosen[case.id, kind] = min(found, key=rank).id
    return chosen


# ---------------------------------------------------------------------------- the swaps


def _outcome(own: bool, donor: bool | None) -> str:
    """donor / own / both / neither; a donor with q's own answer (the same-bridge control)
    passes ``donor=None``: its run either keeps that answer or loses it."""
    if donor and not own:
        return "donor"
    if own and not donor:
        return "own"
    return "both" if own and donor else "neither"


@torch.no_grad()
def interchange(
    model: Model,
    cases: Sequence[Case],
    donors: Mapping[tuple[str, str], Case | str],
    config: InterchangeConfig | None = None,
) -> pd.DataFrame:
    """One row per case x position x layer x kind: each case's hidden state replaced by its
    donor's (``donors[case id, kind]``: a prepared ``Case``, or a skip reason) or by a
    norm-matched random direction, and the greedy generation scored against both answers."""
    config = config or InterchangeConfig()
    layers = list(parse_layers(config.swap_layers, model.n_layers) or range(model.n_layers))
    positions: list[str] = list(config.positions)
    kinds: list[str] = list(config.swap_kinds)
    skipped = {key: value for key, value in donors.items() if isinstance(value, str)}
    donor_cases = {v.id: v for v in donors.values() if isinstance(v, Case)}
    donor_states = _states(model, list(donor_cases.values()), positions, layers, config.batch_size)
    records: list[dict] = []
    todo = [c for c in cases if any(_runs(c, k, donors, skipped) for k in kinds)]
    bar = tqdm(total=len(todo), desc="interchange", unit="case", disable=not config.progress)
    per_case = len(positions) * len(layers) * len(kinds)
    for b in case_batches(model, todo, max(1, config.batch_rows // per_case), positions):
        own = hidden_states_at(model, b.tok.tokens, b.tok.attention_mask, b.columns, layers)
        rows = [
            PatchRow(qi, int(b.columns[qi, pi]), layer, (pi, li, kind))
            for qi, case in enumerate(b.cases)
            for kind in kinds
            if _runs(case, kind, donors, skipped)
            for pi in range(len(positions))
            for li, layer in enumerate(layers)
        ]

        def values(chunk: Sequence[PatchRow], b=b, own=own) -> torch.Tensor:
            out = []
            for r in chunk:
                pi, li, kind = r.key
                case = b.cases[r.base]
                if kind == "random":
                    key = f"{config.seed}|{case.id}|{positions[pi]}|{layers[li]}"
                    out.append(seeded_direction(key, own[r.base, pi, li]))
                else:
                    donor = donors[case.id, kind]
                    assert isinstance(donor, Case)
                    out.append(donor_states[donor.id][pi, li].to(own.device))
            return torch.stack(out)

        def on_output(chunk: Sequence[PatchRow], out: GreedyOutput, b=b) -> None:
            for r, ids in zip(chunk, out.tokens.tolist()):
                pi, li, kind = r.key
                case = b.cases[r.base]
                donor = donors.get((case.id, kind))
                text = decode(model, ids)
                mine = alias_match(text, case.e3_names)
                theirs = alias_match(text, donor.e3_names) if isinstance(donor, Case) else None
                shared = kind == "same_bridge"  # the donor's answer is q's own: not told apart
                records.append(
                    {
                        "id": case.id,
                        "position": positions[pi],
                        "hidden_layer": layers[li],
                        "kind": kind,
                        "donor_id": donor.id if isinstance(donor, Case) else None,
                        "generation": text,
                        "alias_match": mine,
                        "donor_alias_match": theirs,
                        "outcome": _outcome(mine, None if shared else theirs),
                        "skip_reason": None,
                    }
                )

        generate_with_patches(
            model,
            b.tok.tokens,
            b.tok.attention_mask,
            rows,
            values,
            on_output,
            config.max_new_tokens,
            config.batch_rows,
        )
        bar.update(len(b.cases))
    bar.close()
    for (case_id, kind), reason in skipped.items():
        if kind in kinds and case_id in {c.id for c in cases}:
            records += [
                {"id": case_id, "position": p, "hidden_layer": layer, "kind": kind,
                 "donor_id": None, "generation": None, "alias_match": None,
                 "donor_alias_match": None, "outcome": None, "skip_reason": reason}
                for p in positions
                for layer in layers
            ]  # fmt: skip
    if "random" in kinds:  # the random control runs where a swap of some kind does
        runs = {c.id for c in todo}
        for c in (c for c in cases if c.id not in runs):
            reason = skipped.get((c.id, "swap")) or "no donor of any kind: no swap to control"
            records += [
                {"id": c.id, "position": p, "hidden_layer": layer, "kind": "random",
                 "donor_id": None, "generation": None, "alias_match": None,
                 "donor_alias_match": None, "outcome": None, "skip_reason": reason}
                for p in positions
                for layer in layers
            ]  # fmt: skip
    return _frame(records, cases, kinds)


def _runs(case: Case, kind: str, donors: Mapping, skipped: Mapping) -> bool:
    """Whether ``case`` gets swaps of ``kind`` (random: where it has a donor of any kind)."""
    if kind == "random":
        return any(isinstance(donors.get((case.id, k)), Case) for k in NEEDS_DONOR)
    return (case.id, kind) not in skipped and (case.id, kind) in donors


def _states(
    model: Model, cases: list[Case], positions: list[str], layers: list[int], batch_size: int
) -> dict[str, torch.Tensor]:
    """Each case's clean hidden states [position, layer, d_model] (the donors')."""
    out: dict[str, torch.Tensor] = {}
    for b in case_batches(model, cases, batch_size, positions):
        states = hidden_states_at(model, b.tok.tokens, b.tok.attention_mask, b.columns, layers)
        out.update({case.id: states[i] for i, case in enumerate(b.cases)})
    return out


def _frame(records: list[dict], cases: Sequence[Case], kinds: list[str]) -> pd.DataFrame:
    if not records:
        return TABLE.empty()
    order = {c.id: i for i, c in enumerate(cases)}
    kind_order = {k: i for i, k in enumerate(kinds)}
    frame = pd.DataFrame(records, columns=TABLE.names)
    frame = frame.assign(_q=frame["id"].map(order), _k=frame["kind"].map(kind_order))
    frame = frame.sort_values(["_q", "position", "_k", "hidden_layer"], kind="stable")
    frame = frame.drop(columns=["_q", "_k"]).reset_index(drop=True)
    return frame.astype({"alias_match": "boolean", "donor_alias_match": "boolean"})


def _run(context: Context, config: InterchangeConfig) -> pd.DataFrame:
    """Donors chosen among the run's correctly answered queries, prepared, then the swaps."""
    kinds: list[str] = [k for k in config.swap_kinds if k in NEEDS_DONOR] or list(NEEDS_DONOR)
    chosen = choose_donors(context.cases, context.queries, context.evaluation, kinds, config.seed)
    wanted = sorted({v for v in chosen.values() if not v.startswith("skip: ")})
    table = context.queries[context.queries["id"].isin(wanted)]
    prepared, unresolved = prepare_cases(context.model, table, tuple(config.positions))
    by_id = {c.id: c for c in prepared}
    donors: dict[tuple[str, str], Case | str] = {}
    for key, value in chosen.items():
        if value.startswith("skip: "):
            donors[key] = value.removeprefix("skip: ")
        elif value in by_id:
            donors[key] = by_id[value]
        else:
            donors[key] = f"the donor {value} has no resolvable positions"
    return interchange(context.model, context.cases, donors, config)


# ---------------------------------------------------------------------------- results


def swap_layers(table: pd.DataFrame, config: InterchangeConfig) -> pd.DataFrame:
    """Per case: the last layer at which a t1 swap moves the answer to the donor's
    (``swap_layer``; NaN when no t1 swap ever does, or the case has none)."""
    moved = table[(table.position == "t1") & (table.kind == "swap") & (table.outcome == "donor")]
    last = moved.groupby("id")["hidden_layer"].max().rename("swap_layer")
    return last.reindex(table["id"].unique()).rename_axis("id").to_frame()


def outcome_rates(table: pd.DataFrame) -> pd.DataFrame:
    """Per position x kind x layer: cases with a result, and the share of each outcome with
    its Wilson 95% interval (``stats.rate_interval``)."""
    done = table[table.skip_reason.isna()]
    rows = []
    for (position, kind, layer), g in done.groupby(["position", "kind", "hidden_layer"]):
        row = {"position": position, "kind": kind, "hidden_layer": layer, "cases": len(g)}
        for outcome in OUTCOMES:
            k = int((g.outcome == outcome).sum())
            low, high = rate_interval(k, len(g))
            row |= {outcome: k / len(g), f"{outcome}_low": low, f"{outcome}_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


def paired_tests(table: pd.DataFrame) -> pd.DataFrame:
    """Per position x layer: does a swap move the answer off e3 more often than the
    same-bridge control, case by case (McNemar's exact test on the same cases)?"""
    done = table[table.skip_reason.isna()].assign(moved=lambda t: t.outcome != "own")
    wide = done.pivot_table(
        index=["position", "hidden_layer", "id"], columns="kind", values="moved", aggfunc="first"
    )
    rows: list[dict] = []
    if not {"swap", "same_bridge"} <= set(wide.columns):
        return pd.DataFrame(rows)
    for (position, layer), g in wide.dropna(subset=["swap", "same_bridge"]).groupby(level=[0, 1]):
        test = mcnemar(g["swap"].astype(bool), g["same_bridge"].astype(bool))
        rows.append(
            {"position": position, "hidden_layer": layer, "cases": len(g),
             "swap_only": test.only_a, "control_only": test.only_b, "p_value": test.p_value}
        )  # fmt: skip
    return pd.DataFrame(rows)


def outcome_curves(table: pd.DataFrame) -> go.Figure:
    """% of swaps whose answer becomes the donor's (solid) or stays q's own (dashed), per
    layer: one panel per position, one colour per kind."""
    rates = outcome_rates(table)
    positions = sorted(rates.position.unique()) if len(rates) else ["t1"]
    fig = make_subplots(rows=1, cols=len(positions), subplot_titles=positions, shared_yaxes=True)
    colours = {"swap": "#d62728", "same_bridge": "#1f77b4", "random": "#7f7f7f"}
    for col, position in enumerate(positions, start=1):
        for kind, d in rates[rates.position == position].groupby("kind"):
            for outcome, dash in (("donor", "solid"), ("own", "dash")):
                fig.add_trace(
                    go.Scatter(
                        x=d.hidden_layer,
                        y=100 * d[outcome],
                        mode="lines+markers",
                        name=f"{kind}: {outcome}",
                        legendgroup=f"{kind}: {outcome}",
                        showlegend=col == 1,
                        line={"color": colours.get(kind), "dash": dash},
                        error_y={
                            "type": "data",
                            "symmetric": False,
                            "array": 100 * (d[f"{outcome}_high"] - d[outcome]),
                            "arrayminus": 100 * (d[outcome] - d[f"{outcome}_low"]),
                        },
                    ),
                    row=1,
                    col=col,
                )
    fig.update_layout(
        title="Bridge swap: answer becomes the donor's (solid) / stays its own (dashed), "
        "Wilson 95% intervals",
        yaxis_title="% of cases",
        width=980,
        height=460,
    )
    fig.update_xaxes(
        title="hidden-state layer swapped", **layer_ticks(rates.get("hidden_layer", []))
    )
    return fig


def _summary(results: Results[InterchangeConfig]) -> str:
    rates = outcome_rates(results.table)
    if rates.empty:
        return "interchange: no case had a donor (see skip_reason)"
    shown = rates.pivot_table(index="hidden_layer", columns=["position", "kind"], values="donor")
    n = rates.groupby(["position", "kind"]).cases.max().to_dict()
    return (
        "interchange: % of cases whose answer becomes the donor's, per swapped layer "
        f"(cases per column: {n})\n" + (100 * shown).round(0).to_string()
    )


def _report(section: ReportInput[InterchangeConfig]) -> str:
    table = section.table
    skipped = table[table.skip_reason.notna()].drop_duplicates(["id", "kind"])
    reasons = skipped.groupby(["kind", "skip_reason"]).size().rename("cases").reset_index()
    tests = paired_tests(table)
    return (
        section.figure(outcome_curves(table))
        + "<p class='note'>Share of each outcome per position, kind and layer, with Wilson "
        "95% intervals:</p>"
        + section.html_table(outcome_rates(table))
        + "<p class='note'>Swap against the same-bridge control on the same cases (answer "
        f"moved off e3; McNemar's exact test): {len(tests)} comparisons (one per position and "
        "layer), so read single p-values with that many in mind.</p>"
        + section.html_table(tests)
        + f"<p class='note'>Cases without a swap ({html.escape('skip_reason')}):</p>"
        + section.html_table(reasons)
    )


register(
    Analysis(
        name="interchange",
        title="Bridge-swap interchange",
        order=35,
        help="the bridge swapped in from a donor query at t1/t2, per layer, with same-bridge "
        "and random controls: does the answer become the donor's -> interchange.parquet",
        config=InterchangeConfig,
        schema=TABLE,
        run=_run,
        stage_measures=(
            StageMeasure(
                "swap_layer",
                "info_propagation",
                "no t1 swap moves the answer to the donor's",
                "swap",
            ),
        ),
        stage_layers=swap_layers,
        summary=_summary,
        report=_report,
        note=lambda config: (
            "Bridge swap: a correctly answered query's hidden state at "
            f"{', '.join(config.positions)} is replaced, layer by layer, by that of a donor "
            "with the same relations and another bridge (controls: a donor with the same "
            "bridge; a random direction of the same norm); "
            f"{config.max_new_tokens} greedy tokens. 'donor' = the answer became the donor's."
        ),
    )
)
