"""Every ```python block in docs/*.md runs (the pages promise runnable examples)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PAGES = sorted(DOCS.glob("*.md"))


def test_the_promised_pages_exist():
    names = {p.name for p in PAGES}
    assert {"index.md", "conventions.md", "testing.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, clean_registry):
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        exec(compile(block, f"{page.name}[block {i}]", "exec"), {"__name__": f"docs_{i}"})
