"""The shape of every analysis, and the registry the CLI, ``stages`` and the report iterate.

An analysis is one module of ``latent_hops/analyses/`` that calls ``register(Analysis(...))``:
its name (the CLI command, the table ``RUN_DIR/<name>.parquet``, the stage-table method and
the report section), a frozen config dataclass whose fields with a ``help``
(``option(...)``) become CLI options, its table's schema (checked on write),
``run(context, config) -> DataFrame``, and optionally the stage measures it gives the stage
table (``StageMeasure``, with ``stage_layers``), a summary and a report section. Nothing
else in the package names an analysis: adding one is adding its module (see the README,
"Adding an analysis").

Every table is written with what made it (``made_by``: analysis, config, model and a hash
of its weights, dataset SHA-256, latent_hops version, table schema version) and reused only
when all of it matches (``rundir.reusable_table``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import pandas as pd
from tqdm.auto import tqdm

from latent_hops.backend import Model
from latent_hops.cases import POSITIONS, Case
from latent_hops.config import (  # noqa: F401 -- option/runtime are re-exported for analyses
    option,
    provenance_config,
    runtime,
)
from latent_hops.errors import InputError
from latent_hops.rundir import merge_parts, reusable_table, run_in_parts, write_table
from latent_hops.tables import Column, TableSchema  # noqa: F401 -- Column: for analyses

logger = logging.getLogger(__name__)

C = TypeVar("C")
"""An analysis' config type (a frozen dataclass)."""

STAGES = (
    "first_hop",
    "info_propagation",
    "second_hop_onset",
    "second_hop",
    "prediction_extracted",
)
"""The stages of a two-hop query (reference §5), in order; column ``<stage>_layer`` of the
stage table."""


@dataclass(frozen=True)
class StageMeasure:
    """A per-case layer an analysis gives the stage table.

    A stage's layer is the mean of the measures of that stage a case has (one measure for
    most stages; information propagation averages several, column
    ``info_propagation_measures`` names them). ``decoded`` measures come from a decoding
    method (an entity decoded from a position): each such analysis gives the stage table
    one row per case (column ``method``), the other measures are shared by all rows."""

    column: str  # what the analysis' ``stage_layers`` returns, e.g. "knockout_layer"
    stage: str  # one of STAGES
    empty: str  # what an empty value means, e.g. "no knockout window changes the answer"
    label: str = ""  # short name in ``<stage>_measures`` (default: column without "_layer")
    decoded: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage measure {self.column}: unknown stage {self.stage!r}")
        if not self.column.endswith("_layer"):
            raise ValueError(f"stage measure {self.column}: a layer column ends in _layer")
        if not self.label:
            object.__setattr__(self, "label", self.column.removesuffix("_layer"))


DECODED_MEASURES = (
    StageMeasure("first_hop_layer", "first_hop", "e2 never decoded from t1", decoded=True),
    StageMeasure(
        "e2_at_t2_layer", "info_propagation", "e2 never decoded from t2", "e2_at_t2", decoded=True
    ),
    StageMeasure("second_hop_layer", "second_hop", "e3 never decoded from t2", decoded=True),
)
"""What a decoding method (logit lens, Patchscopes, probes) gives the stage table: the first
layer at which e2 is decoded at t1, e2 at t2, and e3 at t2."""

DECODED_AT = {"first_hop_layer": ("t1", "e2"), "e2_at_t2_layer": ("t2", "e2")}
DECODED_AT["second_hop_layer"] = ("t2", "e3")


@dataclass
class Context:
    """What an analysis runs on: the model, the analysed cases and the run directory."""

    model: Model
    cases: list[Case]  # the analysed cases (subsets, max_cases and shard applied)
    evaluation: pd.DataFrame  # every evaluated query of the run, with its subset
    queries: pd.DataFrame  # every query of the run (a probe's training pool draws on them)
    identity: dict  # model, weights hash, dataset hash, version: see ``made_by``
    run_dir: Path | None = None
    configs: dict[str, Any] = field(default_factory=dict)  # analysis name -> config
    batch_size: int = 64  # prompts per forward pass
    chunk_cases: int = 50  # cases per resumable part
    progress: bool = False
    skipped: pd.DataFrame | None = None  # queries that could not become cases (id, reason)

    def config(self, name: str) -> Any:
        return self.configs.get(name) or get(name).config()

    def made_by(self, name: str, config: Any) -> dict:
        return {**self.identity, "analysis": name, "config": provenance_config(config)}

    def folder(self, name: str) -> Path:
        """Where a resumable analysis writes its parts."""
        if self.run_dir is None:
            raise InputError(f"{name} is resumable and needs a run directory")
        return self.run_dir / name

    def in_parts(
        self,
        name: str,
        compute: Callable[[Sequence[Case]], pd.DataFrame],
        config: Any,
        desc: str,
    ) -> pd.DataFrame:
        """A resumable computation: the cases in chunks, one part each under
        ``RUN_DIR/<name>/``, skipping finished ones (``rundir.run_in_parts``); then all parts
        of these cases. Without a run directory, all cases at once."""
        if self.run_dir is None:
            return compute(self.cases)
        bar = tqdm(total=len(self.cases), desc=desc, unit="case", disable=not self.progress)

        def chunk(part: Sequence[Case]) -> pd.DataFrame:
            out = compute(part)
            bar.update(len(part))
            return out

        folder = self.folder(name)
        done = run_in_parts(
            folder,
            self.cases,
            self.chunk_cases,
            chunk,
            on_skip=bar.update,
            made_by=self.made_by(name, config),
        )
        if done:
            logger.info("%s: resuming: %d of %d cases already done", name, done, len(self.cases))
        bar.close()
        return merge_parts(folder, order=[c.id for c in self.cases])

    def table(self, name: str, fresh: bool = False) -> pd.DataFrame:
        """Analysis ``name``'s table for the analysed cases: reused from the run directory when
        it was made exactly so (and ``fresh`` is False), else computed and written there."""
        analysis, config = get(name), self.config(name)
        path = None if self.run_dir is None else self.run_dir / analysis.table_file
        made_by = self.made_by(name, config)
        if path is not None and not fresh:
            done = reusable_table(path, made_by, {c.id for c in self.cases})
            if done is not None:
                logger.info("reusing %s", path)
                return done
        frame = analysis.run(self, config)
        analysis.check(frame)
        if path is not None:
            write_table(frame, path, made_by)
        return frame


@dataclass(frozen=True)
class Results(Generic[C]):
    """A finished table and what it is summarised with (no model needed: ``merge`` makes
    these from a run directory alone)."""

    table: pd.DataFrame
    config: C
    evaluation: pd.DataFrame
    run_dir: Path | None
    made_by: dict
    skipped: pd.DataFrame | None = None


@dataclass(frozen=True)
class ReportInput(Generic[C]):
    """What a report section is built from: its table, the config that made it, the run."""

    table: pd.DataFrame
    config: C
    evaluation: pd.DataFrame
    run_dir: Path
    figure: Callable[[Any], str]  # plotly Figure -> HTML
    html_table: Callable[[pd.DataFrame], str]


def _no_note(config: Any) -> str:
    return ""


def _positions_of(config: Any) -> tuple[str, ...]:
    return tuple(getattr(config, "positions", POSITIONS))


def _no_inputs() -> list[Analysis]:
    return []


@dataclass(frozen=True)
class Analysis(Generic[C]):
    name: str  # CLI command, table file, stage-table method, report section
    title: str  # report section heading
    help: str  # one line: what it computes and writes (CLI help)
    config: type[C]  # a frozen dataclass: ``option`` fields are CLI options
    run: Callable[[Context, C], pd.DataFrame]
    schema: TableSchema  # its table (file RUN_DIR/<name>.parquet): checked on write
    note: Callable[[C], str] = _no_note  # methods note of the report, from the config
    resumable: bool = False  # computed in parts under RUN_DIR/<name>/, skipping finished cases
    shardable: bool = False  # --shard i/n splits its cases; `latent-hops merge` joins them
    stage_measures: tuple[StageMeasure, ...] = ()  # what it gives the stage table
    stage_layers: Callable[[pd.DataFrame, C], pd.DataFrame] | None = None  # table -> one row
    # per id (index), a column per stage measure
    demo_skip: Callable[[Model], str | None] | None = None  # why --skip auto (demo) leaves it out
    report: Callable[[ReportInput[C]], str] | None = None  # HTML body of its report section
    summary: Callable[[Results[C]], str] | None = None  # what the CLI prints after a run (and
    # files it writes beside the table)
    uses_positions: Callable[[C], tuple[str, ...]] = _positions_of
    inputs: Callable[[], list[Analysis]] = _no_inputs  # analyses its run uses (their options)
    aliases: tuple[str, ...] = ()  # other CLI command names
    in_demo: bool = False  # run by `latent-hops demo` (in order)
    order: int = 50  # place in the CLI, the stage table and the report

    def __post_init__(self) -> None:
        if self.stage_measures and self.stage_layers is None:
            raise ValueError(f"analysis {self.name}: stage measures need stage_layers")
        if self.schema.file != self.table_file:
            raise ValueError(f"analysis {self.name}: its table is {self.table_file}")

    @property
    def table_file(self) -> str:
        return f"{self.name}.parquet"

    @property
    def decodes(self) -> bool:
        """Whether it is a decoding method of the stage table (one row per case)."""
        return any(m.decoded for m in self.stage_measures)

    def check(self, frame: pd.DataFrame) -> None:
        """The declared columns, in order and of their kinds; else a bug in the analysis (not
        the user's input)."""
        self.schema.check(frame, f"analysis {self.name}")

    def measured_layers(self, table: pd.DataFrame, config: C) -> pd.DataFrame:
        """``stage_layers`` checked against the declared measures (exactly those columns)."""
        assert self.stage_layers is not None
        layers = self.stage_layers(table, config)
        want = [m.column for m in self.stage_measures]
        if sorted(layers.columns) != sorted(want):
            raise RuntimeError(
                f"analysis {self.name}: stage_layers gave columns {list(layers.columns)}, "
                f"declared stage measures {want}"
            )
        return layers[want]


REGISTRY: dict[str, Analysis[Any]] = {}


def register(analysis: Analysis[C]) -> Analysis[C]:
    if analysis.name in REGISTRY and REGISTRY[analysis.name].run is not analysis.run:
        raise ValueError(f"two analyses are named {analysis.name!r}")
    REGISTRY[analysis.name] = analysis
    return analysis


@functools.cache
def _import_analyses() -> None:
    """Import every module of ``latent_hops/analyses/`` (each registers itself), once."""
    import latent_hops.analyses as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def analyses() -> list[Analysis[Any]]:
    """Every registered analysis, in order."""
    _import_analyses()
    return sorted(REGISTRY.values(), key=lambda a: (a.order, a.name))


def get(name: str) -> Analysis[Any]:
    found = {a.name: a for a in analyses()}
    aliases = {alias: a for a in found.values() for alias in a.aliases}
    if name in aliases:
        return aliases[name]
    if name not in found:
        raise InputError(f"unknown analysis {name!r}; choose from {', '.join(found)}")
    return found[name]


def first_layer(table: pd.DataFrame, holds: pd.Series, name: str, layer: str) -> pd.Series:
    """Per case (``id``), the smallest value of the column ``layer`` (``hidden_layer``,
    ``block``, ``window_center``, ...) where ``holds`` (a null counts as not holding); every id
    of ``table`` appears, missing (NaN) where it never holds. The stage reducer of every
    analysis."""
    holds = holds.fillna(False).astype(bool)
    return table[holds].groupby("id")[layer].min().rename(name).reindex(table["id"].unique())


def decoded_layers(
    table: pd.DataFrame, decoded: Callable[[pd.DataFrame, str], pd.Series], layer: str
) -> pd.DataFrame:
    """Per case, the first ``layer`` at which each entity of ``DECODED_MEASURES`` is decoded
    at its position: ``decoded(rows_at_position, entity)`` says where. Every id of
    ``table`` appears; NaN where never."""
    columns = []
    for measure in DECODED_MEASURES:
        position, entity = DECODED_AT[measure.column]
        at = table[table.position == position]
        columns.append(first_layer(at, decoded(at, entity), measure.column, layer))
    out = pd.concat(columns, axis=1)
    return out.reindex(table["id"].unique()).rename_axis("id").reset_index()
