"""The Python blocks of docs/example.md run as written (in order, in one namespace)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("page", ["example.md"])
def test_doc_examples_run(page, capsys):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python blocks in {page}"
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)
    assert "lr 1e-3 ->" in capsys.readouterr().out
