"""Causal tracing of the hops (Meng et al. 2022, ROME): where does the model *use* e1?

e1's tokens are corrupted: their embedding output gets Gaussian noise of standard deviation
``noise_scale`` x sigma, where sigma is the standard deviation of the entries of e1's own
clean embedding output (ROME takes sigma over all subjects' embeddings; per case here, so a
shard or a resumed part computes the same). Then one clean activation is restored at a time
and the model's probability of the answer is read at the last position:

- ``resid``: the hidden state of one layer at one token;
- ``mlp_out`` / ``attn_out``: a window of ``trace_window`` blocks' MLP (attention) outputs at one
  token, centred on a block (clipped at the ends), as ROME does to separate the two.

The answer is e2 on the first-hop prompt ("the performer of Imagine is") and e3 on the
two-hop prompt; its probability is that of its best first token (the best over its aliases'
first tokens, as ranks are everywhere). The **indirect effect** of a restoration is
restored - corrupted probability, averaged over ``noise_samples`` noise draws (the same draws
for every restoration of a case, ``trace_noise``). Every token of the prompt is traced; each
row names the token's role (``token_role``) so maps of different prompts can be averaged.

**Stage measure** ``trace_peak_layer``: on the first-hop prompt, the layer whose hidden
state at t1 (e1's last token) recovers most of the answer's probability -- where the first
hop is computed at t1, causally (beside the decoding methods' resolution layers).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
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
from latent_hops.backend import EMBEDDINGS, Edit, Model, Site
from latent_hops.cases import Case
from latent_hops.errors import InputError
from latent_hops.patching import write_positions
from latent_hops.plots import layer_ticks
from latent_hops.positions import (
    GRID_HELP,
    TokenizedPrompts,
    answer_first_tokens,
    parse_layers,
    tokenize_prompts,
)
from latent_hops.queries import PROMPT_SUFFIX, TwoHopQuery, e1_span_in_composition, iter_queries
from latent_hops.tables import ID, POSITION, SKIP_REASON, Column, TableSchema

TracedPrompt = Literal["first_hop", "composition"]
TracedSite = Literal["resid", "mlp_out", "attn_out"]
PROMPTS: tuple[TracedPrompt, ...] = ("first_hop", "composition")
ANSWER = {"first_hop": "e2", "composition": "e3"}
SITES: tuple[TracedSite, ...] = ("resid", "mlp_out", "attn_out")
ROLES = ("before e1", "e1 first", "e1 middle", "t1", "after e1 first", "after e1", "t2")
"""Token roles, in prompt order (ROME's categories): e1's first, middle and last (t1)
tokens, the first token after e1, later ones, and the prompt's last token (t2)."""

TABLE = TableSchema(
    "causal_tracing.parquet",
    "a case x prompt x site x token x layer (one restoration)",
    (
        ID,
        Column("prompt", "str", "first_hop (its answer is e2) or composition (answer e3)"),
        Column(
            "site",
            "str",
            "resid: one hidden state restored; mlp_out / attn_out: a window of that "
            "sublayer's outputs restored",
        ),
        Column("token_index", "Int64", "the restored token's index in the prompt (BOS = 0)"),
        Column("token", "str", "the restored token's text"),
        Column("token_role", "str", "; ".join(ROLES) + " (t2 wins over the others)"),
        POSITION.described("t1 or t2 where the token is one of them (null: neither)"),
        Column(
            "hidden_layer",
            "Int64",
            "resid rows: the hidden-state layer restored, -1 = embeddings (null: a window)",
        ),
        Column(
            "window_center",
            "Int64",
            "mlp_out / attn_out rows: the centre block of the window restored (null: resid)",
        ),
        Column("clean_prob", "float", "the answer's probability without noise"),
        Column("corrupted_prob", "float", "with e1 corrupted, nothing restored (mean of draws)"),
        Column("restored_prob", "float", "with e1 corrupted and this restoration (mean of draws)"),
        Column("indirect_effect", "float", "restored_prob - corrupted_prob"),
        SKIP_REASON.described("why this case and prompt have no trace (null: none)"),
    ),
)


@dataclass(frozen=True)
class CausalTracingConfig:
    trace_prompts: tuple[TracedPrompt, ...] = option(
        PROMPTS, "comma-separated: first_hop (answer e2), composition (answer e3)"
    )
    trace_sites: tuple[TracedSite, ...] = option(
        ("resid",), "comma-separated: resid (hidden states), mlp_out, attn_out (windows)"
    )
    trace_layers: tuple[int, ...] | str | None = option(
        None, "layers (window centres) restored: " + GRID_HELP
    )
    trace_window: int = option(10, "blocks per mlp_out / attn_out window", minimum=1)
    noise_scale: float = option(
        3.0, "noise std in units of e1's embedding std (ROME: 3; 0: no corruption)", minimum=0
    )
    noise_samples: int = option(3, "noise draws per case, averaged", minimum=1)
    seed: int = 0
    batch_rows: int = runtime(128)  # restorations per forward pass
    progress: bool = runtime(False)


# ---------------------------------------------------------------------------- one prompt


@dataclass(frozen=True)
class TracedPromptInput:
    """One prompt of a case, tokenised, with e1's token columns and the answer's tokens."""

    id: str
    prompt: TracedPrompt
    text: str
    tok: TokenizedPrompts  # one prompt, unpadded: its columns are token indices
    e1_columns: list[int]
    answer_tokens: list[int]


def first_hop_e1_span(query: TwoHopQuery) -> tuple[int, int]:
    """Character span of e1 in the first-hop prompt, from the template (like
    ``queries.composition_spans``, never by searching)."""
    filled = " ".join(query.r1_template.format("\0").split())
    start = filled.index("\0")
    return start, start + len(query.e1_label)


def traced_prompt(
    model: Model, query: TwoHopQuery, prompt: TracedPrompt, suffix: str = PROMPT_SUFFIX
) -> TracedPromptInput | str:
    """The input of one trace, or why there is none."""
    if prompt == "first_hop":
        text, span = query.prompts(suffix)["first_hop"], first_hop_e1_span(query)
    else:
        text, found = query.composition_prompt(suffix), e1_span_in_composition(query, suffix)
        if isinstance(found, str):
            return found
        span = found
    tok = tokenize_prompts(model, [text])
    columns = tok.overlapping(0, span)
    if not columns:
        return f"no token overlaps e1's characters {span} in {text!r}"
    answers = answer_first_tokens(model, text, query.names(ANSWER[prompt]))
    if not answers:
        return f"{ANSWER[prompt]} has no first token"
    return TracedPromptInput(query.id, prompt, text, tok, columns, answers)


def trace_noise(
    key: str, samples: int, e1_tokens: int, d_model: int, std: float
) -> Float[torch.Tensor, "samples e1_tokens d_model"]:
    """The noise added to e1's embedding outputs: ``samples`` draws, fixed by ``key`` (drawn
    in float32 on the CPU from a generator seeded with the key's CRC-32: the same on any
    device, and for every restoration of a case)."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(samples, e1_tokens, d_model, generator=gen) * std


def noise_edit(
    e1_columns: Sequence[int], noise: Float[torch.Tensor, "rows e1_tokens d_model"]
) -> Edit:
    """An edit adding ``noise[r]`` to row r's embedding output at ``e1_columns``."""
    cols = torch.tensor(list(e1_columns))

    def add(resid: torch.Tensor) -> torch.Tensor:
        resid[:, cols.to(resid.device)] += noise.to(resid.device, resid.dtype)
        return resid

    return Edit(Site("resid", EMBEDDINGS), add)


def restore_edit(
    site: Site,
    rows: Sequence[int],
    columns: Sequence[int],
    values: Float[torch.Tensor, "rows d_model"],
) -> Edit:
    """An edit writing ``values[i]`` into row ``rows[i]`` of ``site`` at ``columns[i]``."""
    index = torch.tensor(list(rows))
    cols = torch.tensor(list(columns))

    def restore(act: torch.Tensor) -> torch.Tensor:
        part = write_positions(act[index.to(act.device)], cols, values)
        act[index.to(act.device)] = part
        return act

    return Edit(site, restore)


def window_blocks(center: int, window: int, n_layers: int) -> list[int]:
    """The ``window`` blocks centred on ``center`` (clipped at 0 and the last block)."""
    start = max(0, min(center - window // 2, n_layers - window))
    return list(range(start, min(n_layers, start + window)))


def _answer_prob(logits: torch.Tensor, answers: list[int]) -> torch.Tensor:
    return logits.float().softmax(-1)[:, answers].max(-1).values


def _role(i: int, e1: list[int], last: int) -> str:
    if i == last:
        return "t2"
    if i < e1[0]:
        return "before e1"
    if i == e1[-1]:
        return "t1"
    if i in e1:
        return "e1 first" if i == e1[0] else "e1 middle"
    return "after e1 first" if i == e1[-1] + 1 else "after e1"


@torch.no_grad()
def trace_prompt(
    model: Model, item: TracedPromptInput, layers: Sequence[int], config: CausalTracingConfig
) -> list[dict]:
    """The rows of one prompt's trace (module docstring): every restoration of every site
    at every token, batched ``config.batch_rows`` rows per forward pass."""
    tokens, mask = item.tok.tokens, item.tok.attention_mask
    n, n_layers = tokens.shape[1], model.n_layers
    blocks = sorted({b for c in layers for b in window_blocks(c, config.trace_window, n_layers)})
    wanted = [Site("resid", EMBEDDINGS)] + [
        Site(kind, layer)
        for kind in config.trace_sites
        for layer in (layers if kind == "resid" else blocks)
    ]
    wanted = list(dict.fromkeys(wanted))
    clean = model.read_sites(tokens, mask, torch.arange(n, device=tokens.device)[None], wanted)[0]
    column = {site: i for i, site in enumerate(wanted)}  # clean[:, column[site]]: [pos, d]
    embedded = clean[item.e1_columns, column[Site("resid", EMBEDDINGS)]].float()
    std = config.noise_scale * float(embedded.std(unbiased=False))
    noise = trace_noise(
        f"{config.seed}|{item.id}|{item.prompt}",
        config.noise_samples,
        len(item.e1_columns),
        model.d_model,
        std,
    )
    clean_prob = float(_answer_prob(model.last_logits(tokens, mask), item.answer_tokens)[0])

    # a restoration: (site kind, token column, layer or window centre); None = nothing restored
    restorations: list[tuple[str, int, int] | None] = [None] + [
        (kind, i, layer) for kind in config.trace_sites for i in range(n) for layer in layers
    ]
    jobs = [(r, s) for r in restorations for s in range(config.noise_samples)]
    probs = torch.empty(len(jobs))
    for start in range(0, len(jobs), config.batch_rows):
        chunk = jobs[start : start + config.batch_rows]
        edits = [noise_edit(item.e1_columns, noise[[s for _, s in chunk]])]
        by_site: dict[Site, list[tuple[int, int]]] = {}
        for row, (r, _) in enumerate(chunk):
            if r is None:
                continue
            kind, i, layer = r
            targets = (
                [layer] if kind == "resid" else window_blocks(layer, config.trace_window, n_layers)
            )
            for target in targets:
                by_site.setdefault(Site(kind, target), []).append((row, i))
        for site, hits in by_site.items():  # after the noise: a restored embedding wins
            index, cols = [h[0] for h in hits], [h[1] for h in hits]
            edits.append(restore_edit(site, index, cols, clean[cols, column[site]]))
        batch = tokens.expand(len(chunk), n)
        logits = model.last_logits(batch, mask.expand(len(chunk), n), edits)
        probs[start : start + len(chunk)] = _answer_prob(logits, item.answer_tokens).cpu()
    mean = probs.reshape(len(restorations), config.noise_samples).mean(1).tolist()
    corrupted = mean[0]
    text = [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    last = n - 1
    rows = []
    for r, restored in zip(restorations[1:], mean[1:]):
        assert r is not None
        kind, i, layer = r
        role = _role(i, item.e1_columns, last)
        rows.append(
            {"id": item.id, "prompt": item.prompt, "site": kind, "token_index": i,
             "token": text[i], "token_role": role,
             "position": role if role in ("t1", "t2") else None,
             "hidden_layer": layer if kind == "resid" else None,
             "window_center": None if kind == "resid" else layer,
             "clean_prob": clean_prob, "corrupted_prob": corrupted, "restored_prob": restored,
             "indirect_effect": restored - corrupted, "skip_reason": None}
        )  # fmt: skip
    return rows


def causal_trace(
    model: Model,
    queries: Sequence[TwoHopQuery],
    config: CausalTracingConfig | None = None,
) -> pd.DataFrame:
    """The causal-tracing table of ``queries`` (module docstring): one row per case x
    prompt x site x token x layer; a case and prompt that cannot be traced get one row with
    its ``skip_reason``."""
    config = config or CausalTracingConfig()
    unknown = (set(config.trace_prompts) - set(PROMPTS)) | (set(config.trace_sites) - set(SITES))
    if unknown:
        raise InputError(f"unknown prompts/sites {sorted(unknown)}: use {PROMPTS} and {SITES}")
    layers = _layers(model, config)
    records: list[dict] = []
    bar = tqdm(total=len(queries), desc="causal tracing", unit="case", disable=not config.progress)
    for query in queries:
        for prompt in config.trace_prompts:
            item = traced_prompt(model, query, prompt)
            if isinstance(item, str):
                records.append(dict.fromkeys(TABLE.names) | {
                    "id": query.id, "prompt": prompt, "skip_reason": item})  # fmt: skip
                continue
            records += trace_prompt(model, item, layers, config)
        bar.update(1)
    bar.close()
    if not records:
        return TABLE.empty()
    frame = pd.DataFrame(records, columns=TABLE.names)
    ints = {c: "Int64" for c in ("token_index", "hidden_layer", "window_center")}
    floats = {c: "float64" for c in ("clean_prob", "corrupted_prob", "restored_prob")}
    return frame.astype(ints | floats | {"indirect_effect": "float64"})


def _layers(model: Model, config: CausalTracingConfig) -> list[int]:
    """The traced layers (window centres for the sublayer sites): blocks 0..n-1 by default;
    the embeddings (-1) only for resid, and only when asked for."""
    layers = list(parse_layers(config.trace_layers, model.n_layers) or range(model.n_layers))
    if EMBEDDINGS in layers and set(config.trace_sites) - {"resid"}:
        raise InputError("mlp_out / attn_out windows are centred on blocks 0 and up, not -1")
    return layers


def _run(context: Context, config: CausalTracingConfig) -> pd.DataFrame:
    """Resumable and shardable: parts of RUN_DIR/causal_tracing/ by case."""
    _layers(context.model, config)  # a bad layer grid fails before any work
    by_id = {q.id: q for q in iter_queries(context.queries)}

    def compute(part: Sequence[Case]) -> pd.DataFrame:
        return causal_trace(context.model, [by_id[c.id] for c in part], config)

    return context.in_parts("causal_tracing", compute, config, "causal tracing")


# ---------------------------------------------------------------------------- results


def peak_layers(table: pd.DataFrame, config: CausalTracingConfig) -> pd.DataFrame:
    """Per case: the hidden-state layer at t1 of the first-hop prompt with the largest
    indirect effect (``trace_peak_layer``; NaN when no restoration there raises the
    answer's probability, or the case has no trace)."""
    at = table[(table.prompt == "first_hop") & (table.site == "resid") & (table.position == "t1")]
    at = at[at.indirect_effect > 0]
    best = at.loc[at.groupby("id")["indirect_effect"].idxmax(), ["id", "hidden_layer"]]
    peak = best.set_index("id")["hidden_layer"].astype(float).rename("trace_peak_layer")
    return peak.reindex(table["id"].unique()).rename_axis("id").to_frame()


def mean_effects(table: pd.DataFrame, evaluation: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean indirect effect per prompt x site x token role x layer (and subset, when an
    evaluation is given), with the number of cases."""
    done = table[table.skip_reason.isna()].copy()
    done["layer"] = done.hidden_layer.fillna(done.window_center).astype(int)
    keys = ["prompt", "site", "token_role", "layer"]
    if evaluation is not None:
        done = done.merge(evaluation[["id", "subset"]], on="id", how="left")
        keys = ["subset", *keys]
    per_case = done.groupby([*keys, "id"], observed=True)["indirect_effect"].mean()
    out = per_case.groupby(level=keys, observed=True).agg(["mean", "count"])
    return out.rename(columns={"mean": "indirect_effect", "count": "cases"}).reset_index()


def trace_heatmaps(table: pd.DataFrame, evaluation: pd.DataFrame | None = None) -> go.Figure:
    """ROME's figure: mean indirect effect (percentage points of the answer's probability)
    per token role x layer, one panel per prompt x site (x subset)."""
    means = mean_effects(table, evaluation)
    panel_keys = ["prompt", "site"] + (["subset"] if evaluation is not None else [])
    panels = list(means.groupby(panel_keys).groups) if len(means) else [("first_hop", "resid")]
    titles = [" / ".join(map(str, key)) for key in panels]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles, shared_yaxes=True)
    for col, key in enumerate(panels, start=1):
        d = means[(means[panel_keys] == pd.Series(key, index=panel_keys)).all(axis=1)]
        roles = [r for r in ROLES if r in set(d.token_role)]
        grid = d.pivot_table(index="token_role", columns="layer", values="indirect_effect")
        grid = grid.reindex(roles)
        fig.add_trace(
            go.Heatmap(
                z=100 * grid.to_numpy(),
                x=list(grid.columns),
                y=roles,
                coloraxis="coloraxis",
                hovertemplate="layer %{x}, %{y}: %{z:.1f} points<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(**layer_ticks(list(grid.columns)), row=1, col=col)
    fig.update_layout(
        title="Causal tracing: answer probability recovered by restoring one state "
        "(indirect effect, percentage points; mean over cases)",
        coloraxis={"colorscale": "Purples", "colorbar": {"title": "points"}},
        width=max(520, 360 * len(panels)),
        height=420,
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def _summary(results: Results[CausalTracingConfig]) -> str:
    table = results.table
    done = table[table.skip_reason.isna()]
    if done.empty:
        return "causal tracing: no case could be traced (see skip_reason)"
    means = mean_effects(done)
    resid = means[(means.site == "resid") & means.token_role.isin(["t1", "t2"])]
    shown = resid.pivot_table(
        index="layer", columns=["prompt", "token_role"], values="indirect_effect"
    )
    peaks = peak_layers(table, results.config)["trace_peak_layer"]
    return (
        f"causal tracing: {done.id.nunique()} cases; mean indirect effect (points of the "
        "answer's probability) of restoring the hidden state at t1 / t2:\n"
        + (100 * shown).round(1).to_string()
        + f"\nfirst-hop peak layer at t1: median {peaks.median()} over {peaks.notna().sum()} "
        "cases with a positive effect"
    )


def _report(section: ReportInput[CausalTracingConfig]) -> str:
    table = section.table
    done = table[table.skip_reason.isna()]
    per_case = done.drop_duplicates(["id", "prompt"])[
        ["id", "prompt", "clean_prob", "corrupted_prob"]
    ]
    baseline = per_case.groupby("prompt")[["clean_prob", "corrupted_prob"]].agg(["mean", "count"])
    peaks = peak_layers(table, section.config).dropna().reset_index()
    peaks = peaks.merge(section.evaluation[["id", "subset"]], on="id", how="left")
    peak_stats = peaks.groupby("subset")["trace_peak_layer"].describe()[
        ["count", "50%", "25%", "75%"]
    ]
    skipped = table[table.skip_reason.notna()].groupby(["prompt", "skip_reason"]).size()
    return (
        section.figure(trace_heatmaps(table, section.evaluation))
        + "<p class='note'>Answer probability without noise and with e1 corrupted (no "
        "restoration): the room the restorations can recover.</p>"
        + section.html_table(baseline.reset_index())
        + "<p class='note'>Layer of the peak indirect effect at t1 on the first-hop prompt "
        "(cases with a positive effect):</p>"
        + section.html_table(peak_stats.reset_index())
        + "<p class='note'>Cases and prompts without a trace:</p>"
        + section.html_table(skipped.rename("cases").reset_index())
    )


register(
    Analysis(
        name="causal_tracing",
        title="Causal tracing",
        order=38,
        help="e1 corrupted with noise, one clean state restored at a time (every token x "
        "layer; MLP/attention windows): the answer's recovered probability, on the first-hop "
        "and the two-hop prompt -> causal_tracing.parquet",
        config=CausalTracingConfig,
        schema=TABLE,
        run=_run,
        resumable=True,
        shardable=True,
        stage_measures=(
            StageMeasure(
                "trace_peak_layer",
                "first_hop",
                "no restoration at t1 raises the answer's probability",
                "tracing",
            ),
        ),
        stage_layers=peak_layers,
        summary=_summary,
        report=_report,
        uses_positions=lambda config: ("t1", "t2"),
        demo_skip=lambda model: (
            "a forward pass per restored state (every token x layer x draw): run `latent-hops "
            "causal_tracing` for it"
        ),
        note=lambda config: (
            f"Causal tracing: e1's embeddings get Gaussian noise of {config.noise_scale} x "
            f"their std ({config.noise_samples} draws); restoring one clean "
            f"{'/'.join(config.trace_sites)} state at a time "
            f"(windows of {config.trace_window} blocks for sublayers); indirect effect = recovered "
            "probability of e2 (first-hop prompt) / e3 (two-hop prompt)."
        ),
    )
)
