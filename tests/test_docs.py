"""The Python examples in docs/ run and their hand-computed numbers hold."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCKS = [(path.name, i, block) for path in sorted(DOCS.glob("*.md"))
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))]


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{n}-{i}" for n, i, _ in BLOCKS])
def test_doc_example_runs(name, index, code):
    exec(compile(code, f"{name} block {index}", "exec"), {})


def test_there_are_examples():
    assert any(name == "autograd.md" for name, _, _ in BLOCKS)
