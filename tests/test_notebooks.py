"""Every notebook runs top to bottom offline (outputs are not committed): the toy models, and
SmolLM2 (from its PyPI wheel) in the real-model notebook. Executed copies with static figures
are published in docs/notebooks/ (scripts/export_notebooks.py) and kept in step with the code."""

import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PUBLISHED = ROOT / "docs" / "notebooks"
SIZES = {"quickstart": 300, "backpatching_deep_dive": 100, "real_model": 40}
"""Queries each notebook uses in the tests (``LATENT_HOPS_SIZE``): enough for every cell to show
what it shows (incorrect cases to patch), far fewer than the published run."""


def _execute(book, path: Path) -> None:
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may reach the hub: every model here is local
    monkeypatch.setenv("LATENT_HOPS_SIZE", str(SIZES[path.stem]))
    monkeypatch.setenv("LATENT_HOPS_GRID", "0,15,29")  # the real model's back-patching grid: 3 layers
    book = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks without outputs"
    _execute(book, path)


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "backpatching_deep_dive", "real_model"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_executed_copy_is_published_and_current(path):
    """docs/notebooks/NAME.ipynb: the same cells, executed without errors, every plotly figure
    with a PNG twin (what GitHub shows)."""
    copy = nbformat.read(PUBLISHED / path.name, as_version=4)
    source = nbformat.read(path, as_version=4)
    assert [c.source for c in copy.cells] == [c.source for c in source.cells], \
        f"{path.name} changed: python scripts/export_notebooks.py {path.stem}"
    outputs = [o for c in copy.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"]
    figures = [o.data for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert all(base64.b64decode(d["image/png"])[:8] == b"\x89PNG\r\n\x1a\n" for d in figures)
    assert copy.metadata["latent_hops"]["figures"] == len(figures)


def test_real_model_notebook_says_when_it_falls_back(monkeypatch):
    """A model that cannot be loaded: the notebook says out loud that it uses the toy instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = ROOT / "notebooks" / "real_model.ipynb"
    book = nbformat.read(path, as_version=4)
    setup = next(c for c in book.cells if c.cell_type == "code")
    assert 'MODEL = "smollm2-135m"' in setup.source
    setup.source = setup.source.replace('MODEL = "smollm2-135m"', 'MODEL = "no-such-org/no-such-model"')
    book.cells = book.cells[: book.cells.index(setup) + 1]
    _execute(book, path)
    printed = "".join(o.get("text", "") for o in setup.outputs)
    assert "FALLING BACK TO THE TOY MODEL" in printed and "could not load no-such-org/no-such-model" in printed
