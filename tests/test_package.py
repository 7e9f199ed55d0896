"""The package around the code: one version, license and types in the wheel, lazy imports (the
CLI's ``--help`` never imports torch), program names and plain text in every ``--help``,
progress reports without cursor codes when redirected, and where the data folders come from.

No test here is timed: how fast ``--help`` answers is measured by hand (README), and here only
its cause is checked (torch is not imported)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import hdfunc

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def python(code: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=300)


def hdfunc_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hdfunc", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- version, metadata


def test_version_has_one_source():
    from hdfunc._version import __version__

    assert hdfunc.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", __version__)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "hdfunc._version.__version__"}
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {__version__}" in changelog


def test_hdfunc_version_option():
    done = hdfunc_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"hdfunc {hdfunc.__version__}"


def test_metadata_license_and_typing_marker():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert project["authors"] and project["keywords"] and project["urls"]
    assert "Typing :: Typed" in project["classifiers"]
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "hdfunc contributors" in license_text
    assert (REPO / "hdfunc" / "py.typed").is_file()


@pytest.mark.slow
def test_wheel_holds_license_and_py_typed(tmp_path):
    """Build the wheel as ``pip install .`` would (no network: the installed setuptools)."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {done.stderr[-500:]}")
    (wheel,) = (tmp_path / "wheel").glob("hdfunc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert "hdfunc/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(n.startswith("verification/") for n in names)
    text = metadata.decode()
    assert f"Version: {hdfunc.__version__}" in text and "License-Expression: MIT" in text
    assert "Author: hdfunc contributors" in text


# ----------------------------------------------------------------------------- lazy imports


def test_lazy_submodules_and_every_exported_name():
    done = python("import sys, hdfunc\n"
                  "assert 'torch' not in sys.modules\n"
                  "from hdfunc.optim import AdamHD\n"
                  "assert hdfunc.optim.AdamHD is AdamHD\n"
                  "assert hdfunc.studies.StudyConfig.__name__ == 'StudyConfig'\n"
                  "for name in hdfunc.__all__: getattr(hdfunc, name)\n"
                  "import hdfunc.hypergradient\n"
                  "assert callable(hdfunc.hypergradient) and hdfunc.hypergradient.__name__ == 'hypergradient'\n"
                  "print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert set(hdfunc.__all__) <= set(dir(hdfunc))
    assert len(hdfunc.__all__) == len(set(hdfunc.__all__))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hdfunc.nope  # noqa: B018


def test_lazy_exports_match_the_type_checking_imports():
    """Each lazily exported name is also imported under TYPE_CHECKING (for type checkers and
    editors), from the same module, and the module really defines it."""
    import ast
    import importlib

    for package in ("hdfunc", "hdfunc.studies", "verification"):
        module = importlib.import_module(package)
        tree = ast.parse(Path(module.__file__).read_text())
        guarded = next(node for node in tree.body if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING")
        imported = {alias.name: node.module for node in guarded.body
                    if isinstance(node, ast.ImportFrom) and node.module != package
                    for alias in node.names}
        assert imported == module._WHERE, package
        assert sorted(module.__all__) == sorted(module._WHERE), package
        for name, where in module._WHERE.items():
            assert hasattr(importlib.import_module(where), name), (where, name)


@pytest.mark.parametrize("command", [[], ["demo"], ["verify"], ["study"]])
def test_help_does_not_import_torch(command):
    """``hdfunc [command] --help`` prints its help without importing torch (what makes it fast)."""
    code = ("import contextlib, io, sys\n"
            "from hdfunc.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            f"        status = main({command!r} + ['--help'])\n"
            "    except SystemExit as stop:\n"
            "        status = stop.code\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'scipy', 'matplotlib') if m in sys.modules)\n"
            "print(status, heavy, repr(out.getvalue()[:40]))")
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0 [] 'usage: hdfunc"), done.stdout


def test_problem_names_in_the_cli_match_the_registries():
    from hdfunc.studies import cli as study_cli
    from hdfunc.studies.problems import PROBLEMS
    from verification import cli as verify_cli
    from verification.problems import PROBLEM_NAMES

    assert sorted(study_cli.PROBLEM_NAMES) == sorted(PROBLEMS)
    assert tuple(verify_cli.PROBLEM_NAMES) == tuple(PROBLEM_NAMES)


# ----------------------------------------------------------------------------- help texts


@pytest.mark.parametrize("command", ["demo", "verify", "study"])
def test_help_names_the_program_and_is_plain_text(command):
    done = hdfunc_cli(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: hdfunc {command} ")
    assert "python -m" not in done.stdout.split("\n\n")[0]
    for markup in ("``", ":func:", ":mod:", ":class:", ":data:"):
        assert markup not in done.stdout, (markup, done.stdout)
    assert not re.search(r"^\s*\.\. ", done.stdout, flags=re.M)  # no directives


def test_top_level_help_lists_every_command():
    from hdfunc.cli import SUBCOMMANDS

    done = hdfunc_cli("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: hdfunc")
    assert "--version" in done.stdout
    for name in SUBCOMMANDS:
        assert f"\n  {name} " in done.stdout


def test_python_m_verification_keeps_its_own_name():
    done = subprocess.run([sys.executable, "-m", "verification", "--help"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m verification ")


# ----------------------------------------------------------------------------- progress


def test_redirected_progress_is_plain_lines():
    from hdfunc._progress import PlainProgress, progress_bar

    out = io.StringIO()
    bar = progress_bar(total=50, desc="chunks", unit="chunk", file=out)
    assert isinstance(bar, PlainProgress)
    bar.set_description("sgd_hd (8 runs)")
    bar.set_postfix_str("quadratic", refresh=False)
    for _ in range(50):
        bar.update()
    bar.reset(total=10)
    bar.update(10)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 10 <= len(lines) <= 12, lines  # about every 10%, not every update
    assert lines[-2].startswith("sgd_hd (8 runs): 50/50 chunk (100%)")
    assert lines[-1].startswith("sgd_hd (8 runs): 10/10 chunk (100%)")


def test_redirected_study_progress_has_no_cursor_codes(tmp_path):
    """A real command with stderr sent to a pipe: plain progress lines, no ``\\r`` or escapes."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    study = subprocess.run(
        [sys.executable, "-m", "hdfunc", "study", "--problem", "quadratic", "-P", "dim=3",
         "-P", "n_samples=32", "--optimizers", "sgd,sgd_hd", "--seeds", "2", "--steps", "20",
         "--batch-size", "8", "--threads", "1", "--no-plots", "--out", str(tmp_path / "s")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert study.returncode == 0, study.stderr
    assert "\r" not in study.stderr and "\x1b" not in study.stderr
    assert re.search(r"^chunks: \d+/\d+ chunk \(100%\)", study.stderr, flags=re.M), study.stderr


def test_redirected_verification_progress_has_no_cursor_codes(capsys):
    import verification

    report = verification.run(quick=True, only="sgd_hd[[]global,additive[]]",
                              problems=["tiny_quadratic"], progress=True, threads=1)
    assert report.passed
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert re.search(r"^verifying: (\d+)/\1 task \(100%\)", err, flags=re.M), err


# ----------------------------------------------------------------------------- data folders


def test_data_folder_precedence(tmp_path, monkeypatch):
    from hdfunc.studies import data

    work = tmp_path / "work"
    (work / "data" / "mnist").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("HDFUNC_MNIST_DIR", raising=False)
    # 3. the working directory's data/mnist, then ../shared/data/mnist beside it
    assert data.default_mnist_dir().resolve() == (work / "data" / "mnist").resolve()
    (work / "data" / "mnist").rmdir()
    assert data.default_mnist_dir().resolve() == (tmp_path / "shared" / "data" / "mnist").resolve()
    # 2. the environment variable (relative: from the working directory) wins over those
    monkeypatch.setenv("HDFUNC_MNIST_DIR", "elsewhere")
    assert data.default_mnist_dir().resolve() == (work / "elsewhere").resolve()
    with pytest.raises(data.DatasetError, match=re.escape(str((work / "elsewhere").resolve()))):
        data.load_mnist()
    # 1. an explicit folder wins over everything; relative ones start at the working directory
    assert data.resolve_data_dir("x") == Path("x")
    assert data.resolve_data_dir("x", relative_to=tmp_path) == tmp_path / "x"
    assert data.resolve_data_dir(tmp_path / "y", relative_to=work) == tmp_path / "y"
    assert data.resolve_data_dir("~/z") == Path.home() / "z"
    # never the installed package's folder
    assert "hdfunc" not in str(data.default_data_dirs("mnist")[0].resolve().relative_to(tmp_path))
    monkeypatch.delenv("HDFUNC_MNIST_DIR")
    assert all(not p.is_absolute() for p in data.default_data_dirs("cifar10"))


def test_study_file_data_dir_is_relative_to_the_study_file(tmp_path, monkeypatch):
    from hdfunc.studies import cli

    folder = tmp_path / "studies"
    folder.mkdir()
    toml = folder / "s.toml"
    toml.write_text('problem = "logreg"\noptimizers = ["sgd"]\nsteps = 1\n'
                    'problem_options = { data_dir = "../mnist" }\n')
    monkeypatch.chdir(tmp_path / "studies")
    config = cli.config_from_args(cli.build_parser().parse_args(["--config", str(toml)]))
    assert Path(config.problem_options["data_dir"]) == folder / ".." / "mnist"
    # the command line's folder, relative to the working directory, overrides the file's
    config = cli.config_from_args(cli.build_parser().parse_args(
        ["--config", "s.toml", "--data-dir", "here"]))
    assert config.problem_options["data_dir"] == "here"
    monkeypatch.chdir(tmp_path)
    config = cli.config_from_args(cli.build_parser().parse_args(["--config", "studies/s.toml"]))
    assert Path(config.problem_options["data_dir"]) == Path("studies") / ".." / "mnist"
    status = cli.main(["--config", "studies/s.toml", "--quiet", "--no-plots"])
    assert status == 2  # no MNIST there; the error names the folder (tested in test_studies)
    # the Python API reads the file the same way, from any working directory
    from hdfunc.studies import StudyConfig

    monkeypatch.chdir(folder)
    assert Path(StudyConfig.from_toml(toml).problem_options["data_dir"]) == folder / ".." / "mnist"
    assert StudyConfig.from_toml(toml, problem_options={"data_dir": "x"}).problem_options == {
        "data_dir": "x"}  # an override is the caller's, taken as given


# ----------------------------------------------------------------------------- README


def test_readme_states_test_time_and_fast_subset():
    readme = (REPO / "README.md").read_text()
    assert "bash run.sh test -m \"not slow\"" in readme
    assert re.search(r"bash run\.sh test\s*(#|\n)", readme)
    assert "six rules" not in readme
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in markers["markers"])
    assert any("pytest.mark.slow" in p.read_text() for p in (REPO / "tests").glob("test_*.py")
               if p.name != "test_package.py")


def test_summary_json_records_the_version(tmp_path):
    from hdfunc.studies import StudyConfig, run_study

    config = StudyConfig(problem="quadratic", problem_options={"dim": 2, "n_samples": 16},
                         optimizers=["sgd"], seeds=1, steps=2, batch_size=4, threads=1)
    run_study(config, tmp_path, progress=False, plots=False)
    assert json.loads((tmp_path / "summary.json").read_text())["hdfunc_version"] == hdfunc.__version__
