"""The ``latent-hops`` command line: it only wires the library's functions to files.

    latent-hops evaluate  --model toy --dataset toy --out runs/toy
    latent-hops backpatch --model toy --dataset toy --out runs/toy --positions t1,t2 --subset incorrect
    latent-hops logit-lens | project | knockout | patchscope | probe --out runs/toy
    latent-hops stages    --model toy --dataset toy --out runs/toy
    latent-hops report    runs/toy
    latent-hops demo      --out runs/demo

Every subcommand writes Parquet into the run directory (``--out``) and reuses what is
already there (``evaluation.parquet`` and the per-analysis tables ``stages`` needs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from latent_hops import backpatch as bp
from latent_hops import plots
from latent_hops.backend import DEFAULT_MAX_CONTEXT
from latent_hops.cases import prepare_cases
from latent_hops.errors import InputError
from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
from latent_hops.knockout import EDGE_PRESETS, KnockoutConfig, attention_knockout
from latent_hops.logit_lens import logit_lens
from latent_hops.models import TOY_CHECKPOINTS, TOY_SPEC, load_model
from latent_hops.patchscopes import (
    TARGET_PRESETS,
    PatchscopeConfig,
    TargetPrompt,
    decoded_shares,
    patchscope,
    reads_nothing,
)
from latent_hops.positions import parse_layers
from latent_hops.probe import cross_validated_probe, probe_accuracy
from latent_hops.projection import sublayer_projection
from latent_hops.queries import SHIPPED_DATASETS, DatasetError, load_dataset, shipped_dataset_path
from latent_hops.report import build_report
from latent_hops.rundir import (
    check_run_dir,
    done_ids,
    in_shard,
    merge_parts,
    parse_shard,
    record_run,
    run_in_parts,
    write_table,
)
from latent_hops.stages import empty_stage_notes, stage_medians, stage_table


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=TOY_SPEC,
                        help="'toy', 'toy-gpt2', 'smollm2-135m', 'gemma3-270m', a .gguf file, a local HF "
                        "checkpoint dir, or a TransformerLens name")
    parser.add_argument("--dataset", default="toy", help="'toy', 'world', a two_hop.csv, or .parquet/.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="run directory (required: flag or config)")
    parser.add_argument("--config", type=Path, default=None, help="TOML file whose keys mirror these flags")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of input errors too (or LATENT_HOPS_DEBUG=1)")
    parser.add_argument("--shard", default=None, help="i/n: this process takes shard i of n of the queries")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    parser.add_argument("--n-devices", type=int, default=1,
                        help="split the model's blocks over this many GPUs (TransformerLens n_devices)")
    parser.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                        help="cap on the context TransformerLens allocates masks for (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N queries")
    parser.add_argument("--split", default=None, help="use only queries of this split (e.g. test_id)")


def _analysis(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subset", default="all", help="incorrect, correct, or all (= correct,incorrect)")
    parser.add_argument("--max-cases", type=int, default=None, help="at most N cases per split x subset")


COUNT_FLAGS = {"batch_size": 1, "limit": 1, "max_cases": 0, "chunk_cases": 1, "probe_train": 0, "window": 0,
               "screen": 0, "batch_rows": 1}
"""Count flags and their minimum: a negative --max-cases is an error, not pandas' head(-1)."""


def _check_counts(args) -> None:
    for name, low in COUNT_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


class Session:
    """What one command shares: the queries, the model and the run directory."""

    def __init__(self, args):
        if args.out is None:
            raise InputError("--out RUN_DIR is required (as a flag or in the --config file)")
        _check_counts(args)
        self.args = args
        check_run_dir(args.out)  # before the model loads: a bad --out should cost nothing
        self.shard = parse_shard(args.shard)
        if self.shard[1] > 1 and args.command != "backpatch":
            raise InputError(f"--shard splits the back-patching sweep only (`latent-hops backpatch`), not "
                             f"`{args.command}`: run it once, unsharded")
        self.table = self._queries()
        self.model = load_model(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                                n_devices=args.n_devices)
        self._cases: dict = {}

    def _queries(self) -> pd.DataFrame:
        table = load_dataset(self.args.dataset)
        if self.args.split is not None:
            table = table[table["split"] == self.args.split]
            if table.empty:
                raise DatasetError(f"no queries with split {self.args.split!r}")
        if self.args.limit is not None:
            table = table.iloc[: self.args.limit]
        return table.reset_index(drop=True)

    def path(self, name: str) -> Path:
        return self.args.out / name

    def evaluation(self, fresh: bool = False) -> pd.DataFrame:
        """``evaluation.parquet`` when it covers the queries, else (or when ``fresh``) a new
        evaluation, which replaces the old table only once it is complete (atomic write)."""
        path = self.path("evaluation.parquet")
        if path.is_file() and not fresh:
            done = pd.read_parquet(path)
            if set(self.table["id"]) <= set(done["id"]):
                return done[done["id"].isin(set(self.table["id"]))].reset_index(drop=True)
        if self.shard[1] > 1:  # n shards must pick their cases from one evaluation, made once
            raise InputError(f"--shard {self.args.shard}: {path} does not cover these queries; run "
                             f"`latent-hops evaluate` with the same --model/--dataset/--out first (unsharded)")
        start = time.time()
        result = evaluate(self.model, self.table, EvaluationConfig(batch_size=self.args.batch_size, progress=True))
        write_table(result, path)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
            print(summarize(result).to_string())
        print(f"evaluated {len(result)} queries in {time.time() - start:.1f}s -> {path}")
        return result

    def chosen(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(queries, evaluation) of the analysed cases: subset filter, then --max-cases."""
        evaluation = self.evaluation()
        subsets = ("correct", "incorrect") if self.args.subset == "all" else _csv(self.args.subset)
        ev = evaluation[evaluation["subset"].isin(subsets)]
        if self.args.max_cases is not None:
            ev = ev.groupby(["split", "subset"], sort=False).head(self.args.max_cases)
        ev = ev[[in_shard(i, self.shard) for i in ev["id"]]]
        if ev.empty:
            raise DatasetError(f"no queries in subsets {subsets}; see {self.path('evaluation.parquet')}")
        return self.table[self.table["id"].isin(set(ev["id"]))], evaluation

    def cases(self, positions=("t1", "t2")):
        """Prepared cases (computed once per positions), skipped queries, evaluation."""
        key = tuple(positions)
        if key not in self._cases:
            table, evaluation = self.chosen()
            cases, skipped = prepare_cases(self.model, table, positions)
            if len(skipped):
                print(f"skipped {len(skipped)} queries (positions unresolved); first: {skipped.reason.iloc[0]}")
            self._cases[key] = (cases, skipped, evaluation)
        return self._cases[key]

    def save(self, frame: pd.DataFrame, name: str, seconds: float) -> pd.DataFrame:
        write_table(frame, self.path(name))
        print(f"{name}: {len(frame)} rows in {seconds:.1f}s -> {self.path(name)}")
        return frame


def cmd_evaluate(args) -> pd.DataFrame:
    return Session(args).evaluation(fresh=True)  # a failed run leaves the old table in place


def _fingerprint(session: Session, config) -> dict:
    """What determines a part's rows: model, dtype and the analysis configuration."""
    keep = {k: v for k, v in vars(config).items() if k not in ("progress", "batch_rows", "memory_budget_mb")}
    return {"model": session.args.model, "dataset": session.args.dataset, "dtype": session.args.dtype, "config": keep}


def run_backpatch(session: Session) -> pd.DataFrame:
    """The sweep, resumable: cases are computed in chunks written as parts of RUN_DIR/backpatch/."""
    args = session.args
    first = -1 if args.include_embeddings else 0
    config = bp.BackpatchConfig(positions=_csv(args.positions), kinds=_csv(args.kinds),
                                include_embeddings=args.include_embeddings, batch_rows=args.batch_rows,
                                memory_budget_mb=args.memory_budget_mb, screen=args.screen,
                                **_grid(session, args.backpatch_source_layers, args.backpatch_target_layers, first))
    cases, skipped, evaluation = session.cases(config.positions)
    start = time.time()
    bar = tqdm(total=len(cases), desc="backpatch", unit="case")
    run_in_parts(session.path("backpatch"), cases, args.chunk_cases,
                 lambda part: (bp.sweep(session.model, part, config), bar.update(len(part)))[0],
                 on_skip=lambda n: bar.update(n) if n else None, config=_fingerprint(session, config))
    bar.close()
    print(f"backpatch: {len(cases)} cases in {time.time() - start:.1f}s")
    if session.shard[1] > 1:  # a shard writes its parts only; tables and summaries come from merge
        print(f"shard {args.shard}: parts written to {session.path('backpatch')}; when every shard is done: "
              f"latent-hops merge {args.out}")
        return merge_parts(session.path("backpatch"), order=[c.id for c in cases])
    return merge_backpatch(session.args.out, evaluation, skipped, {"model": args.model, "dataset": args.dataset},
                           ids=[c.id for c in cases])


def _grid(session: Session, sources, targets, first: int = 0) -> dict:
    """``source_layers`` / ``target_layers`` of an analysis config from the grid flags."""
    n = session.model.cfg.n_layers
    return {"source_layers": parse_layers(sources, n, first), "target_layers": parse_layers(targets, n, first)}


def merge_backpatch(run_dir: Path, evaluation: pd.DataFrame, skipped: pd.DataFrame | None = None,
                    meta: dict | None = None, ids: list[str] | None = None) -> pd.DataFrame:
    """backpatch.parquet, cells, summary and heatmaps from the parts in RUN_DIR/backpatch/:
    of the cases ``ids`` (the request), or every part (``merge``)."""
    results = merge_parts(run_dir / "backpatch", order=list(evaluation["id"]) if ids is None else ids)
    held = len(done_ids(run_dir / "backpatch")) if ids is not None else 0
    if held > results["id"].nunique():
        print(f"summarising the {results['id'].nunique()} requested cases; {run_dir / 'backpatch'} holds {held} "
              "(`latent-hops merge` summarises them all)")
    write_table(results, run_dir / "backpatch.parquet")
    labelled = bp.with_labels(results, evaluation)
    oracle, cells, non_oracle = bp.oracle_rates(labelled), bp.cell_rates(labelled), bp.non_oracle(labelled)
    write_table(cells, run_dir / "backpatch_cells.parquet")
    if meta is None:  # merge: what made the parts (recorded beside them; the manifest may lack an
        parts_config = run_dir / "backpatch" / "config.json"  # interrupted run's entry)
        meta = json.loads(parts_config.read_text()) if parts_config.is_file() else {}
    summary = {"model": meta.get("model"), "dataset": meta.get("dataset"), "cases": int(results["id"].nunique()),
               "rows": len(results), "skipped": [] if skipped is None else skipped.to_dict("records"),
               "oracle": oracle.to_dict("records"), "non_oracle": non_oracle.to_dict("records")}
    (run_dir / "backpatch_summary.json").write_text(json.dumps(summary, indent=1))
    positions = sorted(set(oracle.position))
    figures = [plots.backpatch_heatmap(cells, subset, position, oracle=oracle)
               for subset in ("incorrect", "correct") if subset in set(oracle.subset) for position in positions]
    plots.save_html(figures, run_dir / "backpatch_heatmaps.html", "latent_hops back-patching")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(oracle[oracle.split == "all"].to_string(index=False))
        if not non_oracle.empty:
            print(non_oracle[non_oracle.split == "all"].to_string(index=False))
    print(f"backpatch.parquet: {len(results)} rows -> {run_dir}")
    return results


def cmd_merge(args) -> pd.DataFrame:
    """Merge the parts that every --shard process wrote, then summarise (no model needed)."""
    path = args.run_dir / "evaluation.parquet"
    if not path.is_file():
        raise InputError(f"{args.run_dir}: no result parts to merge (no evaluation.parquet; is it a run directory?)")
    return merge_backpatch(args.run_dir, pd.read_parquet(path))


def run_logit_lens(session: Session) -> pd.DataFrame:
    cases, _, _ = session.cases()
    start = time.time()
    return session.save(logit_lens(session.model, cases, batch_size=session.args.batch_size), "logit_lens.parquet",
                        time.time() - start)


def run_projection(session: Session) -> pd.DataFrame:
    cases, _, _ = session.cases()
    start = time.time()
    return session.save(sublayer_projection(session.model, cases, batch_size=session.args.batch_size),
                        "projection.parquet", time.time() - start)


def run_knockout(session: Session) -> pd.DataFrame:
    args = session.args
    cases, _, _ = session.cases()
    config = KnockoutConfig(presets=_csv(args.presets), window=args.window, batch_size=args.batch_size, progress=True)
    start = time.time()
    return session.save(attention_knockout(session.model, cases, config), "knockout.parquet", time.time() - start)


def _target(model: str, name: str) -> TargetPrompt:
    if name == "auto":
        return TARGET_PRESETS["toy" if model in TOY_CHECKPOINTS else "paper"]
    return TARGET_PRESETS[name] if name in TARGET_PRESETS else TargetPrompt.from_text(name)


def run_patchscope(session: Session) -> pd.DataFrame:
    """Patchscopes with each target prompt of --target (resumable, one folder per prompt)."""
    args = session.args
    cases, _, _ = session.cases()
    presets = _csv(args.target)  # "paper,repeat"; a custom prompt text (commas and all) is one target
    names = list(presets) if set(presets) <= {"auto", *TARGET_PRESETS} else [args.target]
    start = time.time()
    frames = []
    for i, name in enumerate(names):
        config = PatchscopeConfig(target=_target(args.model, name), seeds=tuple(int(s) for s in _csv(args.seeds)),
                                  batch_rows=args.batch_rows or 512,
                                  **_grid(session, args.patchscope_source_layers, args.patchscope_target_layers))
        folder = session.path("patchscope" if i == 0 else f"patchscope-{i}")
        bar = tqdm(total=len(cases), desc=f"patchscope ({name})", unit="case")
        run_in_parts(folder, cases, args.chunk_cases,  # resumable, like back-patching
                     lambda part: (patchscope(session.model, part, config), bar.update(len(part)))[0],
                     on_skip=lambda n: bar.update(n) if n else None, config=_fingerprint(session, config))
        bar.close()
        frames.append(merge_parts(folder, order=[c.id for c in cases]).assign(target=name))
    merged = pd.concat(frames, ignore_index=True)
    with pd.option_context("display.width", 200, "display.precision", 3):
        print("Patchscopes: share of runs decoded as each entity\n" + decoded_shares(merged).to_string())
    if reads_nothing(merged):
        print("warning: Patchscopes reads nothing on this model: every patched generation is the same whatever "
              "the source layer (see the report's note)")
    return session.save(merged, "patchscope.parquet", time.time() - start)


PROBE_TARGETS = (("e2", "t1"), ("e2", "t2"), ("e3", "t2"))


def run_probe(session: Session) -> pd.DataFrame:
    """Cross-validated linear probes, split by entity (``latent_hops.probe``): the analysed
    cases are scored; up to --probe-train other queries join the training folds."""
    cases, _, _ = session.cases()
    analysed = {c.id for c in cases}
    others = session.table[~session.table["id"].isin(analysed)].iloc[: session.args.probe_train]
    pool, _ = prepare_cases(session.model, others) if len(others) else ([], None)
    start = time.time()
    probed = pd.concat([cross_validated_probe(session.model, cases, pool, e, p) for e, p in PROBE_TARGETS],
                       ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        acc = probe_accuracy(probed)
        table = acc.pivot_table(index="layer", columns=["entity", "position"], values=["accuracy", "control"])
        print(f"probe accuracy vs shuffled-target control, % of {len(cases)} cases ({probed.grouping.iloc[0]}):")
        print((100 * table).round(0).astype(int).to_string())
    return session.save(probed, "probe.parquet", time.time() - start)


def run_stages(session: Session) -> pd.DataFrame:
    """All analyses the stage table needs (each reused from the run directory if there)."""
    wanted = {c.id for c in session.cases()[0]}

    def load_or_run(name: str, run) -> pd.DataFrame:
        """The table in the run directory if it covers the analysed cases, else a fresh run."""
        path = session.path(name)
        if path.is_file():
            done = pd.read_parquet(path)
            if wanted <= set(done["id"]):
                print(f"reusing {path}")
                return done[done["id"].isin(wanted)]
        return run(session)

    skip = set(_csv(session.args.skip))
    unknown = skip - set(STAGE_ANALYSES)
    if unknown:
        raise InputError(f"--skip: unknown analyses {sorted(unknown)}; choose from {', '.join(STAGE_ANALYSES)}")
    tables = {name: None if name in skip else load_or_run(f"{name.replace('-', '_')}.parquet", run)
              for name, run in STAGE_ANALYSES.items()}
    if skip:
        print(f"skipped: {', '.join(sorted(skip))} (their stage columns are empty)")
    stages = stage_table(session.evaluation(), tables["logit-lens"], tables["projection"], tables["knockout"],
                         tables["patchscope"], tables["probe"])
    stages.to_parquet(session.path("stages.parquet"), index=False)
    medians = stage_medians(stages)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(medians.to_string())
    for note in empty_stage_notes(stages, skip):
        print(f"note: {note}")
    figures = [plots.stage_boxplot(stages, method) for method in stages["method"].unique()]
    figures.append(plots.resolution_curves(stages))
    plots.save_html(figures, session.path("stages.html"), "latent_hops stages")
    print(f"stages -> {session.path('stages.parquet')}")
    return stages


STAGE_ANALYSES = {"logit-lens": run_logit_lens, "projection": run_projection, "knockout": run_knockout,
                  "patchscope": run_patchscope, "probe": run_probe}
"""The analyses ``stages`` runs (or reuses), by the name ``--skip`` takes."""


def cmd_report(args) -> Path:
    path = build_report(args.run_dir)
    print(f"report -> {path}")
    return path


def cmd_demo(args) -> None:
    """The whole pipeline (default: the shipped toy model): evaluate, back-patch, stages, report."""
    if args.skip == "auto":  # do not spend time on a measure known to read nothing on the model
        args.skip = "patchscope" if args.model in TOY_CHECKPOINTS else ""
        if args.skip:
            print("demo: skipping Patchscopes: on the toy models it reads nothing (every patched generation is the "
                  "same string whatever the source layer); run `latent-hops patchscope` to see it")
    session = Session(args)
    session.evaluation()
    run_backpatch(session)
    run_stages(session)
    print(f"\nreport: {build_report(args.out)} (tables: {args.out}/*.parquet)")


def _backpatch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positions", default="t1,t2", help="comma-separated: t1,t2")
    p.add_argument("--kinds", default=",".join(bp.KINDS), help="back,forward,random")
    p.add_argument("--include-embeddings", action="store_true", help="layer -1 (embeddings) as source/target")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="memory for the fast engine's batches (default: half the free CUDA memory; 1024 on CPU)")
    p.add_argument("--screen", type=int, default=None, metavar="K",
                   help="decode only cells whose first-step e3 rank is <= K (the rest: screened, not successes)")
    p.add_argument("--source-layers", dest="backpatch_source_layers", default=None, help=GRID_HELP)
    p.add_argument("--target-layers", dest="backpatch_target_layers", default=None, help=GRID_HELP)


GRID_HELP = "layer grid: all (default), '0,3,7', a range 'a:b:k', or 'every:k' (+ the last layer)"


def _stages_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip", default="", help="comma-separated analyses not to run: " + ",".join(
        ["logit-lens", "projection", "knockout", "patchscope", "probe"]) + " (demo: 'auto' skips what reads "
        "nothing on the model: Patchscopes on the toys)")


def _resume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-cases", type=int, default=50, help="cases per resumable part of the sweep")


def _batch_rows_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-rows", type=int, default=None, help="patched rows per forward (default: from budget)")


def _knockout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", default="last_to_t1", help=f"knockout edges: {','.join(EDGE_PRESETS)}")
    p.add_argument("--window", type=int, default=3, help="knockout window half-width k")


def _patchscope_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="auto",
                   help="target prompt(s): auto, paper, repeat, toy (comma-separated), or a text with an x")
    p.add_argument("--seeds", default="", help="comma-separated sampling seeds (default: greedy)")
    p.add_argument("--patchscope-source-layers", default=None, help="Patchscopes " + GRID_HELP)
    p.add_argument("--patchscope-target-layers", default=None, help="Patchscopes " + GRID_HELP)


def _probe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe-train", type=int, default=2000,
                   help="queries beside the analysed cases that join the probes' training folds")


# name -> (function, help, option groups beyond the common ones)
COMMANDS = {
    "evaluate": (cmd_evaluate, "hop accuracies and subsets -> evaluation.parquet", ()),
    "backpatch": (lambda a: run_backpatch(Session(a)), "back-patching sweep -> backpatch.parquet + summary + heatmaps",
                  (_analysis, _backpatch_options, _batch_rows_option, _resume_options)),
    "logit-lens": (lambda a: run_logit_lens(Session(a)), "logit lens at t1/t2 -> logit_lens.parquet", (_analysis,)),
    "project": (lambda a: run_projection(Session(a)), "sublayer projection at t2 -> projection.parquet", (_analysis,)),
    "knockout": (lambda a: run_knockout(Session(a)), "attention knockout -> knockout.parquet",
                 (_analysis, _knockout_options)),
    "patchscope": (lambda a: run_patchscope(Session(a)), "Patchscopes -> patchscope.parquet",
                   (_analysis, _patchscope_options, _batch_rows_option, _resume_options)),
    "probe": (lambda a: run_probe(Session(a)), "linear probes (e2 at t1/t2, e3 at t2) -> probe.parquet",
              (_analysis, _probe_options)),
    "stages": (lambda a: run_stages(Session(a)), "all stage analyses -> stages.parquet + stages.html",
               (_analysis, _knockout_options, _patchscope_options, _probe_options, _batch_rows_option,
                _resume_options, _stages_options)),
    "demo": (cmd_demo, "the whole pipeline on the shipped toy model",
             (_analysis, _backpatch_options, _knockout_options, _patchscope_options, _probe_options,
              _batch_rows_option, _resume_options, _stages_options)),
}


def build_parser() -> argparse.ArgumentParser:
    from latent_hops import __version__

    parser = argparse.ArgumentParser(prog="latent-hops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"latent-hops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="RUN_DIR/report.html: one self-contained page of the run's results")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("merge", help="merge the back-patching parts of all --shard processes in RUN_DIR")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_merge)
    for name, (func, help, groups) in COMMANDS.items():
        p = sub.add_parser(name, help=help)
        _common(p)
        for group in groups:
            group(p)
        p.set_defaults(func=func)
    sub.choices["demo"].set_defaults(max_cases=60, skip="auto")  # per split x subset
    return parser


def _config_value(path: Path, action: argparse.Action, value):
    """A config file's value as its flag would parse it; lists stand for comma-separated flags."""
    key = next((o[2:] for o in action.option_strings if o.startswith("--")), action.dest)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise InputError(f"config {path}: key {key!r} expects true or false, got {value!r}")
        return value
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if value is None:
        return value
    kind: Any = action.type or str
    try:
        return kind(value)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise InputError(f"config {path}: key {key!r} expects {name}, got {value!r}") from None


def _with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` TOML file supplies defaults (flags given still win)."""
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if path is None:
        return args
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"config {path}: {err}") from None
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    sub = commands[args.command]

    def flags(p: argparse.ArgumentParser) -> dict[str, str]:  # a key is a long flag without its dashes
        return {o[2:].replace("-", "_"): a.dest for a in p._actions for o in a.option_strings if o.startswith("--")}

    dests, anywhere = flags(sub), {k for p in commands.values() for k in flags(p)}
    unknown = sorted(k for k in values if k.replace("-", "_") not in anywhere)
    if unknown:
        raise InputError(f"config {path}: unknown keys {unknown} (no command takes them)")
    # one file can serve several commands: keys of other commands are left to them
    values = {dests[k.replace("-", "_")]: v for k, v in values.items() if k.replace("-", "_") in dests}
    for action in sub._actions:
        if action.dest in values:
            values[action.dest] = _config_value(path, action, values[action.dest])
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    started = time.time()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("LATENT_HOPS_DEBUG") == "1"
    try:
        args = _with_config(parser, argv)
        args.func(args)
    except InputError as err:  # the user can fix it: one line, naming the input
        if debug:
            traceback.print_exc()
        print(f"latent-hops: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(locals().get("args"), "out", None)
        where = f" in {out}" if out else ""
        print(f"\nlatent-hops: interrupted; finished parts are saved{where}: run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 -- our bug, not the user's input: show it whole
        traceback.print_exc()
        print("latent-hops: internal error: this is a bug in latent_hops, not in your input; please report it "
              "with the command line and the traceback above", file=sys.stderr)
        return 1
    out = getattr(args, "out", None)
    if out is not None and args.command != "report":
        dataset = shipped_dataset_path(args.dataset) if args.dataset in SHIPPED_DATASETS else Path(args.dataset)
        config = {k: v for k, v in vars(args).items() if k != "func"}
        record_run(out, args.command, config, dataset, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
