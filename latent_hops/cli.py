"""The ``latent-hops`` entry point. It stays light: ``--help`` and ``--version`` are answered
without importing torch, TransformerLens or the analyses -- from a cache of the rendered help
texts, kept current by a fingerprint of the package's sources, the version and the terminal
width. Everything else is ``latent_hops.commands`` (the parser and the commands).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from latent_hops._version import __version__

PACKAGE = Path(__file__).resolve().parent
HELP = ("-h", "--help")


def _fingerprint() -> str:
    """What the help texts depend on: every source file of the package (path, size, time of
    its last change), the version and the terminal's width."""
    digest = hashlib.sha256(f"{__version__}|{shutil.get_terminal_size().columns}".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(PACKAGE)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _cache_file(fingerprint: str) -> Path:
    from latent_hops.gguf import cache_dir

    return cache_dir() / "cli-help" / f"{fingerprint}.json"


def help_texts() -> dict[str, str]:
    """The help of the top level (key "") and of every command and alias, as argparse renders
    it here: read from the cache, or rendered (importing the analyses) and cached."""
    fingerprint = _fingerprint()
    path = _cache_file(fingerprint)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    from latent_hops.commands import render_help

    texts = render_help()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(texts, f)
        os.replace(f.name, path)
    except OSError:  # a read-only cache: render every time
        pass
    return texts


def _asked_help(argv: list[str]) -> str | None:
    """The command whose help ``argv`` asks for ("" for the top level), or None."""
    flag = next((i for i, a in enumerate(argv) if a in HELP), None)
    if flag is None or "--" in argv[:flag]:
        return None
    before = argv[:flag]
    return before[0] if before and not before[0].startswith("-") else ("" if not before else None)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--version"]:
        print(f"latent-hops {__version__}")
        return 0
    command = _asked_help(args)
    if command is not None:
        texts = help_texts()
        if command in texts:
            print(texts[command], end="")
            return 0
    from latent_hops.commands import main as run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
