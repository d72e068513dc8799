"""The README's numbers on the toy models are what their named commands print today.

Each ``<!-- numbers: NAME -->`` block of the README is rendered by scripts/readme_numbers.py from
a fresh run of the commands it names; a change that moves a number fails here until the README
is regenerated (``python scripts/readme_numbers.py --write``)."""

from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
readme_numbers = load_script("readme_numbers")


@pytest.mark.slow
@pytest.mark.parametrize("block", readme_numbers.BLOCKS, ids=[b.name for b in readme_numbers.BLOCKS])
def test_readme_numbers_come_from_their_commands(block, tmp_path):
    rendered = readme_numbers.run_block(block, tmp_path / block.name)
    assert readme_numbers.readme_block(readme_numbers.README.read_text(), block.name) == rendered


def test_every_block_is_in_the_readme_and_names_its_command():
    readme = readme_numbers.README.read_text()
    for block in readme_numbers.BLOCKS:
        text = readme_numbers.readme_block(readme, block.name)
        assert block.shown_as in text and "%" in text  # the command is named, numbers follow


def test_real_model_blocks_are_on_their_page_and_name_their_command():
    """The real-model blocks are rendered from runs too slow for the suite
    (``scripts/readme_numbers.py --real --write``); they must be there, naming the command."""
    page = readme_numbers.REAL_PAGE.read_text()
    for block in readme_numbers.REAL_BLOCKS:
        text = readme_numbers.readme_block(page, block.name)
        assert block.shown_as in text and "%" in text
    makefile = (ROOT / "Makefile").read_text()
    assert "SMOL_LIMIT ?= 500" in makefile and "SMOL_CASES ?= 3" in makefile  # what the block names
