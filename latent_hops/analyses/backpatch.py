"""Back-patching (reference §4): a later layer's hidden state written back into an earlier
layer of the same run, at the same position (t1 or t2), on the prompt pass only.

A cell (s, t, kind) writes, at target layer t, the clean run's hidden state of source
layer s (``kind="back"``: s > t, the paper's patch; ``"forward"``: s < t, a control) or a
random direction with the norm of that source state (``"random"``: s > t, a control).
Success = an e3 alias in the greedy generation (10 tokens).

Two engines give identical generations (tests check it cell by cell):
- ``sweep_naive``: per query and cell, a hooked generation (the test oracle);
- ``sweep``: the fast engine. The clean hidden states are read at the needed positions
  only; the clean forward is then walked block by block with a KV cache, and at each
  target layer t every (query, position, source) row is patched into the clean residual of
  layer t and resumed from block t + 1 with ``start_at_layer`` — layers <= t are never
  recomputed, their keys/values are shared from the clean run
  (``patching.generate_with_patches``, which Patchscopes uses too).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from latent_hops import backend, plots
from latent_hops.analysis import Analysis, Column, Context, ReportInput, option, register, runtime
from latent_hops.backend import EMBEDDINGS, Model, Site, check_layers
from latent_hops.cases import POSITIONS, Case, case_batches
from latent_hops.cases import prepare_cases as cases_for
from latent_hops.config import config_from_dict
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, decode, is_correct
from latent_hops.patching import PatchRow, generate_with_patches, hidden_states_at, patch_hook
from latent_hops.positions import GRID_HELP, parse_layers, tokenize_prompts
from latent_hops.queries import PROMPT_SUFFIX
from latent_hops.ranks import best_rank
from latent_hops.rundir import done_ids, write_table, write_text

KINDS = ("back", "forward", "random")
Kind = Literal["back", "forward", "random"]
Position = Literal["t1", "t2"]
TABLE = (
    Column("id", "query id"),
    Column("position", "t1 or t2: where the state is read and written"),
    Column("source_layer", "layer whose clean hidden state is written (-1 = embeddings)"),
    Column("target_layer", "layer whose hidden state it replaces"),
    Column(
        "kind",
        "back (s > t), forward (s < t, control) or random (s > t, random direction, control)",
    ),
    Column("generation", "greedy generation of the patched run ('' when screened)"),
    Column("success", "an e3 alias in the generation"),
    Column("e3_rank", "rank of e3's best first token at the first step (-1 = no known token)"),
    Column("e3_logprob", "its log-probability"),
    Column("screened", "not decoded: first-step e3 rank beyond --screen (counts as no success)"),
)
RESULT_COLUMNS = [c.name for c in TABLE]


@dataclass(frozen=True)
class Cell:
    source: int
    target: int
    kind: str


CPU_MEMORY_BUDGET_MB = 1024.0


@dataclass(frozen=True)
class BackpatchConfig:
    positions: tuple[Position, ...] = option(POSITIONS, "comma-separated: t1,t2")
    kinds: tuple[Kind, ...] = option(KINDS, "comma-separated: back,forward,random")
    include_embeddings: bool = option(False, "layer -1 (embeddings) as source and target")
    cells: tuple[Cell, ...] | None = None  # explicit cells instead of all pairs of ``kinds``
    source_layers: tuple[int, ...] | str | None = option(None, GRID_HELP)  # None: all
    target_layers: tuple[int, ...] | str | None = option(None, GRID_HELP)
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "greedy tokens generated per prompt")
    memory_budget_mb: float | None = option(
        None,
        "memory for the fast engine's batches (default: half the free CUDA memory; 1024 on CPU)",
        runtime=True,
    )
    batch_rows: int | None = option(
        None,
        "patched rows per forward (default: from the memory budget; Patchscopes: 512)",
        runtime=True,
    )
    seed: int = 0  # random-direction control
    screen: int | None = option(
        None,
        "decode only cells whose first-step e3 rank is <= K (the rest: screened, not successes)",
    )
    suffix: str = PROMPT_SUFFIX
    progress: bool = runtime(False)


def all_cells(model: Model, config: BackpatchConfig) -> list[Cell]:
    """The cells of a sweep: every (s, t) pair of each kind, or the configured ones."""
    first = EMBEDDINGS if config.include_embeddings else 0
    n = backend.n_layers(model)
    layers = range(first, n)
    if config.cells is not None:
        for c in config.cells:
            check_layers(model, [c.source, c.target])
        return list(config.cells)
    unknown = set(config.kinds) - set(KINDS)
    if unknown:
        raise InputError(f"unknown patch kinds {sorted(unknown)}; use {KINDS}")
    sources = parse_layers(config.source_layers, n, first) or layers
    targets = parse_layers(config.target_layers, n, first) or layers
    return [
        Cell(s, t, kind)
        for kind in config.kinds
        for t in targets
        for s in sources
        if (s < t if kind == "forward" else s > t)
    ]


def prepare_cases(
    model: Model, table: pd.DataFrame, config: BackpatchConfig = BackpatchConfig()
) -> tuple[list[Case], pd.DataFrame]:
    """Cases for the queries of ``table`` at the configured positions, and the skipped ones."""
    return cases_for(model, table, config.positions, config.suffix, config.max_new_tokens)


def random_direction(
    case_id: str, position: str, cell: Cell, like: torch.Tensor, seed: int
) -> torch.Tensor:
    """A random direction with the norm of ``like``, fixed by (query, position, cell, seed)."""
    key = f"{seed}|{case_id}|{position}|{cell.source}|{cell.target}".encode()
    gen = torch.Generator().manual_seed(zlib.crc32(key))
    v = torch.randn(like.shape[-1], generator=gen, dtype=torch.float32).to(
        like.device
    )  # same draw on any device
    return (v * (like.float().norm() / v.norm())).to(like.dtype)


def _patch_value(
    case: Case, position: str, cell: Cell, source_state: torch.Tensor, seed: int
) -> torch.Tensor:
    if cell.kind == "random":
        return random_direction(case.id, position, cell, source_state, seed)
    return source_state


def _screened(rank: int, screen: int | None) -> bool:
    """A cell whose first-step e3 rank is beyond ``screen`` is not decoded (no e3 token:
    rank -1)."""
    return screen is not None and not 0 <= rank <= screen


def _records(
    model: Model,
    rows: Sequence[tuple[Case, str, Cell]],
    out: backend.GreedyOutput,
    screen: int | None = None,
) -> list[dict]:
    logprobs = out.first_logits.log_softmax(-1)
    records = []
    for i, (case, position, cell) in enumerate(rows):
        rank, logprob = (float(x) for x in best_rank(logprobs[i], case.first_tokens["e3"]))
        screened = _screened(int(rank), screen)
        text = "" if screened else decode(model, out.tokens[i].tolist())
        records.append(
            {
                "id": case.id,
                "position": position,
                "source_layer": cell.source,
                "target_layer": cell.target,
                "kind": cell.kind,
                "generation": text,
                "success": is_correct(text, case.e3_names),
                "e3_rank": int(rank),
                "e3_logprob": logprob,
                "screened": screened,
            }
        )
    return records


def _frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=RESULT_COLUMNS)


# ---------------------------------------------------------------------------- engines


@torch.no_grad()
def sweep_naive(
    model: Model, cases: Sequence[Case], config: BackpatchConfig = BackpatchConfig()
) -> pd.DataFrame:
    """The reference: one hooked generation per query, position and cell."""
    if config.screen is not None:
        raise InputError(
            "the first-token screen is a feature of the fast engine (sweep), not of the reference"
        )
    cells = all_cells(model, config)
    records = []
    for case in tqdm(cases, desc="backpatch (naive)", disable=not config.progress):
        tok = tokenize_prompts(model, [case.prompt])
        layers = sorted({c.source for c in cells})
        cols = torch.tensor([[case.positions[p] for p in config.positions]])
        states = backend.read_sites(
            model, tok.tokens, tok.attention_mask, cols, [Site("resid", s) for s in layers]
        )
        for pi, position in enumerate(config.positions):
            p = case.positions[position]
            for cell in cells:
                value = _patch_value(
                    case, position, cell, states[0, pi, layers.index(cell.source)], config.seed
                )
                hook = patch_hook(cell.target, torch.tensor([p]), value[None])
                out = backend.greedy_generate(
                    model, tok.tokens, tok.attention_mask, config.max_new_tokens, [hook]
                )
                records += _records(model, [(case, position, cell)], out)
    return _frame(records)


def rows_per_batch(model: Model, seq_len: int, config: BackpatchConfig) -> int:
    """Rows of the fast engine per forward pass, from the memory budget (or fixed)."""
    if config.batch_rows is not None:
        if config.batch_rows < 1:
            raise InputError(f"batch_rows must be >= 1, got {config.batch_rows}")
        return config.batch_rows
    bytes_per_row = backend.bytes_per_patched_row(model, seq_len, config.max_new_tokens)
    budget = config.memory_budget_mb
    if budget is None:
        free = backend.free_memory_mb(backend.device_of(model))
        budget = CPU_MEMORY_BUDGET_MB if free is None else free / 2
    return max(1, int(budget * 2**20 // bytes_per_row))


@torch.no_grad()
def sweep(
    model: Model, cases: Sequence[Case], config: BackpatchConfig = BackpatchConfig()
) -> pd.DataFrame:
    """The fast engine; same rows and generations as ``sweep_naive`` (see module docstring)."""
    cells = all_cells(model, config)
    if not cases or not cells:
        return _frame([])
    layers = sorted({c.source for c in cells} | {c.target for c in cells})
    layer_index = {layer: i for i, layer in enumerate(layers)}
    n_targets = len({c.target for c in cells})
    lengths = [
        len(backend.tokenizer_of(model)(c.prompt, add_special_tokens=False)["input_ids"])
        for c in cases
    ]
    max_rows = rows_per_batch(model, max(lengths) + 1, config)
    per_case = len(config.positions) * -(-len(cells) // n_targets)  # rows per case and target layer
    records: list[dict] = []
    bar = tqdm(
        total=len(cases) * len(config.positions) * len(cells),
        desc="backpatch",
        unit="cell",
        disable=not config.progress,
    )
    for b in case_batches(model, cases, max(1, max_rows // per_case), config.positions, lengths):
        batch, tok, cols = b.cases, b.tok, b.columns
        states = hidden_states_at(
            model, tok.tokens, tok.attention_mask, cols, layers
        )  # [q, P, layers, d]
        rows = [
            PatchRow(qi, int(cols[qi, pi]), cell.target, (pi, cell))
            for qi in range(len(batch))
            for pi in range(len(config.positions))
            for cell in cells
        ]

        def values(chunk: Sequence[PatchRow]) -> torch.Tensor:
            return torch.stack(
                [
                    _patch_value(
                        batch[r.base],
                        config.positions[r.key[0]],
                        r.key[1],
                        states[r.base, r.key[0], layer_index[r.key[1].source]],
                        config.seed,
                    )
                    for r in chunk
                ]
            )

        def on_output(chunk: Sequence[PatchRow], out: backend.GreedyOutput) -> None:
            records.extend(
                _records(
                    model,
                    [(batch[r.base], config.positions[r.key[0]], r.key[1]) for r in chunk],
                    out,
                    config.screen,
                )
            )
            bar.update(len(chunk))

        def keep(chunk: Sequence[PatchRow], logits: torch.Tensor) -> torch.Tensor:
            logprobs = logits.float().log_softmax(-1)
            return torch.tensor(
                [
                    not _screened(
                        int(best_rank(logprobs[i], batch[r.base].first_tokens["e3"])[0]),
                        config.screen,
                    )
                    for i, r in enumerate(chunk)
                ],
                device=logits.device,
            )

        generate_with_patches(
            model,
            tok.tokens,
            tok.attention_mask,
            rows,
            values,
            on_output,
            config.max_new_tokens,
            max_rows,
            keep=None if config.screen is None else keep,
        )
    bar.close()
    order = {c.id: i for i, c in enumerate(cases)}
    kind_order = {k: i for i, k in enumerate(KINDS)}
    frame = _frame(records).assign(
        _q=lambda f: f["id"].map(order), _k=lambda f: f["kind"].map(kind_order)
    )
    frame = frame.sort_values(["_q", "position", "_k", "target_layer", "source_layer"])
    return frame.drop(columns=["_q", "_k"]).reset_index(drop=True)


# ---------------------------------------------------------------------------- summaries


def bootstrap_ci(
    values: Iterable[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(list(values), dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def with_labels(results: pd.DataFrame, evaluation: pd.DataFrame) -> pd.DataFrame:
    """Attach each query's ``subset`` and ``split`` from the evaluation table."""
    return results.merge(evaluation[["id", "subset", "split"]], on="id", how="left")


GROUP = ["split", "subset", "position", "kind"]


def _with_all_splits(labelled: pd.DataFrame) -> pd.DataFrame:
    """The rows once per own split and once more under split ``all``."""
    if (labelled["split"] == "all").all():
        return labelled
    return pd.concat([labelled, labelled.assign(split="all")], ignore_index=True)


def oracle_rates(labelled: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Share of cases with at least one successful cell, per split x subset x position x kind,
    with bootstrap 95% intervals. A "split" of ``all`` pools the dataset's splits.

    ``cells`` is the number of cells each case had: an oracle over a coarser layer grid
    (fewer cells) is not comparable to one over all cells."""
    data = _with_all_splits(labelled)
    per_case = (
        data.groupby(GROUP + ["id"])
        .agg(success=("success", "any"), cells=("success", "size"))
        .reset_index()
    )
    rows = []
    for key, g in per_case.groupby(GROUP):
        low, high = bootstrap_ci(g["success"], seed=seed)
        rows.append(
            dict(
                zip(GROUP, key),
                cases=len(g),
                cells=int(g["cells"].max()),
                rescued=int(g["success"].sum()),
                rate=float(g["success"].mean()),
                ci_low=low,
                ci_high=high,
            )
        )
    return pd.DataFrame(
        rows, columns=GROUP + ["cases", "cells", "rescued", "rate", "ci_low", "ci_high"]
    )


def cell_rates(labelled: pd.DataFrame) -> pd.DataFrame:
    """Success rate of each cell, per split x subset x position x kind (heatmap input)."""
    g = _with_all_splits(labelled).groupby(GROUP + ["source_layer", "target_layer"])["success"]
    return g.agg(cases="size", successes="sum", rate="mean").reset_index()


def success_samples(labelled: pd.DataFrame, cells: int = 5, per_cell: int = 2) -> pd.DataFrame:
    """What counted as a rescue: for the ``cells`` cells with most rescued incorrect cases per
    position x kind, up to ``per_cell`` of their successful generations (the alias rule is a
    substring match, so "two continents: Africa and South America" counts for South America)."""
    wins = labelled[(labelled.subset == "incorrect") & labelled.success]
    key = ["position", "kind", "source_layer", "target_layer"]
    counts = wins.groupby(key).size().rename("rescued").reset_index()
    top = (
        counts.sort_values("rescued", ascending=False, kind="stable")
        .groupby(["position", "kind"])
        .head(cells)
    )
    sample = wins.merge(top, on=key).groupby(key, sort=False).head(per_cell)
    columns = key + ["rescued", "id", "generation"]
    return (
        sample[columns]
        .sort_values(key[:2] + ["rescued"], ascending=[True, True, False])
        .reset_index(drop=True)
    )


def non_oracle(labelled: pd.DataFrame, train_fraction: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """Beyond the paper's oracle: pick the single best (position, s, t) of each kind on a
    train part of the incorrect cases, then measure on the held-out incorrect cases the
    share rescued (accuracy gain) and on the correct cases the share broken (damage)."""
    rows = []
    for split, data in _with_all_splits(labelled).groupby("split"):
        inc_ids = np.array(sorted(data.loc[data.subset == "incorrect", "id"].unique()))
        np.random.default_rng(seed).shuffle(inc_ids)
        n_train = int(round(train_fraction * len(inc_ids)))
        train, held = set(inc_ids[:n_train]), set(inc_ids[n_train:])
        for kind, d in data.groupby("kind"):
            key = ["position", "source_layer", "target_layer"]
            tr = d[d.id.isin(train)]
            if tr.empty:
                continue
            best = tr.groupby(key)["success"].mean().idxmax()
            cell = d.set_index(key).loc[best].reset_index()
            gain = cell.loc[cell.id.isin(held), "success"].astype(float)
            damage = 1.0 - cell.loc[cell.subset == "correct", "success"].astype(float)
            g_lo, g_hi = bootstrap_ci(gain, seed=seed)
            d_lo, d_hi = bootstrap_ci(damage, seed=seed)
            rows.append(
                {
                    "split": split,
                    "kind": kind,
                    "position": best[0],
                    "source_layer": int(best[1]),
                    "target_layer": int(best[2]),
                    "train_rate": float(tr.groupby(key)["success"].mean().max()),
                    "train_cases": len(train),
                    "heldout_incorrect": len(gain),
                    "gain": float(gain.mean()) if len(gain) else float("nan"),
                    "gain_ci_low": g_lo,
                    "gain_ci_high": g_hi,
                    "correct_cases": len(damage),
                    "damage": float(damage.mean()) if len(damage) else float("nan"),
                    "damage_ci_low": d_lo,
                    "damage_ci_high": d_hi,
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- the analysis


def _run(context: Context, config: BackpatchConfig) -> pd.DataFrame:
    """The sweep, resumable: chunks of cases written as parts of RUN_DIR/backpatch/."""
    all_cells(context.model, config)  # a bad layer grid fails here, before any work
    return context.in_parts(
        context.folder("backpatch"),
        lambda part: sweep(context.model, part, config),
        context.made_by("backpatch", config),
        "backpatch",
    )


def summarize(
    run_dir: Path,
    results: pd.DataFrame,
    evaluation: pd.DataFrame,
    made_by: dict | None = None,
    skipped: pd.DataFrame | None = None,
) -> str:
    """The back-patching summary of ``results``: RUN_DIR/backpatch_cells.parquet,
    backpatch_summary.json and backpatch_heatmaps.html, and the text the CLI prints. One
    function for a run, ``merge`` and the report's inputs."""
    labelled = with_labels(results, evaluation)
    oracle, cells, beyond = oracle_rates(labelled), cell_rates(labelled), non_oracle(labelled)
    write_table(cells, run_dir / "backpatch_cells.parquet", made_by)
    made_by = made_by or {}
    summary = {
        "model": made_by.get("model"),
        "dataset": made_by.get("dataset"),
        "made_by": made_by,
        "cases": int(results["id"].nunique()),
        "rows": len(results),
        "skipped": [] if skipped is None else skipped.to_dict("records"),
        "oracle": oracle.to_dict("records"),
        "non_oracle": beyond.to_dict("records"),
    }
    write_text(run_dir / "backpatch_summary.json", json.dumps(summary, indent=1, default=str))
    figures = [
        plots.backpatch_heatmap(cells, subset, position, oracle=oracle)
        for subset in ("incorrect", "correct")
        if subset in set(oracle.subset)
        for position in sorted(set(oracle.position))
    ]
    plots.save_html(
        figures,
        run_dir / "backpatch_heatmaps.html",
        "latent_hops: back-patching",
        _note(config_from_dict(BackpatchConfig, made_by.get("config", {}))),
    )
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        text = oracle[oracle.split == "all"].to_string(index=False)
        if not beyond.empty:
            text += "\n" + beyond[beyond.split == "all"].to_string(index=False)
    return text


def _summary(context: Context, results: pd.DataFrame, config: BackpatchConfig) -> str:
    if context.run_dir is None:
        return ""
    text = summarize(
        context.run_dir,
        results,
        context.evaluation,
        context.made_by("backpatch", config),
        context.skipped,
    )
    cases, held = results["id"].nunique(), len(done_ids(context.folder("backpatch")))
    if held > cases:
        text += (
            f"\nsummarising the {cases} requested cases; {context.folder('backpatch')} holds "
            f"{held} "
            "(`latent-hops merge` summarises them all)"
        )
    return text


def _report(section: ReportInput) -> str:
    labelled = with_labels(section.table, section.evaluation)
    oracle, cells = oracle_rates(labelled), cell_rates(labelled)
    splits = sorted(set(oracle.split) - {"all"}) or ["all"]  # per split: ID and OOD failures differ
    heatmaps = [
        section.figure(plots.backpatch_heatmap(cells, subset, position, split, oracle=oracle))
        for split in splits
        for subset in ("incorrect", "correct")
        if subset in set(oracle.subset)
        for position in sorted(set(oracle.position))
        if len(cells.query("split == @split and subset == @subset"))
    ]
    shown = oracle.assign(**{c: 100 * oracle[c] for c in ("rate", "ci_low", "ci_high")}).rename(
        columns={
            "rate": "rate %",
            "ci_low": "ci_low %",
            "ci_high": "ci_high %",
            "rescued": "successes",
        }
    )
    return (
        "<div class='grid'>"
        + "".join(heatmaps)
        + "</div><p class='note'>Oracle rates; successes = cases "
        "rescued (incorrect) or kept correct (correct).</p>"
        + section.html_table(shown)
        + "<h3>Without the oracle</h3><p class='note'>The best (position, s, t) of each kind is "
        "chosen on half "
        "of the incorrect cases; gain = share of the other half rescued, damage = share of correct "
        "cases broken "
        "(bootstrap 95% intervals).</p>"
        + section.html_table(non_oracle(labelled))
        + "<h3>What counted as a rescue</h3><p class='note'>Successful generations of the cells "
        "that rescue "
        "most incorrect cases (per position and kind): success is an alias substring of the "
        "generation, as in "
        "the paper, so read what counted.</p>" + section.html_table(success_samples(labelled))
    )


def _note(config: BackpatchConfig) -> str:
    return (
        "Back-patch (s → t, s > t): the clean hidden state of layer s at "
        f"{', '.join(config.positions)} "
        "replaces that of layer t, on the prompt pass only; success = e3 in the greedy generation "
        f"({config.max_new_tokens} tokens). Colour: % of cases a cell rescues (incorrect) or keeps "
        "correct "
        "(correct). The oracle rate (≥ 1 cell succeeds) is shown next to the controls run "
        f"({', '.join(k for k in config.kinds if k != 'back') or 'none'}) with as many cells: "
        "forward patches "
        "(s < t) and a random direction with the source state's norm."
        + (
            f" Layer grid: sources {config.source_layers}, targets {config.target_layers}."
            if config.source_layers or config.target_layers
            else ""
        )
    )


register(
    Analysis(
        name="backpatch",
        title="Back-patching",
        order=10,
        help="back-patching sweep -> backpatch.parquet + summary + heatmaps",
        config=BackpatchConfig,
        columns=TABLE,
        run=_run,
        resumable=True,
        shardable=True,
        summary=_summary,
        report=_report,
        note=_note,
    )
)
