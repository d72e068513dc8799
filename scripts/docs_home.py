"""docs/index.md, the site's home page: README.md with its links made relative to docs/.

python scripts/docs_home.py        # rewrite it; tests/test_examples.py checks it is current
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "index.md"


def render() -> str:
    readme = (ROOT / "README.md").read_text()
    home = readme.replace("](docs/", "](")
    return "<!-- generated from README.md by scripts/docs_home.py; edit README.md -->\n" + home


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
