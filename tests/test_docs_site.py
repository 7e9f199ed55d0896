"""The documentation site (mkdocs.yml) builds in strict mode: no broken link or anchor, no page
left out of the nav, and every docstring of the API reference readable by mkdocstrings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rules = (site / "reference" / "rules" / "index.html").read_text()
    assert "hdfunc.rules.adam_hd" in rules and "Adam-HD" in rules  # adam_hd's docstring
    assert (site / "index.html").is_file() and (site / "optim" / "index.html").is_file()
    # names listed in a `members:` option that griffe cannot find are left out silently
    optim = (site / "reference" / "optim" / "index.html").read_text()
    for name in ("SGDHD", "SGDNHD", "AdamHD", "AdamWHD", "HDOptimizer"):
        assert f'id="hdfunc.optim.{name}"' in optim, f"hdfunc.optim.{name} missing from the reference"
    studies = (site / "reference" / "studies" / "index.html").read_text()
    for name in ("StudyConfig", "run_study", "load_results"):
        assert f'id="hdfunc.studies.{name}"' in studies, f"hdfunc.studies.{name} missing"
