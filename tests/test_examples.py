"""Every code block of the README and of docs/ runs, so an example that fails is a red CI.

A block is run unless the line before it says otherwise (``<!-- example: ... -->``):

- a ``python`` block runs as it is, after the blocks before it in the same file (one
  namespace per file, in a scratch working directory, on the toy model);
- a ``bash`` block runs only where marked ``<!-- example: run -->`` (as ``bash -e``, with the
  ``latent-hops`` of this environment, run warm: tests/warm_cli.py), and must otherwise say why not;
- ``<!-- example: toml -->`` blocks are parsed; ``<!-- example: not run: REASON -->`` blocks are
  not run, and must give their reason.

docs/index.md is the README (``scripts/docs_home.py``), checked to be current rather than run
twice."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WARM_CLI = ROOT / "tests" / "warm_cli.py"
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


@pytest.fixture(scope="module")
def warm_bin():
    """A directory whose ``latent-hops`` runs each command in a fork of one process that has
    imported the command line already (tests/warm_cli.py): ~5 s of imports once, not per
    command. Nothing may reach the hub from it either."""
    home = Path(tempfile.mkdtemp(prefix="lh-"))  # short: a Unix socket's path is at most 107 bytes
    sock, shim = home / "cli.sock", home / "latent-hops"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, str(WARM_CLI), "serve", str(sock)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n", "the warm command line did not start"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{WARM_CLI}" call "{sock}" "$@"\n')
        shim.chmod(0o755)
        yield home
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(home, ignore_errors=True)


def test_the_warm_command_line_answers_as_the_real_one(warm_bin, tmp_path):
    """Output and exit status of the console script, through the warm fork as in a process of
    its own: argparse's exit (``--version``, on stdout) and a model that cannot be loaded."""
    real = Path(sys.executable).parent / "latent-hops"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in (["--version"], ["evaluate", "--model", "no-such-model", "--out", "r"]):
        warm, cold = (subprocess.run([str(exe), *argv], cwd=tmp_path, env=env, capture_output=True, text=True)
                      for exe in (warm_bin / "latent-hops", real))
        assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr), argv
    assert (warm.returncode, cold.returncode) == (2, 2) and "no-such-model" in warm.stderr


@pytest.mark.slow
@pytest.mark.parametrize("path", [f for f in FILES if any(h in ("", "run", "toml") for _, h, _ in blocks(f))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path, tmp_path, monkeypatch, warm_bin):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__example__"}
    bin_dir = os.pathsep.join([str(warm_bin), str(Path(sys.executable).parent)])
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
