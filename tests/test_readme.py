"""README.md, the landing page: every code block checked by the rules of tests/doc_blocks.py (python blocks run,
commands name what exists), at most 200 lines, and its links absolute, since PyPI and the docs site show it
away from the repository."""

import re

import pytest

from tests import doc_blocks

README = doc_blocks.ROOT / "README.md"
BLOCKS = doc_blocks.blocks(README)


def test_readme_has_python_examples():
    assert len([block for block in BLOCKS if block.lang == "python"]) >= 3


# A block that uses Keras runs under both flavours (tests/conftest.py, FLAVOUR_FREE_FILES); the others once.
@pytest.mark.parametrize("block", [pytest.param(block, id=block.id, marks=[pytest.mark.keras] if block.uses_keras
                                                else []) for block in BLOCKS])
def test_readme_block(block):
    doc_blocks.check(block, BLOCKS)


def test_readme_set_up_commands_exist():
    commands = re.findall(r"^bash (scripts/\S+\.sh)", README.read_text(), flags=re.M)
    assert {"scripts/example.sh", "scripts/test.sh"} <= set(commands)
    for script in commands:
        assert (README.parent / script).exists(), script


def test_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "https://tf-seqloss.github.io/tf_seqloss/" in text
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert re.match(r"https://", target), f"relative link {target}: it breaks outside the repository"
