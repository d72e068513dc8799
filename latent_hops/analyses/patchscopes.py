"""Patchscopes entity description (reference §1; Ghandeharioun et al. 2024).

The hidden state of a source layer at t1 or t2 of the two-hop prompt is written into the
placeholder of a target prompt at a target layer (prompt pass only), and the continuation
is classified as naming e1, e2, e3 or nothing known ("other"), with the paper's patterns
and priority. Per case: first-hop resolution layer = min source layer at which e2 is
decoded from t1 (any target layer); second-hop resolution layer = min source layer at
which e3 is decoded from t2.

Target-prompt presets: ``paper`` (the paper's English few-shot description prompt, for
real models) and ``toy`` (``"Voliba : Voliba , x :"``, the identity format the shipped toy
model was trained on). All rows of a target layer run in one batch through
``patching.generate_with_patches``, as in the back-patching engine.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from latent_hops.analysis import (
    DECODED_MEASURES,
    Analysis,
    Context,
    ReportInput,
    Results,
    decoded_layers,
    option,
    register,
    runtime,
)
from latent_hops.backend import GreedyOutput, Model, Sampler
from latent_hops.cases import POSITIONS, Case, case_batches
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS
from latent_hops.patching import PatchRow, generate_with_patches, hidden_states_at
from latent_hops.plots import layer_name, percent_heatmap
from latent_hops.positions import GRID_HELP, parse_layers, tokenize_prompts
from latent_hops.tables import ID, POSITION, SOURCE_LAYER, TARGET_LAYER, Column, TableSchema

PAPER_TARGET = (
    "Syria: Syria is a country in the Middle East, Leonardo DiCaprio: Leonardo DiCaprio is an "
    "American actor, Samsung: Samsung is a South Korean multinational corporation, x"
)
TOY_TARGET = "Voliba : Voliba , x :"  # Voliba: the toy graph's first entity (seed 0)
REPEAT_TARGET = "cat -> cat; 1135 -> 1135; hello -> hello; x"  # Patchscopes' identity prompt
PATTERNS = (": {} ", ": {},", ": {}.", ": {}:", "{}: ")
ENTITIES = ("e1", "e2", "e3")  # classification priority
TABLE = TableSchema(
    "patchscope.parquet",
    "a case x position x (source layer, target layer) x sampling seed x target prompt",
    (
        ID,
        POSITION.described("t1 or t2: where the source state is read"),
        SOURCE_LAYER.described("hidden-state layer of the source state (the two-hop prompt)"),
        TARGET_LAYER.described("hidden-state layer of the target prompt it is written into"),
        Column("seed", "Int64", "sampling seed (null: greedy decoding)"),
        Column("generation", "str", "the target prompt's continuation (from the placeholder)"),
        Column("decoded", "str", "e1, e2, e3 or other, by the paper's patterns"),
        Column("target", "str", "name of the target prompt (a preset, or 'custom')"),
    ),
)
COLUMNS = TABLE.names


@dataclass(frozen=True)
class TargetPrompt:
    """A target prompt and the character span of its placeholder (the last ``x`` by default)."""

    text: str
    placeholder: tuple[int, int]

    @classmethod
    def from_text(cls, text: str, placeholder: str = "x") -> TargetPrompt:
        start = text.rfind(placeholder)
        if start < 0:
            raise InputError(f"placeholder {placeholder!r} not found in target prompt {text!r}")
        return cls(text, (start, start + len(placeholder)))


TARGET_PRESETS = {
    "paper": TargetPrompt.from_text(PAPER_TARGET),
    "repeat": TargetPrompt.from_text(REPEAT_TARGET),
    "toy": TargetPrompt.from_text(TOY_TARGET),
}


@dataclass(frozen=True)
class PatchscopeConfig:
    target: str | TargetPrompt = option(
        "auto",
        "target prompt(s): auto (paper where the vocabulary spells it, else toy), paper, "
        "repeat, toy (comma-separated), or a text with an x",
    )
    positions: tuple[str, ...] = POSITIONS
    layer_pairs: tuple[tuple[int, int], ...] | None = (
        None  # (source, target); default: the grid below
    )
    source_layers: tuple[int, ...] | str | None = option(
        None, "Patchscopes " + GRID_HELP, flag="--patchscope-source-layers"
    )
    target_layers: tuple[int, ...] | str | None = option(
        None, "Patchscopes " + GRID_HELP, flag="--patchscope-target-layers"
    )
    seeds: tuple[int, ...] = option((), "comma-separated sampling seeds (default: greedy)")
    temperature: float = 1.0
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt")
    batch_rows: int | None = option(
        None,
        "patched rows per forward (default: from the memory budget; Patchscopes: 512)",
        runtime=True,
    )
    progress: bool = runtime(False)


def spells(model: Model, text: str) -> bool:
    """Whether the model's tokenizer writes ``text`` without an unknown token."""
    unk = model.tokenizer.unk_token_id
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return unk is None or unk not in ids


def auto_target(model: Model) -> str:
    """``"paper"`` where the tokenizer can spell the paper's English prompt; else ``"toy"``
    (the word-level vocabularies of the toy models, which know none of its words)."""
    return "paper" if spells(model, PAPER_TARGET) else "toy"


def target_prompts(model: Model, target: str | TargetPrompt) -> list[tuple[str, TargetPrompt]]:
    """(name, prompt) of each target: a TargetPrompt ("custom"), preset names (comma-separated;
    "auto": ``auto_target``), or one custom text (commas and all)."""
    if isinstance(target, TargetPrompt):
        return [("custom", target)]
    names = [n.strip() for n in target.split(",") if n.strip()]
    if not names or not set(names) <= {"auto", *TARGET_PRESETS}:
        return [("custom", TargetPrompt.from_text(target))]
    auto = auto_target(model)
    names = list(dict.fromkeys(auto if n == "auto" else n for n in names))
    return [(n, TARGET_PRESETS[n]) for n in names]


def classify(text: str, names: dict[str, Sequence[str]]) -> str:
    """``"e1"``, ``"e2"``, ``"e3"`` or ``"other"``: the first entity (in that priority) with
    an alias in one of the paper's patterns; the end of the text counts as a space."""
    text = text + " "
    for entity in ENTITIES:
        if any(p.format(a) in text for a in names.get(entity, ()) for p in PATTERNS):
            return entity
    return "other"


def _pairs(model: Model, config: PatchscopeConfig) -> list[tuple[int, int]]:
    if config.layer_pairs is not None:
        for s, t in config.layer_pairs:
            model.check_layers([s, t])
        return list(config.layer_pairs)
    n = model.n_layers
    sources = parse_layers(config.source_layers, n) or range(n)
    targets = parse_layers(config.target_layers, n) or range(n)
    return [(s, t) for s in sources for t in targets]


@torch.no_grad()
def patchscope(
    model: Model, cases: Sequence[Case], config: PatchscopeConfig = PatchscopeConfig()
) -> pd.DataFrame:
    """One row per case x position x (source, target) layer pair x seed, for each target prompt."""
    frames = [
        _one_target(model, cases, config, name, prompt)
        for name, prompt in target_prompts(model, config.target)
    ]
    return pd.concat(frames, ignore_index=True).astype({"seed": "Int64"})


def _one_target(
    model: Model, cases: Sequence[Case], config: PatchscopeConfig, name: str, prompt: TargetPrompt
) -> pd.DataFrame:
    pairs = _pairs(model, config)
    batch_rows = config.batch_rows or 512
    target = tokenize_prompts(model, [prompt.text])
    slot = target.char_span_position(0, prompt.placeholder)
    if slot is None:
        raise InputError(f"the placeholder of {prompt.text!r} maps to no token")
    tail = target.tokens[0, slot:].tolist()  # placeholder onwards: read with the generation
    sources = sorted({s for s, _ in pairs})
    index = {s: i for i, s in enumerate(sources)}
    decoders: list[tuple[int | None, Sampler | None]] = [
        (seed, Sampler(seed, config.temperature)) for seed in config.seeds
    ] or [(None, None)]
    per_case = len(config.positions) * len(pairs)
    rows_out = []
    bar = tqdm(
        total=len(cases) * per_case * len(decoders),
        desc="patchscope",
        unit="run",
        disable=not config.progress,
    )
    for b in case_batches(model, cases, max(1, batch_rows // per_case), config.positions):
        batch = b.cases
        states = hidden_states_at(model, b.tok.tokens, b.tok.attention_mask, b.columns, sources)
        rows = [
            PatchRow(0, slot, t, (qi, pi, s))
            for qi in range(len(batch))
            for pi in range(len(config.positions))
            for s, t in pairs
        ]

        def values(chunk: Sequence[PatchRow]) -> torch.Tensor:
            return torch.stack([states[r.key[0], r.key[1], index[r.key[2]]] for r in chunk])

        for seed, sampler in decoders:

            def on_output(chunk: Sequence[PatchRow], out: GreedyOutput, seed=seed) -> None:
                for r, ids in zip(chunk, out.tokens.tolist()):
                    case = batch[r.key[0]]
                    text = model.tokenizer.decode(tail + ids, skip_special_tokens=True)
                    rows_out.append(
                        (
                            case.id,
                            config.positions[r.key[1]],
                            r.key[2],
                            r.layer,
                            seed,
                            text,
                            classify(text, case.names),
                            name,
                        )
                    )
                bar.update(len(chunk))

            generate_with_patches(
                model,
                target.tokens,
                target.attention_mask,
                rows,
                values,
                on_output,
                config.max_new_tokens,
                batch_rows,
                sampler,
            )
    bar.close()
    if not rows_out:
        return TABLE.empty()
    return pd.DataFrame(rows_out, columns=COLUMNS).astype({"seed": "Int64"})


def decoded_shares(scopes: pd.DataFrame) -> pd.DataFrame:
    """Share of runs decoded as e1 / e2 / e3 / other, per target prompt (if several) and
    position."""
    keys = [k for k in ("target", "position") if k in scopes]
    shares = scopes.groupby(keys)["decoded"].value_counts(normalize=True).unstack(fill_value=0.0)
    return shares.reindex(columns=[*ENTITIES, "other"], fill_value=0.0)


def reads_nothing(scopes: pd.DataFrame) -> bool:
    """True when the patched generation never depends on the source: every (case, position,
    target layer) gives one string whatever the source layer — Patchscopes then measures
    nothing on this model (as on the toy models at target layers >= 0)."""
    keys = [k for k in ("target", "id", "position", "target_layer", "seed") if k in scopes]
    groups = scopes.groupby(keys, dropna=False)["generation"].nunique()
    return bool(len(scopes)) and bool((groups == 1).all())


def patchscope_layers(scopes: pd.DataFrame) -> pd.DataFrame:
    """Per case: first-hop layer (e2 from t1), e2 decoded from t2, second-hop layer (e3 from t2);
    the minimum source layer over all target layers, target prompts and seeds."""

    return decoded_layers(scopes, lambda rows, entity: rows.decoded == entity, "source_layer")


def patchscope_heatmap(
    scopes: pd.DataFrame, position: str = "t1", entity: str = "e2", ids: Sequence[str] | None = None
) -> go.Figure:
    """Source layer (y) x target layer (x): % of cases decoded as ``entity`` from ``position``."""
    data = scopes[scopes.position == position]
    if ids is not None:
        data = data[data.id.isin(set(ids))]
    hit = (
        data.assign(hit=data.decoded == entity)
        .groupby(["source_layer", "target_layer"])["hit"]
        .mean()
    )
    grid = hit.unstack("target_layer") * 100
    fig = go.Figure(
        percent_heatmap(
            grid.values,
            [layer_name(c) for c in grid.columns],
            [layer_name(i) for i in grid.index],
        )
    )
    fig.update_layout(
        title=f"Patchscopes: {entity} decoded from {position}",
        xaxis_title="target layer",
        yaxis_title="source layer",
        width=560,
        height=520,
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def _run(context: Context, config: PatchscopeConfig) -> pd.DataFrame:
    """Resumable and shardable: parts of RUN_DIR/patchscope/, each with every target prompt's
    rows for its chunk of cases."""
    _pairs(context.model, config)  # a bad layer grid fails here, before any work
    return context.in_parts(
        "patchscope",
        lambda part: patchscope(context.model, part, config),
        config,
        f"patchscope ({config.target})",
    )


def _reads_nothing_on(model: Model) -> str | None:
    if auto_target(model) == "paper":
        return None
    return (
        "its vocabulary cannot spell the paper's target prompt (a toy model): every patched "
        "generation is the same string whatever the source layer; run `latent-hops "
        "patchscope` to see it"
    )


READS_NOTHING = (
    "Patchscopes reads nothing on this model: every patched generation is the same string whatever "
    "the source layer, so its 0% cells measure nothing"
)


def _summary(results: Results[PatchscopeConfig]) -> str:
    table = results.table
    text = "Patchscopes: share of runs decoded as each entity\n" + decoded_shares(table).to_string()
    return text + (f"\nwarning: {READS_NOTHING}" if reads_nothing(table) else "")


def _report(section: ReportInput) -> str:
    scopes = section.table
    warning = (
        f"<p class='note'><b>Warning: {html.escape(READS_NOTHING)}.</b></p>"
        if reads_nothing(scopes)
        else ""
    )
    figures = section.figure(patchscope_heatmap(scopes, "t1", "e2")) + section.figure(
        patchscope_heatmap(scopes, "t2", "e3")
    )
    return (
        warning + f"<div class='grid'>{figures}</div>" + section.html_table(decoded_shares(scopes))
    )


register(
    Analysis(
        name="patchscope",
        title="Patchscopes",
        order=50,
        aliases=("patchscopes",),
        help="Patchscopes: a source hidden state decoded by a target prompt (e1, e2, e3 or "
        "other) -> patchscope.parquet",
        config=PatchscopeConfig,
        schema=TABLE,
        run=_run,
        resumable=True,
        shardable=True,
        summary=_summary,
        report=_report,
        stage_measures=DECODED_MEASURES,
        stage_layers=lambda table, config: patchscope_layers(table).set_index("id"),
        demo_skip=_reads_nothing_on,
        note=lambda config: (
            "Patchscopes: the source hidden state is written into the target prompt's "
            f"placeholder (target: {config.target}) at the target layer; "
            f"{config.max_new_tokens} greedy tokens, classified with the paper's patterns. The "
            "table gives, per target prompt and position, the share of runs decoded as each "
            "entity."
        ),
    )
)
