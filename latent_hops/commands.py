"""The ``latent-hops`` commands: the parser (built from the registered analyses' configs),
and each command -- it parses arguments, calls the library and prints. ``latent_hops.cli`` is
the entry point (it answers ``--help`` without importing this module when it can).

    latent-hops evaluate  --model toy --dataset toy --out runs/toy
    latent-hops backpatch --model toy --out runs/toy --positions t1,t2 --subset incorrect
    latent-hops logit_lens | projection | knockout | patchscope | probe | attention --out runs/toy
    latent-hops stages    --model toy --dataset toy --out runs/toy
    latent-hops report    runs/toy
    latent-hops demo      --out runs/demo

Every subcommand writes Parquet into the run directory (``--out``) and reuses what is
already there when it was made the same way (``evaluation.parquet`` and the per-analysis
tables ``stages`` needs). What a run is (queries, model, evaluation, which cases) is
``latent_hops.run.Run``; the library logs what it does, and this module shows it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latent_hops._version import __version__
from latent_hops.analysis import Analysis, analyses, get
from latent_hops.backend import BACKENDS, DEFAULT_MAX_CONTEXT
from latent_hops.config import Option, config_from_options, options
from latent_hops.errors import EXIT_INPUT_ERROR, InputError
from latent_hops.evaluation import EvaluationConfig
from latent_hops.executors import EXECUTORS, ExecutorConfig, run_sharded
from latent_hops.report import build_report
from latent_hops.run import Outcome, Run, RunSettings, dataset_path, merge, with_inputs
from latent_hops.rundir import file_hash, record_run, remove_stale_temp, saved_since

DEMO_DEFAULTS: dict[str, Any] = {"max_cases": 60, "skip": ("auto",)}
"""What ``demo`` does unless told otherwise: 60 cases per split x subset, and the stage
analyses that read nothing on the model, or cost far more than the rest, left out
(``Analysis.demo_skip``)."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="toy",
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
        help="i/n: this process takes shard i of n of the cases (sweeps that can be sharded: "
        f"{', '.join(a.name for a in analyses() if a.shardable)}; then "
        "`latent-hops merge RUN_DIR`)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *BACKENDS),
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
        default=DEFAULT_MAX_CONTEXT,
        help="cap on the context TransformerLens allocates masks for (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="prompts per forward pass (default: 128)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N queries")
    parser.add_argument(
        "--ids",
        default=None,
        help="use only these query ids: comma-separated, or @FILE with one id per line",
    )
    parser.add_argument(
        "--split", default=None, help="use only queries of this split (e.g. test_id)"
    )


def _selection(parser: argparse.ArgumentParser, max_cases: int | None = None) -> None:
    parser.add_argument(
        "--subset",
        default="all",
        help="incorrect, correct, or all (= correct,incorrect) (default: all)",
    )
    parser.add_argument(
        "--max-cases",
        type=int,
        default=max_cases,
        help="at most N cases per split x subset, the first in dataset order (default: "
        f"{'every case' if max_cases is None else max_cases})",
    )


def _resumable(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-cases", type=int, default=50, help="cases per resumable part (default: 50)"
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


def _shown(value: Any) -> str:
    """A default as a flag would spell it."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _add_options(
    parser: argparse.ArgumentParser, config_types: list[type], defaults: dict | None = None
) -> None:
    """The options of ``config_types``' fields; one flag shared by several configs must mean
    the same (same type and default), else building the parser fails (tests build it). Each
    help ends with the default once (``defaults`` overrides a config's, as the demo does);
    none is said where there is none, or where the help says it already."""
    defaults = defaults or {}
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
            default = defaults.get(opt.dest, opt.default)
            said = "(default" in opt.help or "default)" in opt.help or default is None
            text = opt.help if said else f"{opt.help} (default: {_shown(default)})"
            if opt.is_flag:
                parser.add_argument(
                    opt.flag, dest=opt.dest, action="store_true", default=default, help=opt.help
                )
            else:
                parser.add_argument(
                    opt.flag, dest=opt.dest, default=default, type=_argument_type(opt), help=text
                )


def _argument_type(opt: Option) -> Callable[[str], Any]:
    """``opt.parse`` for argparse: its error says what is wrong ("argument --screen: must be
    >= 0, got -1"), where argparse would say only "invalid parse value"."""

    def parse(text: str) -> Any:
        try:
            return opt.parse(text)
        except InputError as error:
            said = str(error).removeprefix(f"{opt.flag}:").removeprefix(opt.flag).strip()
            raise argparse.ArgumentTypeError(said) from None

    return parse


# ---------------------------------------------------------------------------- from flags


def _ids(spec: str | None) -> tuple[str, ...] | None:
    if spec is None:
        return None
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            text = path.read_text()
        except OSError as err:
            raise InputError(f"--ids {spec}: cannot read {path} ({err.strerror})") from None
        items = text.splitlines()
    else:
        items = spec.split(",")
    ids = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    if not ids:
        raise InputError(f"--ids {spec!r} names no query")
    return ids


def settings_of(args: argparse.Namespace) -> RunSettings:
    """The run the flags describe."""
    return RunSettings(
        out=args.out,
        model=args.model,
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        ids=_ids(getattr(args, "ids", None)),
        subset=getattr(args, "subset", "all"),
        max_cases=getattr(args, "max_cases", None),
        shard=args.shard,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        n_devices=args.n_devices,
        max_context=args.max_context,
        batch_size=args.batch_size,
        chunk_cases=getattr(args, "chunk_cases", 50),
        threads=getattr(args, "threads", None),
    )


def configs_of(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The configs of ``names`` (and the evaluation) from the flags."""
    fixed = {"batch_size": args.batch_size, "progress": True}
    configs: dict[str, Any] = {
        "evaluate": config_from_options(EvaluationConfig, vars(args), **fixed)
    }
    for analysis in with_inputs(names):
        configs[analysis.name] = config_from_options(analysis.config, vars(args), **fixed)
    return configs


def _show(outcome: Outcome) -> None:
    if outcome.sharded:
        print(
            f"shard: parts of {outcome.name} written to {outcome.path}; when every shard is "
            f"done: latent-hops merge {outcome.path}"
        )
        return
    if outcome.summary:
        print(outcome.summary)
    where = f" -> {outcome.path}" if outcome.path else ""
    print(f"{outcome.name}: {len(outcome.table)} rows in {outcome.seconds:.1f}s{where}")


# ---------------------------------------------------------------------------- commands


def cmd_evaluate(args: argparse.Namespace) -> None:
    run = Run.open(settings_of(args), configs_of(args, []))
    run.evaluation(fresh=True)  # a failed run leaves the old table in place


def cmd_analysis(args: argparse.Namespace, name: str) -> None:
    """One analysis: in this process, or its shards on an executor (``--workers``)."""
    settings, configs = settings_of(args), configs_of(args, [name])
    if args.executor != "local" or args.workers > 1:
        run_distributed(args, name, settings, configs)
        return
    if settings.selection.sharded and not get(name).shardable:
        shardable = ", ".join(a.name for a in analyses() if a.shardable)
        raise InputError(
            f"--shard splits only the sweeps {shardable}, not `{name}`: run it once, unsharded",
            code="shard",
        )
    _show(Run.open(settings, configs).analyse(name))


def run_distributed(
    args: argparse.Namespace, name: str, settings: RunSettings, configs: dict[str, Any]
) -> None:
    """Analysis ``name`` as ``--workers`` shards on ``--executor``, then merged."""
    from tqdm.auto import tqdm

    if args.shard is not None:
        raise InputError("--shard with --executor/--workers: the executor makes the shards")
    if not get(name).shardable:
        raise InputError(f"`{name}` cannot be sharded; run it without --executor/--workers")
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
    bar = tqdm(total=config.workers, desc=f"{name} shards ({config.executor})", unit="shard")
    try:
        results = run_sharded(name, settings, configs, config, bar.update)
    finally:
        bar.close()
    if results is None:
        print(f"submitted; when the jobs are done: latent-hops merge {args.out}")
        return
    remove_stale_temp(args.out / name, everyone=True)  # every writer has finished
    print(
        f"{config.workers} shards on {config.executor} in {time.time() - start:.1f}s "
        f"(each: {', '.join(f'{r.seconds}s' for r in results)})"
    )
    for outcome in merge(args.out, [name]):
        _show(outcome)


def cmd_merge(args: argparse.Namespace) -> None:
    for outcome in merge(args.run_dir):
        _show(outcome)


def cmd_report(args: argparse.Namespace) -> None:
    print(f"report -> {build_report(args.run_dir)}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The whole pipeline (default: the shipped toy model): evaluate, every analysis of the
    demo (back-patching, stages), the report."""
    names = [a.name for a in analyses() if a.in_demo]
    run = Run.open(settings_of(args), configs_of(args, names))
    run.evaluation()
    for name in names:
        _show(run.analyse(name))
    print(f"\nreport: {build_report(args.out)} (tables: {args.out}/*.parquet)")


# ---------------------------------------------------------------------------- the parser


def render_help() -> dict[str, str]:
    """The help text of the top level ("") and of every command and alias, as argparse
    renders them (``latent_hops.cli`` caches them, so ``--help`` needs no heavy import)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser.format_help(), **{n: p.format_help() for n, p in commands.choices.items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latent-hops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"latent-hops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "evaluate",
        help="hop accuracies and subsets -> evaluation.parquet",
        description="Evaluate every query's five prompts (first hop, second hop, composition, "
        "two shortcuts) and sort it into correct / incorrect / excluded. Reads --dataset, "
        "writes RUN_DIR/evaluation.parquet.",
    )
    _common(p)
    _add_options(p, [EvaluationConfig])
    p.set_defaults(func=cmd_evaluate)
    for analysis in analyses():  # one command per registered analysis
        inputs: list[Analysis[Any]] = with_inputs([analysis.name])
        p = sub.add_parser(
            analysis.name,
            aliases=list(analysis.aliases),
            help=analysis.help,
            description=f"{analysis.title}: {analysis.help}. Reads --dataset (evaluated "
            "first, or RUN_DIR/evaluation.parquet when made the same way).",
        )
        _common(p)
        _selection(p)
        if any(a.resumable for a in inputs):
            _resumable(p)
        if analysis.shardable:
            _executor(p)
        else:
            p.set_defaults(executor="local", workers=1)
        _add_options(p, [EvaluationConfig, *(a.config for a in inputs)])
        p.set_defaults(
            func=lambda a, name=analysis.name: cmd_analysis(a, name), command=analysis.name
        )
    demo = [a for a in analyses() if a.in_demo]
    p = sub.add_parser(
        "demo",
        help=f"the whole pipeline (evaluate, {', '.join(a.name for a in demo)}, report)",
        description="evaluate, then " + ", ".join(a.name for a in demo) + ", then the report "
        "(RUN_DIR/report.html); at most --max-cases (default 60) cases per split x subset.",
    )
    _common(p)
    _selection(p, DEMO_DEFAULTS["max_cases"])
    _resumable(p)
    configs: list[type] = [
        EvaluationConfig,
        *(a.config for a in with_inputs([a.name for a in demo])),
    ]
    _add_options(p, configs, DEMO_DEFAULTS)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "report",
        help="RUN_DIR/report.html: one self-contained page of the run's results",
        description="Read every table in RUN_DIR and write RUN_DIR/report.html (offline).",
    )
    p.add_argument("run_dir", type=Path, help="a run directory (--out of earlier commands)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "merge",
        help="merge the parts of all --shard processes (or workers) in RUN_DIR",
        description="Join the parts every --shard process wrote under RUN_DIR into each "
        "shardable analysis' table and summary (no model is loaded).",
    )
    p.add_argument("run_dir", type=Path, help="the run directory the shards wrote to")
    p.set_defaults(func=cmd_merge)
    return parser


def _config_value(path: Path, action: argparse.Action, value: Any) -> Any:
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


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Long flags without their dashes (as config keys) -> dest."""
    return {
        o[2:].replace("-", "_"): a.dest
        for a in parser._actions
        for o in a.option_strings
        if o.startswith("--")
    }


def _with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` TOML file supplies defaults (flags given still win)."""
    args = parser.parse_args(argv)
    args.slurm = {}
    path = getattr(args, "config", None)
    if path is None:
        return args
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"config {path}: {err}") from None
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    sub = commands[args.command]
    slurm = values.pop("slurm", {})  # submitit's options (--executor slurm), a TOML table
    if not isinstance(slurm, dict):
        raise InputError(f"config {path}: [slurm] must be a table of submitit options")
    dests, anywhere = _flags(sub), {k for p in commands.values() for k in _flags(p)}
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
    args.slurm = slurm
    return args


class _Show(logging.Handler):
    """The library's log lines, as the CLI shows them: plain, on the current stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stdout)


def _show_logs() -> None:
    logger = logging.getLogger("latent_hops")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _Show)]
    logger.addHandler(_Show())
    logger.setLevel(logging.INFO)


def _end_progress_bars() -> None:
    """Closes the progress bars an error left open, so that what is printed next starts on a
    line of its own (not after a half-drawn bar)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    _show_logs()
    parser = build_parser()
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("LATENT_HOPS_DEBUG") == "1"
    args = None
    status: str | None = "ok"
    try:
        args = _with_config(parser, argv)
        args.func(args)
    except InputError as err:  # the user can fix it: one line, naming the input
        status = None  # refused: nothing to record
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"latent-hops: error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        status = "interrupted"
        _end_progress_bars()
        print(f"\nlatent-hops: interrupted; {_what_was_saved(args, started)}", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 -- our bug, not the user's input: show it whole
        status = "failed"
        _end_progress_bars()
        traceback.print_exc()
        print(
            "latent-hops: internal error: this is a bug in latent_hops, not in your input; "
            "please report it with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1
    finally:
        _record(args, started, status)
    return 0


def _what_was_saved(args: argparse.Namespace | None, started: float) -> str:
    """The interrupt message: what this command saved, and whether rerunning resumes it."""
    out = getattr(args, "out", None)
    saved = saved_since(out, started) if out is not None else []
    if not saved:
        return "nothing was saved"
    parts = [s for s in saved if "/part-" in s]
    tables = [s for s in saved if "/part-" not in s]
    said = ", ".join(
        [*tables, *([f"{len(parts)} parts in {out}/{parts[0].split('/')[0]}"] if parts else [])]
    )
    return f"saved in {out}: {said}; run the same command to resume"


def _record(args: argparse.Namespace | None, started: float, status: str | None) -> None:
    """This command's entry in RUN_DIR/manifest.json (when it has a run directory)."""
    out = getattr(args, "out", None)
    if status is None or args is None or out is None or args.command in ("report", "merge"):
        return
    out.mkdir(parents=True, exist_ok=True)  # an interrupted or failed command is recorded too
    config = {k: v for k, v in vars(args).items() if k != "func"}
    path = dataset_path(args.dataset)
    sha = file_hash(path) if path.is_file() else None
    record_run(out, args.command, json.loads(json.dumps(config, default=str)), sha, started, status)
