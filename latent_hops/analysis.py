"""The shape of every analysis, and the registry the CLI, ``stages`` and the report iterate.

An analysis is one module of ``latent_hops/analyses/`` that calls ``register(Analysis(...))``:
its name (the CLI command, the table ``RUN_DIR/<name>.parquet``, the report section), a
frozen config dataclass whose fields with a ``help`` (``option(...)``) become CLI options,
the columns of its table (checked on write), ``run(context, config) -> DataFrame``, and
optionally the per-case layers it gives the stage table and its report section. Nothing
else in the package names an analysis: adding one is adding its module (see the README,
"Adding an analysis").

Every table is written with what made it (``made_by``: analysis, config, model and a hash
of its weights, dataset SHA-256, latent_hops version) and reused only when all of it
matches (``rundir.reusable_table``).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from latent_hops.cases import POSITIONS, Case
from latent_hops.config import option, provenance_config, runtime  # noqa: F401 -- re-exported for analyses
from latent_hops.errors import InputError
from latent_hops.rundir import (  # noqa: F401 -- Column is re-exported for analyses
    Column,
    check_columns,
    merge_parts,
    reusable_table,
    run_in_parts,
    write_table,
)


@dataclass
class Context:
    """What an analysis runs on: the model, the analysed cases and the run directory."""

    model: Any
    cases: list[Case]  # the analysed cases (subset, --max-cases and --shard applied)
    evaluation: pd.DataFrame  # every evaluated query of the run, with its subset
    queries: pd.DataFrame  # every query of the run (a probe's training pool draws on them)
    identity: dict  # model, weights hash, dataset hash, version: see ``made_by``
    run_dir: Path | None = None
    configs: dict[str, Any] = field(
        default_factory=dict
    )  # analysis name -> config (else its defaults)
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
        self, folder: Path, compute: Callable[[list[Case]], pd.DataFrame], made_by: dict, desc: str
    ) -> pd.DataFrame:
        """A resumable computation: the cases in chunks, one part each under ``folder``,
        skipping finished ones (``rundir.run_in_parts``); then all parts of these cases."""
        bar = tqdm(total=len(self.cases), desc=desc, unit="case", disable=not self.progress)

        def chunk(part):
            out = compute(part)
            bar.update(len(part))
            return out

        run_in_parts(
            folder, self.cases, self.chunk_cases, chunk, on_skip=bar.update, made_by=made_by
        )
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
                print(f"reusing {path}")
                return done
        frame = analysis.run(self, config)
        analysis.check(frame)
        if path is not None:
            write_table(frame, path, made_by)
        return frame


@dataclass(frozen=True)
class ReportInput:
    """What a report section is built from: its table, the config that made it, the run."""

    table: pd.DataFrame
    config: Any
    evaluation: pd.DataFrame
    run_dir: Path
    figure: Callable[[Any], str]  # plotly Figure -> HTML
    html_table: Callable[[pd.DataFrame], str]


@dataclass(frozen=True)
class Analysis:
    name: str  # CLI command, table file (dashes as underscores), report section
    title: str  # report section heading
    help: str  # one line of CLI help
    config: type  # a frozen dataclass: ``option`` fields are CLI options
    run: Callable[[Context, Any], pd.DataFrame]
    columns: tuple[Column, ...]  # the table's columns, in order: checked on write
    note: Callable[[Any], str] = lambda config: ""  # methods note of the report, from the config
    resumable: bool = False  # computed in parts under RUN_DIR/<name>/, skipping finished cases
    shardable: bool = (
        False  # --shard i/n splits its cases over processes; `latent-hops merge` joins them
    )
    stage_layers: Callable[[pd.DataFrame, Any], pd.DataFrame] | None = (
        None  # (table, StagesConfig) ->
    )
    # one row per id, ``*_layer`` columns for the stage table
    decodes: str | None = None  # stage-table method name when its stage layers decode entities
    report: Callable[[ReportInput], str] | None = None  # HTML body of the report section
    summary: Callable[[Context, pd.DataFrame, Any], str] | None = (
        None  # what the CLI prints after a run (and
    )
    # files it writes beside the table)
    uses_positions: Callable[[Any], tuple[str, ...]] = lambda config: getattr(
        config, "positions", POSITIONS
    )
    inputs: Callable[[], list[Analysis]] = lambda: []  # analyses its run uses (their options too)
    aliases: tuple[str, ...] = ()  # other CLI command names
    order: int = 50  # place in the CLI, the stage table and the report

    @property
    def table_file(self) -> str:
        return f"{self.name.replace('-', '_')}.parquet"

    def check(self, frame: pd.DataFrame) -> None:
        """The declared columns, in order; else a bug in the analysis (not the user's input)."""
        check_columns(frame, self.columns, f"analysis {self.name}")


REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
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


def analyses() -> list[Analysis]:
    """Every registered analysis, in order."""
    _import_analyses()
    return sorted(REGISTRY.values(), key=lambda a: (a.order, a.name))


def get(name: str) -> Analysis:
    found = {a.name: a for a in analyses()}
    if name not in found:
        raise InputError(f"unknown analysis {name!r}; choose from {', '.join(found)}")
    return found[name]


def first_layer(
    table: pd.DataFrame, holds: pd.Series, name: str, layer: str = "layer"
) -> pd.Series:
    """Per case (``id``), the smallest ``layer`` where ``holds``; every id of ``table``
    appears, missing (NaN) where it never holds. The stage reducer of every analysis."""
    return table[holds].groupby("id")[layer].min().rename(name).reindex(table["id"].unique())


DECODED_STAGES = (
    ("t1", "e2", "first_hop_layer"),
    ("t2", "e2", "e2_at_t2_layer"),
    ("t2", "e3", "second_hop_layer"),
)
"""(position, entity, column) of the layers a decoding method gives the stage table."""


def decoded_layers(
    table: pd.DataFrame,
    decoded: Callable[[pd.DataFrame, str], pd.Series],
    layer: str = "layer",
) -> pd.DataFrame:
    """Per case, the first ``layer`` at which each entity of ``DECODED_STAGES`` is decoded at
    its position: ``decoded(rows_at_position, entity)`` says where. Every id of ``table``
    appears; NaN where never."""
    columns = []
    for position, entity, name in DECODED_STAGES:
        at = table[table.position == position]
        columns.append(first_layer(at, decoded(at, entity), name, layer))
    out = pd.concat(columns, axis=1)
    return out.reindex(table["id"].unique()).rename_axis("id").reset_index()
