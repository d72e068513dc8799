"""Every code block of the README and of docs/ runs, so an example that fails is a red CI.

A block is run unless the line before it says otherwise (``<!-- example: ... -->``):

- a ``python`` block runs as it is, after the blocks before it in the same file (one
  namespace per file, in a scratch working directory, on the toy model);
- a ``bash`` block runs only where marked ``<!-- example: run -->`` (as ``bash -e``, with the
  ``latent-hops`` of this environment), and must otherwise say why not;
- ``<!-- example: toml -->`` blocks are parsed; ``<!-- example: not run: REASON -->`` blocks are
  not run, and must give their reason.

docs/index.md is the README (``scripts/docs_home.py``), checked to be current rather than run
twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FILES = [f for f in FILES if f.name != "index.md" or f.parent.name != "docs"]
BLOCK = re.compile(r"(?:^<!-- example: (?P<how>[^\n]*?) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```", re.M | re.S)


def blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, directive, code) of every fenced block of ``path``."""
    return [(m["lang"], m["how"] or "", m["code"]) for m in BLOCK.finditer(path.read_text())]


def test_every_block_runs_or_says_why_not():
    for path in FILES:
        for lang, how, _code in blocks(path):
            assert how in ("", "run", "toml") or how.startswith("not run: ") and len(how) > 12, (path, how)
            if lang == "bash":
                assert how == "run" or how.startswith("not run: "), f"{path}: a bash block must run or say why not"
            if lang not in ("python", "bash"):
                assert how == "toml" and lang == "toml" or how.startswith("not run: "), (path, lang)


def test_the_site_home_is_the_readme():
    from conftest import load_script

    module = load_script("docs_home")
    assert module.OUT.read_text() == module.render(), "python scripts/docs_home.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", [f for f in FILES if any(h in ("", "run", "toml") for _, h, _ in blocks(f))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__example__"}
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    ran = 0
    for lang, how, code in blocks(path):
        if how.startswith("not run: "):
            continue
        if how == "toml":
            tomllib.loads(code)
        elif lang == "python":
            exec(compile(code, f"{path.name} example {ran}", "exec"), namespace)  # noqa: S102
        elif lang == "bash":
            done = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"{path.name} example {ran}:\n{code}\n{done.stderr[-2000:]}"
        ran += 1
    assert ran
