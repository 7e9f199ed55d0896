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


def test_every_test_named_in_the_reliability_table_exists():
    """docs/reliability.md: each row names the test that tries its input again; a renamed or
    deleted test must take its row with it."""
    text = (DOCS / "reliability.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 25
    root = DOCS.parent
    for path, name in named:
        source = (root / path).read_text()
        assert re.search(rf"^def {name}\(", source, flags=re.M), f"{path}::{name} does not exist"
