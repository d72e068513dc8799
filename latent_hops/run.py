"""A run: a run directory with its queries, model, identity, evaluation, case selection,
sharding and merge. The CLI, the Python API (``lh.Run``, ``lh.run_backpatch``) and the
executors' workers all go through it, so they choose the same cases for the same arguments.

    run = Run(model, queries, out="runs/x", selection=Selection(max_cases=20))
    run.evaluation()                   # evaluation.parquet (reused when made the same way)
    table = run.table("backpatch")     # backpatch.parquet (resumable: parts in runs/x/backpatch/)

``Selection`` is the one rule for which evaluated queries an analysis takes: the analysable
subsets asked for, at most ``max_cases`` per split x subset (in dataset order), and the
cases of one shard (``--shard i/n``). ``merge`` joins the parts that shards wrote; it needs
no model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from latent_hops._version import __version__
from latent_hops.analysis import Analysis, Context, Results, analyses, get
from latent_hops.backend import DEFAULT_MAX_CONTEXT, Model
from latent_hops.cases import prepare_cases
from latent_hops.config import check_minimum, config_from_dict, options, provenance_config
from latent_hops.errors import InputError, RunDirError
from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
from latent_hops.positions import parse_layers
from latent_hops.queries import (
    SHIPPED_DATASETS,
    DatasetError,
    load_dataset,
    normalize_table,
    shipped_dataset_path,
)
from latent_hops.rundir import (
    check_run_dir,
    file_hash,
    in_shard,
    merge_parts,
    parse_shard,
    read_table,
    reusable_table,
    write_table,
)
from latent_hops.tables import SCHEMA_VERSION

logger = logging.getLogger(__name__)


class NoCasesError(DatasetError):
    """No evaluated query is in the subsets asked for; ``evaluation`` says why (its subsets
    and exclusion reasons), so it need not be made again to see."""

    code = "no-cases"

    def __init__(self, message: str, evaluation: pd.DataFrame):
        super().__init__(message)
        self.evaluation = evaluation


ANALYSED_SUBSETS = ("correct", "incorrect")
"""The subsets an analysis can take (``excluded`` queries are never analysed)."""


def parse_subsets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"`` -> both analysed subsets; ``"incorrect"``, ``"correct,incorrect"``, or a
    sequence of names, each checked."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names == ["all"]:
        return ANALYSED_SUBSETS
    unknown = [n for n in names if n not in ANALYSED_SUBSETS]
    if unknown or not names:
        raise InputError(
            f"--subset: unknown subset {', '.join(map(repr, unknown)) or repr(spec)}; choose "
            f"from {', '.join(ANALYSED_SUBSETS)} or all",
            code="subset",
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Selection:
    """Which evaluated queries an analysis takes (module docstring): one rule for the CLI
    (``--subset``, ``--max-cases``, ``--shard``) and the Python API."""

    subsets: tuple[str, ...] = ANALYSED_SUBSETS
    max_cases: int | None = None  # per split x subset, the first in dataset order
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "subsets", parse_subsets(self.subsets))
        check_minimum("--max-cases", self.max_cases, 1)  # 0 would analyse nothing
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise InputError(f"--shard {i}/{n}: need 0 <= i < n", code="shard")

    @property
    def sharded(self) -> bool:
        return self.shard[1] > 1

    def choose(self, evaluation: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``evaluation`` analysed: subsets, then ``max_cases`` per split x
        subset, then this shard's share."""
        ev = evaluation[evaluation["subset"].isin(self.subsets)]
        if self.max_cases is not None:
            ev = ev.groupby(["split", "subset"], sort=False).head(self.max_cases)
        return ev[[in_shard(i, self.shard) for i in ev["id"]]]


@dataclass(frozen=True)
class RunSettings:
    """A run as plain values: what the CLI's common flags say, and what a worker receives
    (``to_dict`` / ``from_dict``; paths are made absolute by ``absolute``)."""

    out: Path | None = None
    model: str = "toy"
    dataset: str = "toy"
    split: str | None = None
    limit: int | None = None
    ids: tuple[str, ...] | None = None
    subset: str = "all"
    max_cases: int | None = None
    shard: str | None = None
    device: str | None = None
    dtype: str | None = None
    backend: str = "auto"
    n_devices: int = 1
    max_context: int | None = DEFAULT_MAX_CONTEXT
    batch_size: int = 128
    chunk_cases: int = 50
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for flag, value, low in (
            ("--batch-size", self.batch_size, 1),
            ("--limit", self.limit, 1),
            ("--chunk-cases", self.chunk_cases, 1),
            ("--threads", self.threads, 1),
            ("--n-devices", self.n_devices, 1),
        ):
            check_minimum(flag, value, low)

    @property
    def selection(self) -> Selection:
        return Selection(parse_subsets(self.subset), self.max_cases, parse_shard(self.shard))

    def absolute(self) -> RunSettings:
        """Paths resolved against this process' working directory (for workers elsewhere)."""
        out = None if self.out is None else Path(self.out).absolute()
        dataset = self.dataset
        if dataset not in SHIPPED_DATASETS and Path(dataset).exists():
            dataset = str(Path(dataset).absolute())
        model = self.model
        if Path(model).exists():
            model = str(Path(model).absolute())
        return dataclasses.replace(self, out=out, dataset=dataset, model=model)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["out"] = None if self.out is None else str(self.out)
        values["ids"] = None if self.ids is None else list(self.ids)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunSettings:
        values = dict(values)
        if values.get("out") is not None:
            values["out"] = Path(values["out"])
        if values.get("ids") is not None:
            values["ids"] = tuple(values["ids"])
        return cls(**values)


def check_configs(configs: Mapping[str, Any], n_layers: int) -> None:
    """Every option of a run's configs, however they were made (flags, a config file, Python),
    as soon as the model is known: a count below its minimum, or a layer grid that names a
    layer the model lacks, is an error before the evaluation runs (minutes on a real model),
    not a crash or an empty table after it."""
    for name, config in configs.items():
        for opt in options(type(config)):
            check_minimum(
                f"{name} {opt.field} ({opt.flag})", getattr(config, opt.field), opt.minimum
            )
            if opt.is_layer_grid:
                try:
                    parse_layers(getattr(config, opt.field), n_layers)
                except InputError as error:
                    raise InputError(f"{name} {opt.field} ({opt.flag}): {error}") from None


def dataset_path(spec: str) -> Path:
    return shipped_dataset_path(spec) if spec in SHIPPED_DATASETS else Path(spec)


def table_hash(table: pd.DataFrame) -> str:
    """SHA-256 of a query table's content (for queries that come from no file)."""
    text = table.to_json(orient="records", force_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def select_queries(
    table: pd.DataFrame,
    split: str | None = None,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The queries of a run: those of ``split``, those named by ``ids`` (each must exist),
    then the first ``limit``."""
    if split is not None:
        table = table[table["split"] == split]
        if table.empty:
            raise DatasetError(f"no queries with split {split!r}")
    if ids is not None:
        missing = [i for i in ids if i not in set(table["id"])]
        if missing:
            raise DatasetError(
                f"--ids: {len(missing)} ids are not in the dataset"
                f"{f' (split {split})' if split else ''}: {', '.join(missing[:5])}"
            )
        table = table[table["id"].isin(set(ids))]
    if limit is not None:
        table = table.iloc[:limit]
    return table.reset_index(drop=True)


@dataclass
class Outcome:
    """What running one analysis in a run gave: its table (empty for a shard, which writes
    parts only), the summary to print, and where it went."""

    name: str
    table: pd.DataFrame
    summary: str = ""
    seconds: float = 0.0
    path: Path | None = None
    sharded: bool = False


class Run:
    """Queries, a model and (optionally) a run directory (module docstring)."""

    def __init__(
        self,
        model: Model,
        queries: pd.DataFrame,
        out: str | Path | None = None,
        *,
        selection: Selection | None = None,
        configs: Mapping[str, Any] | None = None,
        evaluation: pd.DataFrame | None = None,
        dataset: str = "queries",
        dataset_sha256: str | None = None,
        batch_size: int = 128,
        chunk_cases: int = 50,
        progress: bool = False,
    ):
        self.model = model
        self.queries = normalize_table(queries, "queries")
        self.out = None if out is None else Path(out)
        if self.out is not None:
            check_run_dir(self.out)
        self.selection = selection or Selection()
        self.configs: dict[str, Any] = dict(configs or {})
        check_configs(self.configs, model.n_layers)
        self.batch_size, self.chunk_cases, self.progress = batch_size, chunk_cases, progress
        self.identity = {
            "model": model.spec,
            "weights_sha256": model.weights_fingerprint(),
            "backend": model.name,
            "dataset": dataset,
            "dataset_sha256": dataset_sha256 or table_hash(self.queries),
            "latent_hops": __version__,
            "tables": SCHEMA_VERSION,
        }
        self._evaluation = evaluation
        self._cases: dict[tuple[str, ...], tuple[list, pd.DataFrame]] = {}

    @classmethod
    def open(cls, settings: RunSettings, configs: Mapping[str, Any] | None = None) -> Run:
        """A run from plain settings (the CLI, a worker): its inputs are checked before the
        model loads (a bad --out or dataset costs nothing), then the model is loaded."""
        from latent_hops.models import load_model

        if settings.out is None:
            raise InputError("--out RUN_DIR is required (as a flag or in the --config file)")
        check_run_dir(settings.out)
        selection = settings.selection
        table = select_queries(
            load_dataset(settings.dataset), settings.split, settings.limit, settings.ids
        )
        if settings.threads is not None:
            import torch

            torch.set_num_threads(settings.threads)
        model = load_model(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            max_context=settings.max_context,
            n_devices=settings.n_devices,
            backend=settings.backend,
        )
        return cls(
            model,
            table,
            settings.out,
            selection=selection,
            configs=configs,
            dataset=settings.dataset,
            dataset_sha256=file_hash(dataset_path(settings.dataset)),
            batch_size=settings.batch_size,
            chunk_cases=settings.chunk_cases,
            progress=settings.progress,
        )

    # ------------------------------------------------------------------ evaluation

    def config(self, name: str) -> Any:
        """The config of analysis ``name`` (``"evaluate"``: the evaluation's) in this run: the
        one given, else its defaults with this run's batch size and progress bars (as the CLI
        fills them from --batch-size)."""
        if name in self.configs:
            return self.configs[name]
        kind: Any = EvaluationConfig if name == "evaluate" else get(name).config
        fields = {f.name for f in dataclasses.fields(kind)}
        given: dict[str, Any] = {"batch_size": self.batch_size, "progress": self.progress}
        return kind(**{k: v for k, v in given.items() if k in fields})

    def evaluation(self, fresh: bool = False) -> pd.DataFrame:
        """``evaluation.parquet`` when it covers the queries and was made by this model on
        this dataset (or the evaluation this run was given), else (or when ``fresh``) a new
        one, which replaces the old table only once it is complete (atomic write)."""
        ids = set(self.queries["id"])
        if self._evaluation is not None and not fresh:
            if not ids <= set(self._evaluation["id"]):
                raise InputError(
                    "the evaluation given does not cover these queries "
                    f"({len(ids - set(self._evaluation['id']))} missing)",
                    code="evaluation",
                )
            return self._evaluation[self._evaluation["id"].isin(ids)].reset_index(drop=True)
        config = self.config("evaluate")
        made_by = {**self.identity, "analysis": "evaluate", "config": provenance_config(config)}
        path = None if self.out is None else self.out / "evaluation.parquet"
        done = None if fresh or path is None else reusable_table(path, made_by, ids)
        if done is not None:
            self._evaluation = done
            return done
        if self.selection.sharded:  # n shards must pick their cases from one evaluation
            raise InputError(
                f"--shard {self.selection.shard[0]}/{self.selection.shard[1]}: {path} does not "
                "cover these queries (or was made by another model); run `latent-hops "
                "evaluate` with the same --model/--dataset/--out first (unsharded)",
                code="shard",
            )
        start = time.time()
        result = evaluate(self.model, self.queries, config)
        if path is not None:
            write_table(result, path, made_by)
        with pd.option_context(
            "display.width", 200, "display.max_columns", 20, "display.precision", 3
        ):
            logger.info("%s", summarize(result).to_string())
        where = f" -> {path}" if path else ""
        logger.info("evaluated %d queries in %.1fs%s", len(result), time.time() - start, where)
        self._evaluation = result
        return result

    # ------------------------------------------------------------------ cases

    def chosen(self) -> pd.DataFrame:
        """The evaluation rows of the analysed cases (``Selection.choose``); an error when
        there are none (a shard may hold none of them: then empty)."""
        evaluation = self.evaluation()
        chosen = self.selection.choose(evaluation)
        if chosen.empty and self.selection.sharded and self.in_subsets():
            return chosen  # the hash gave this shard none: nothing to do (``analyse``)
        if chosen.empty:
            counts = evaluation["subset"].value_counts().to_dict()
            raise NoCasesError(
                f"no query is in subsets {list(self.selection.subsets)} (subsets found: "
                f"{counts}); see the evaluation's skip_reason column"
                + (f" ({self.out / 'evaluation.parquet'})" if self.out else " (error.evaluation)"),
                evaluation,
            )
        return chosen

    def in_subsets(self) -> int:
        """How many evaluated queries are in the chosen subsets (every shard's cases)."""
        return int(self.evaluation()["subset"].isin(self.selection.subsets).sum())

    def cases(self, positions: Sequence[str] = ("t1", "t2")) -> tuple[list, pd.DataFrame]:
        """Prepared cases of the chosen queries (once per positions) and the skipped ones."""
        key = tuple(positions)
        if key not in self._cases:
            chosen = set(self.chosen()["id"])
            table = self.queries[self.queries["id"].isin(chosen)]
            ev = self.config("evaluate")  # the prompts' suffix and generated tokens
            cases, skipped = prepare_cases(self.model, table, key, ev.suffix, ev.max_new_tokens)
            if len(skipped):
                logger.info(
                    "skipped %d queries (positions unresolved); first: %s",
                    len(skipped),
                    skipped.skip_reason.iloc[0],
                )
            self._cases[key] = (cases, skipped)
        return self._cases[key]

    def context(self, name: str) -> Context:
        """The context analysis ``name`` (and the analyses it uses) runs in."""
        analysis = get(name)
        cases, skipped = self.cases(analysis.uses_positions(self.config(name)))
        configs = {a.name: self.config(a.name) for a in with_inputs([name])}
        return Context(
            self.model,
            cases,
            self.evaluation(),
            self.queries,
            self.identity,
            self.out,
            configs,
            self.batch_size,
            self.chunk_cases,
            progress=self.progress,
            skipped=skipped,
        )

    # ------------------------------------------------------------------ analyses

    def table(self, name: str, fresh: bool = False) -> pd.DataFrame:
        """Analysis ``name``'s table for the chosen cases: reused from the run directory when
        made the same way (unless ``fresh``), else computed (and written there)."""
        return self.context(name).table(get(name).name, fresh=fresh)

    def analyse(self, name: str) -> Outcome:
        """Run analysis ``name`` afresh (a shard writes its parts only), with its summary."""
        analysis = get(name)
        if self.selection.sharded and self.chosen().empty:
            i, n = self.selection.shard
            logger.info(
                "%s: shard %d/%d holds none of the %d chosen cases (shards split them by a "
                "hash of their ids); nothing to do",
                analysis.name,
                i,
                n,
                self.in_subsets(),
            )
            return Outcome(analysis.name, pd.DataFrame(), sharded=True, path=self.out)
        context = self.context(analysis.name)
        config = context.config(analysis.name)
        start = time.time()
        if self.selection.sharded:
            analysis.run(context, config)
            return Outcome(analysis.name, pd.DataFrame(), sharded=True, path=self.out)
        table = context.table(analysis.name, fresh=True)
        summary = ""
        if analysis.summary is not None:
            made_by = context.made_by(analysis.name, config)
            results = Results(table, config, context.evaluation, self.out, made_by, context.skipped)
            summary = analysis.summary(results)
        path = None if self.out is None else self.out / analysis.table_file
        return Outcome(analysis.name, table, summary, time.time() - start, path)


def with_inputs(names: Sequence[str]) -> list[Analysis[Any]]:
    """The analyses ``names`` and those their runs use (``Analysis.inputs``)."""
    out = [get(n) for n in names]
    return out + [a for n in names for a in get(n).inputs() if a not in out]


def merge(run_dir: str | Path, names: Sequence[str] | None = None) -> list[Outcome]:
    """Merge the parts that every --shard process (or worker) wrote into ``run_dir`` (of the
    analyses ``names``; default: every shardable one with parts), write their tables and
    summaries. No model is needed: what made the parts is in their ``config.json``."""
    run = Path(run_dir)
    if not (run / "evaluation.parquet").is_file():
        raise RunDirError(
            f"{run}: no result parts to merge (no evaluation.parquet; is it a run directory?)"
        )
    evaluation = read_table(run / "evaluation.parquet")
    outcomes = []
    chosen = [a for a in analyses() if a.shardable and (names is None or a.name in names)]
    for analysis in [a for a in chosen if (run / a.name).is_dir()]:
        start = time.time()
        parts = run / analysis.name / "config.json"
        made_by = json.loads(parts.read_text()) if parts.is_file() else {}
        config = config_from_dict(analysis.config, made_by.get("config", {}))
        table = merge_parts(run / analysis.name, order=list(evaluation["id"]))
        write_table(table, run / analysis.table_file, made_by)
        summary = ""
        if analysis.summary is not None:
            summary = analysis.summary(Results(table, config, evaluation, run, made_by))
        outcomes.append(
            Outcome(analysis.name, table, summary, time.time() - start, run / analysis.table_file)
        )
    if not outcomes:
        raise RunDirError(f"{run}: no result parts to merge")
    return outcomes
