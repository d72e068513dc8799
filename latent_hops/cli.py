"""The ``latent-hops`` command line: it only wires the library's functions to files.

    latent-hops evaluate  --model toy --dataset toy --out runs/toy
    latent-hops backpatch --model toy --out runs/toy --positions t1,t2 --subset incorrect
    latent-hops logit-lens | projection | knockout | patchscope | probe | attention --out runs/toy
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

from latent_hops import backend
from latent_hops.analysis import Analysis, Context, analyses, get
from latent_hops.cases import prepare_cases
from latent_hops.config import (
    Option,
    config_from_dict,
    config_from_options,
    options,
    provenance_config,
)
from latent_hops.errors import InputError
from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
from latent_hops.executors import (
    EXECUTORS,
    INPUT_ERROR,
    ExecutorConfig,
    run_all,
    shard_commands,
    worker_command,
)
from latent_hops.models import TOY_CHECKPOINTS, TOY_SPEC, load_model
from latent_hops.queries import SHIPPED_DATASETS, DatasetError, load_dataset, shipped_dataset_path
from latent_hops.report import build_report
from latent_hops.rundir import (
    check_run_dir,
    file_hash,
    in_shard,
    merge_parts,
    parse_shard,
    record_run,
    remove_stale_temp,
    reusable_table,
    write_table,
)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=TOY_SPEC,
        help="'toy', 'toy-gpt2', 'smollm2-135m', 'gemma3-270m', a .gguf file, a local HF "
        "checkpoint dir, or a TransformerLens name (default: %(default)s)",
    )
    parser.add_argument(
        "--dataset",
        default="toy",
        help="'toy', 'world', a two_hop.csv, or .parquet/.jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (required: flag or config)"
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML file whose keys mirror these flags"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of input errors too (or LATENT_HOPS_DEBUG=1)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="i/n: this process takes shard i of n of the cases (sweeps "
        f"that can be sharded: {', '.join(a.name for a in analyses() if a.shardable)}; then "
        "`latent-hops merge RUN_DIR`)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *backend.BACKENDS),
        help="TransformerLens model class: hooked (HookedTransformer, TL 3.x), bridge "
        "(TransformerBridge, TL 4); auto picks hooked on TL 3.x, bridge on TL 4 (default auto)",
    )
    parser.add_argument(
        "--n-devices",
        type=int,
        default=1,
        help="split the model's blocks over this many GPUs (TransformerLens n_devices)",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        default=backend.DEFAULT_MAX_CONTEXT,
        help="cap on the context TransformerLens allocates masks for (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="prompts per forward pass (default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N queries")
    parser.add_argument(
        "--split", default=None, help="use only queries of this split (e.g. test_id)"
    )


def _selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subset", default="all", help="incorrect, correct, or all (= correct,incorrect)"
    )
    parser.add_argument(
        "--max-cases", type=int, default=None, help="at most N cases per split x subset"
    )


def _resumable(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-cases",
        type=int,
        default=50,
        help="cases per resumable part (default: %(default)s)",
    )


def _executor(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "running shards on several workers (then merged; see README, 'Sweeps on clusters')"
    )
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local processes, a Ray cluster (RAY_ADDRESS, or a local one), or a SLURM job "
        "array via submitit (options: the --config file's [slurm] table) (default: local)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="shards, run at once; 1 with --executor local = this process (default: 1)",
    )
    group.add_argument("--gpus-per-worker", type=float, default=0.0, help="(default: 0)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="(default: 1)")
    group.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="times a lost worker's shard is started again (default: 3)",
    )
    group.add_argument(
        "--no-wait",
        action="store_true",
        help="slurm: submit the array and exit; `latent-hops merge RUN_DIR` when it is done",
    )
    group.add_argument("--evaluation-only", action="store_true", help=argparse.SUPPRESS)


def _add_options(parser: argparse.ArgumentParser, config_types: list[type]) -> None:
    """The options of ``config_types``' fields; one flag shared by several configs must mean
    the same (same type and default), else building the parser fails (tests build it)."""
    seen: dict[str, Option] = {}
    for config_type in config_types:
        for opt in options(config_type):
            if opt.flag in seen:
                if (seen[opt.flag].kind, seen[opt.flag].default) != (opt.kind, opt.default):
                    raise ValueError(
                        f"{opt.flag} means two things in {config_type.__name__} and another config"
                    )
                continue
            seen[opt.flag] = opt
            default = (
                ",".join(map(str, opt.default)) if isinstance(opt.default, tuple) else opt.default
            )
            if opt.is_flag:
                parser.add_argument(
                    opt.flag, dest=opt.dest, action="store_true", default=opt.default, help=opt.help
                )
            else:
                parser.add_argument(
                    opt.flag,
                    dest=opt.dest,
                    default=opt.default,
                    type=opt.parse,
                    help=f"{opt.help} (default: {default})",
                )


COUNT_FLAGS = {
    "batch_size": 1,
    "limit": 1,
    "max_cases": 0,
    "chunk_cases": 1,
    "probe_train": 0,
    "window": 0,
    "screen": 0,
    "batch_rows": 1,
    "max_new_tokens": 1,
    "onset_k": 0,
}
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
        shardable = [a.name for a in analyses() if a.shardable]
        if self.shard[1] > 1 and args.command not in shardable:
            raise InputError(
                f"--shard splits only the sweeps {', '.join(shardable)}, not `{args.command}`: "
                "run it once, unsharded"
            )
        self.table = self._queries()
        self.model = load_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            max_context=args.max_context,
            n_devices=args.n_devices,
            backend=args.backend,
        )
        dataset = (
            shipped_dataset_path(args.dataset)
            if args.dataset in SHIPPED_DATASETS
            else Path(args.dataset)
        )
        self.identity = {
            "model": args.model,
            "weights_sha256": backend.weights_fingerprint(self.model),
            "backend": backend.backend_of(self.model),
            "dataset": args.dataset,
            "dataset_sha256": file_hash(dataset),
            "latent_hops": _version(),
        }
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
        """``evaluation.parquet`` when it covers the queries and was made by this model on this
        dataset, else (or when ``fresh``) a new evaluation, which replaces the old table only
        once it is complete (atomic write)."""
        path = self.path("evaluation.parquet")
        config = config_from_options(
            EvaluationConfig, vars(self.args), batch_size=self.args.batch_size, progress=True
        )
        made_by = {
            **self.identity,
            "analysis": "evaluate",
            "config": provenance_config(config),
        }
        done = None if fresh else reusable_table(path, made_by, set(self.table["id"]))
        if done is not None:
            return done
        if self.shard[1] > 1:  # n shards must pick their cases from one evaluation, made once
            raise InputError(
                f"--shard {self.args.shard}: {path} does not cover these queries (or was made by "
                "another model); run `latent-hops evaluate` with the same --model/--dataset/--out "
                "first (unsharded)"
            )
        start = time.time()
        result = evaluate(self.model, self.table, config)
        write_table(result, path, made_by)
        with pd.option_context(
            "display.width", 200, "display.max_columns", 20, "display.precision", 3
        ):
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
            raise DatasetError(
                f"no queries in subsets {subsets}; see {self.path('evaluation.parquet')}"
            )
        return self.table[self.table["id"].isin(set(ev["id"]))], evaluation

    def cases(self, positions=("t1", "t2")):
        """Prepared cases (computed once per positions), skipped queries, evaluation."""
        key = tuple(positions)
        if key not in self._cases:
            table, evaluation = self.chosen()
            cases, skipped = prepare_cases(self.model, table, positions)
            if len(skipped):
                print(
                    f"skipped {len(skipped)} queries (positions unresolved); first: "
                    f"{skipped.reason.iloc[0]}"
                )
            self._cases[key] = (cases, skipped, evaluation)
        return self._cases[key]

    def context(self, names: list[str], positions=("t1", "t2")) -> Context:
        """The context of analyses ``names`` (and those they use) with configs from the flags."""
        cases, skipped, evaluation = self.cases(positions)
        configs = {
            a.name: config_from_options(
                a.config, vars(self.args), batch_size=self.args.batch_size, progress=True
            )
            for a in _with_inputs(names)
        }
        return Context(
            self.model,
            cases,
            evaluation,
            self.table,
            self.identity,
            self.args.out,
            configs,
            self.args.batch_size,
            getattr(self.args, "chunk_cases", 50),
            progress=True,
            skipped=skipped,
        )


def _version() -> str:
    from latent_hops import __version__

    return __version__


def _with_inputs(names: list[str]) -> list[Analysis]:
    """The analyses ``names`` and those their runs use (``Analysis.inputs``)."""
    out = [get(n) for n in names]
    return out + [a for n in names for a in get(n).inputs() if a not in out]


def run_analysis(session: Session, name: str) -> pd.DataFrame:
    """Run analysis ``name`` on the session's cases, write its table (with what made it),
    print its summary."""
    analysis = get(name)
    config = config_from_options(
        analysis.config, vars(session.args), batch_size=session.args.batch_size, progress=True
    )
    context = session.context([name], analysis.uses_positions(config))
    start = time.time()
    if session.shard[1] > 1:  # a shard writes its parts only; tables and summaries come from merge
        analysis.run(context, config)
        print(
            f"shard {session.args.shard}: parts written to {context.folder(name)}; when every "
            "shard is done: "
            f"latent-hops merge {session.args.out}"
        )
        return pd.DataFrame()
    table = context.table(name, fresh=True)
    if analysis.summary is not None:
        print(analysis.summary(context, table, config))
    print(
        f"{analysis.table_file}: {len(table)} rows in {time.time() - start:.1f}s -> "
        f"{session.path(analysis.table_file)}"
    )
    return table


def cmd_analysis(args, name: str) -> pd.DataFrame | None:
    """One analysis command: in this process, or its shards on an executor (``--workers``)."""
    if getattr(args, "evaluation_only", False):  # the first task of a distributed run
        Session(args).evaluation()
        return None
    if getattr(args, "executor", "local") != "local" or getattr(args, "workers", 1) > 1:
        return run_distributed(args, name)
    return run_analysis(Session(args), name)


def run_distributed(args, name: str) -> pd.DataFrame | None:
    """Analysis ``name`` as ``--workers`` shards on ``--executor``: first the evaluation (one
    task; reused when the run directory has it), then the shards, then ``merge``."""
    if args.shard is not None:
        raise InputError("--shard with --executor/--workers: the executor makes the shards")
    if not get(name).shardable:
        raise InputError(f"`{name}` cannot be sharded; run it without --executor/--workers")
    if args.out is None:
        raise InputError("--out RUN_DIR is required (as a flag or in the --config file)")
    check_run_dir(args.out)
    config = ExecutorConfig(
        args.executor,
        args.workers,
        args.gpus_per_worker,
        args.cpus_per_worker,
        args.max_retries,
        not args.no_wait,
        getattr(args, "slurm", {}),
    )
    start = time.time()
    evaluation = [[*worker_command(args.argv, config), "--evaluation-only"]]
    stages = [evaluation, shard_commands(args.argv, config)]
    bar = tqdm(total=config.workers, desc=f"{name} shards ({config.executor})", unit="shard")
    try:
        results = run_all(stages, config, args.out, bar.update)
    except Exception as err:  # a worker's input error is the user's to fix: one line, exit 2
        text = str(err)
        if INPUT_ERROR in text:
            start = max(text.find("`latent-hops"), 0)
            raise InputError(f"a worker failed: {text[start:].splitlines()[0]}") from None
        raise
    finally:
        bar.close()
    if results is None:
        print(f"submitted; when the jobs are done: latent-hops merge {args.out}")
        return None
    remove_stale_temp(args.out / name, everyone=True)  # every writer has finished
    print(
        f"{config.workers} shards on {config.executor} in {time.time() - start:.1f}s "
        f"(each: {', '.join(str(r['seconds']) + 's' for r in results)})"
    )
    return cmd_merge(argparse.Namespace(run_dir=args.out), [name])[0]


def cmd_evaluate(args) -> pd.DataFrame:
    return Session(args).evaluation(fresh=True)  # a failed run leaves the old table in place


def cmd_merge(args, names: list[str] | None = None) -> list[pd.DataFrame]:
    """Merge the parts that every --shard process wrote (of the analyses ``names``, default:
    every shardable one with parts), then summarise (no model needed)."""
    run = args.run_dir
    if not (run / "evaluation.parquet").is_file():
        raise InputError(
            f"{run}: no result parts to merge (no evaluation.parquet; is it a run directory?)"
        )
    evaluation = pd.read_parquet(run / "evaluation.parquet")
    merged = []
    chosen = [a for a in analyses() if a.shardable and (names is None or a.name in names)]
    for analysis in [a for a in chosen if (run / a.name).is_dir()]:
        parts = run / analysis.name / "config.json"
        made_by = json.loads(parts.read_text()) if parts.is_file() else {}
        config = config_from_dict(analysis.config, made_by.get("config", {}))
        identity = {k: v for k, v in made_by.items() if k not in ("analysis", "config")}
        context = Context(None, [], evaluation, pd.DataFrame(), identity, run)
        results = merge_parts(run / analysis.name, order=list(evaluation["id"]))
        write_table(results, run / analysis.table_file, made_by)
        if analysis.summary is not None:
            print(analysis.summary(context, results, config))
        print(
            f"{analysis.table_file}: {len(results)} rows of {results['id'].nunique()} cases -> "
            f"{run}"
        )
        merged.append(results)
    if not merged:
        raise InputError(f"{run}: no result parts to merge")
    return merged


def cmd_report(args) -> Path:
    path = build_report(args.run_dir)
    print(f"report -> {path}")
    return path


def cmd_demo(args) -> None:
    """The whole pipeline (default: the shipped toy model): evaluate, back-patch, stages, report."""
    if args.skip == ("auto",):  # do not spend time on a measure known to read nothing on the model
        args.skip = ("patchscope",) if args.model in TOY_CHECKPOINTS else ()
        if args.skip:
            print(
                "demo: skipping Patchscopes: on the toy models it reads nothing (every patched "
                "generation is the "
                "same string whatever the source layer); run `latent-hops patchscope` to see it"
            )
    session = Session(args)
    session.evaluation()
    run_analysis(session, "backpatch")
    run_analysis(session, "stages")
    print(f"\nreport: {build_report(args.out)} (tables: {args.out}/*.parquet)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latent-hops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"latent-hops {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="hop accuracies and subsets -> evaluation.parquet")
    _common(p)
    _add_options(p, [EvaluationConfig])
    p.set_defaults(func=cmd_evaluate)
    for analysis in analyses():  # one command per registered analysis
        p = sub.add_parser(analysis.name, aliases=list(analysis.aliases), help=analysis.help)
        _common(p)
        _selection(p)
        inputs = _with_inputs([analysis.name])
        if any(a.resumable for a in inputs):
            _resumable(p)
        if analysis.shardable:
            _executor(p)
        _add_options(p, [EvaluationConfig, *(a.config for a in inputs)])
        p.set_defaults(
            func=lambda a, name=analysis.name: cmd_analysis(a, name), command=analysis.name
        )
    p = sub.add_parser(
        "demo", help="the whole pipeline (evaluate, backpatch, stages, report) on the toy model"
    )
    _common(p)
    _selection(p)
    _resumable(p)
    _add_options(p, [EvaluationConfig, *(a.config for a in _with_inputs(["backpatch", "stages"]))])
    p.set_defaults(func=cmd_demo, max_cases=60, skip=("auto",))  # per split x subset
    p = sub.add_parser(
        "report", help="RUN_DIR/report.html: one self-contained page of the run's results"
    )
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "merge", help="merge the parts of all --shard processes (or workers) in RUN_DIR"
    )
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_merge)
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
    args.argv, args.slurm = list(sys.argv[1:] if argv is None else argv), {}
    path = getattr(args, "config", None)
    if path is None:
        return args
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"config {path}: {err}") from None
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    sub = commands[args.command]

    def flags(
        p: argparse.ArgumentParser,
    ) -> dict[str, str]:  # a key is a long flag without its dashes
        return {
            o[2:].replace("-", "_"): a.dest
            for a in p._actions
            for o in a.option_strings
            if o.startswith("--")
        }

    slurm = values.pop("slurm", {})  # submitit's options (--executor slurm), a TOML table
    if not isinstance(slurm, dict):
        raise InputError(f"config {path}: [slurm] must be a table of submitit options")
    dests, anywhere = flags(sub), {k for p in commands.values() for k in flags(p)}
    unknown = sorted(k for k in values if k.replace("-", "_") not in anywhere)
    if unknown:
        raise InputError(f"config {path}: unknown keys {unknown} (no command takes them)")
    # one file can serve several commands: keys of other commands are left to them
    values = {
        dests[k.replace("-", "_")]: v for k, v in values.items() if k.replace("-", "_") in dests
    }
    for action in sub._actions:
        if action.dest in values:
            values[action.dest] = _config_value(path, action, values[action.dest])
    sub.set_defaults(**values)
    args = parser.parse_args(argv)
    args.argv, args.slurm = list(sys.argv[1:] if argv is None else argv), slurm
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    started = time.time()
    debug = (
        "--debug" in (sys.argv[1:] if argv is None else argv)
        or os.environ.get("LATENT_HOPS_DEBUG") == "1"
    )
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
        print(
            f"\nlatent-hops: interrupted; finished parts are saved{where}: run the same command to "
            "resume",
            file=sys.stderr,
        )
        return 130
    except Exception:  # noqa: BLE001 -- our bug, not the user's input: show it whole
        traceback.print_exc()
        print(
            "latent-hops: internal error: this is a bug in latent_hops, not in your input; please "
            "report it "
            "with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1
    out = getattr(args, "out", None)
    if out is not None and args.command != "report":
        dataset = (
            shipped_dataset_path(args.dataset)
            if args.dataset in SHIPPED_DATASETS
            else Path(args.dataset)
        )
        config = {k: v for k, v in vars(args).items() if k != "func"}
        record_run(out, args.command, config, dataset, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
