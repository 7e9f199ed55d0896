"""The Python blocks of docs pages run as written (in order, in one namespace per page) and
print what the page says they print."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
# page -> a line its blocks must print
PAGES = {"example.md": "lr 1e-3 ->", "optim.md": "(started at 1e-3)", "studies.md": "sgd_hd vs sgd"}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_doc_examples_run(page, capsys):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python blocks in {page}"
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)
    assert PAGES[page] in capsys.readouterr().out
