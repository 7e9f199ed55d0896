"""Study results survive anything: SIGKILL at any instant, truncated or garbled files, unusable
output folders. Every case ends either in the result of an uninterrupted study, byte for byte, or
in a one-line refusal (status 2) that changed no file.

The kills are real: ``hdfunc study`` runs in a forked child process that is sent SIGKILL, either
after a random delay or just before the N-th call of one kind (a training step, ``os.fsync``,
``os.replace``, ``os.truncate``, ``os.unlink``) — the instants between the writes of a study.
Profiles (number of examples): tests/hypothesis_profiles.py (HYPOTHESIS_PROFILE=ci|dev).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from hdfunc.studies import cli, load_results
from hdfunc.studies.data import default_mnist_dir, mnist_available
from hdfunc.studies.engine import BatchedTrainer
from hdfunc.studies.storage import StudyDamagedError, summary_checksum
from hypothesis_profiles import PROFILE

REPO = Path(__file__).resolve().parents[1]

# 6 runs in chunks of 2, 1, 2, 1 (ids 0000..0003), 12 steps each, checkpoints at steps 4 and 8
STUDY = """\
problem = "classification"
optimizers = ["sgd", "sgd_hd"]
lr0 = [1e-2]
seeds = 3
steps = 12
batch_size = 16
chunk_size = 2
checkpoint_every = 4
threads = 1
[problem_options]
dim = 4
classes = 3
n_samples = 64
hidden = 4
"""
STEPS_PER_CHUNK = 12
CHILD_TIMEOUT = 60  # seconds; a study child takes well under one
KILL_KINDS = ("step", "fsync", "replace", "truncate", "unlink")
#: occurrences drawn per kind: a little past the calls of an uninterrupted study (48 steps, 34
#: fsyncs, 15 replaces, 4 unlinks; truncate: once, resuming over a torn tail), so some draws
#: let the process finish
KILL_RANGE = {"step": 50, "fsync": 36, "replace": 17, "truncate": 2, "unlink": 6}
#: examples per property: 25 (ci) or 300 (dev) kill sequences, twice as many damaged files
KILL_EXAMPLES = PROFILE.max_examples
DAMAGE_EXAMPLES = 2 * PROFILE.max_examples
#: the ``scratch`` fixture hands out a fresh folder per example, so sharing it is safe
SUPPRESSED = [*PROFILE.suppress_health_check, HealthCheck.function_scoped_fixture]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


# ----------------------------------------------------------------------------- helpers


def study_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--out", str(out), "--quiet", "--no-plots", *extra]


def run_cli(args: list[str]) -> tuple[int, str]:
    """``hdfunc study ARGS`` in this process: (status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        status = cli.main(args)
    return status, stderr.getvalue()


def arm_kill(kind: str, occurrence: int) -> None:
    """SIGKILL this process just before the ``occurrence``-th call of ``kind``."""
    calls = itertools.count(1)

    def armed(function):
        def call(*args, **kwargs):
            if next(calls) == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return call

    if kind == "step":
        make_step = BatchedTrainer._make_step
        BatchedTrainer._make_step = lambda self: armed(make_step(self))
    else:
        setattr(os, kind, armed(getattr(os, kind)))


def run_in_child(args: list[str], kill: tuple[str, int] | None = None,
                 delay: float | None = None) -> int:
    """Run ``hdfunc study ARGS`` in a forked child, killed at a call (``kill``: kind and
    occurrence) or after ``delay`` seconds; returns its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 99
        faulthandler.dump_traceback_later(CHILD_TIMEOUT, exit=True)  # a hang fails, with a trace
        torch.set_num_threads(1)  # an OpenMP pool the parent used does not survive fork()
        try:
            if kill is not None:
                arm_kill(*kill)
            with contextlib.redirect_stdout(io.StringIO()):
                status = cli.main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Checkpoints and temporary files that a finished study must not leave behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.suffix in (".pt", ".tmp"))


def assert_refused(status: int, stderr: str, before: dict, folder: Path, names: str) -> None:
    """A refusal: status 2, one line naming ``names``, no file changed."""
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("hdfunc study: error: ") and names in lines[0], lines[0]
    assert file_hashes(folder) == before


class Study:
    """The tiny study, its uninterrupted result and some interrupted states of it."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "study.toml"
        self.config.write_text(STUDY)
        self.reference = root / "reference"
        status, stderr = run_cli(study_args(self.config, self.reference))
        assert status == 0, stderr
        self.csv = (self.reference / "steps.csv").read_bytes()
        self.summary = json.loads((self.reference / "summary.json").read_text())
        assert self.summary["completed_chunks"] == ["0000", "0001", "0002", "0003"]
        self.states = {"complete": self.reference}
        for name, kill in {"first chunk": ("step", 11),  # chunk 0000 at step 10, saved at 8
                           "mid-study": ("step", 2 * STEPS_PER_CHUNK + 7),  # chunk 0002 at 6
                           "rows not yet recorded": ("replace", 8)}.items():
            folder = root / name.replace(" ", "-")
            status = run_in_child(study_args(self.config, folder), kill)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert list((folder / "checkpoints").glob("chunk-*.pt")), name
            self.states[name] = folder
        torn = self.states["rows not yet recorded"]
        assert (torn / "steps.csv").stat().st_size > json.loads(
            (torn / "summary.json").read_text())["csv_bytes"]

    def copy(self, state: str, destination: Path) -> Path:
        shutil.copytree(self.states[state], destination)
        return destination

    def assert_identical(self, folder: Path) -> None:
        assert (folder / "steps.csv").read_bytes() == self.csv
        assert json.loads((folder / "summary.json").read_text()) == self.summary
        assert leftovers(folder) == []


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    return Study(tmp_path_factory.mktemp("durability"))


@pytest.fixture
def scratch(tmp_path_factory):
    """A fresh folder per call (hypothesis examples share one test invocation)."""
    return lambda: tmp_path_factory.mktemp("case")


# ----------------------------------------------------------------------------- kills


kill_points = st.sampled_from(KILL_KINDS).flatmap(
    lambda kind: st.tuples(st.just(kind), st.integers(1, KILL_RANGE[kind])))
kills = st.one_of(kill_points.map(lambda k: {"kill": k}),
                  st.floats(0.0, 0.5).map(lambda d: {"delay": d}))


@settings(PROFILE, max_examples=KILL_EXAMPLES, suppress_health_check=SUPPRESSED)
@given(sequence=st.lists(kills, min_size=1, max_size=3))
def test_sigkill_at_any_instant_then_resume_is_identical(study, scratch, sequence):
    """Kill the study, then kill its resumptions (1-3 kills in all), then resume once more: the
    result equals the uninterrupted study's, and nothing needed repairing."""
    out = scratch() / "study"
    for attempt, kill in enumerate(sequence):
        extra = ["--resume"] if attempt else []
        status = run_in_child(study_args(study.config, out, *extra), **kill)
        assert (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL) or (
            os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), status
    status, stderr = run_cli(study_args(study.config, out, "--resume"))
    assert status == 0, stderr
    assert "note:" not in stderr  # a kill leaves nothing damaged, only work to redo
    study.assert_identical(out)


def test_the_kill_points_cover_every_write_of_a_study(study, tmp_path, monkeypatch):
    """Each kind of kill point occurs while a study runs or resumes, and the property above draws
    occurrences up to past the last one: it kills between every two writes (not vacuous)."""
    counts = dict.fromkeys(KILL_KINDS, 0)

    def counted(kind, function):
        def call(*args, **kwargs):
            counts[kind] += 1
            return function(*args, **kwargs)
        return call

    for kind in KILL_KINDS[1:]:
        monkeypatch.setattr(os, kind, counted(kind, getattr(os, kind)))
    make_step = BatchedTrainer._make_step
    monkeypatch.setattr(BatchedTrainer, "_make_step", lambda self: counted("step", make_step(self)))
    assert run_cli(study_args(study.config, tmp_path / "fresh"))[0] == 0
    assert counts["step"] == 4 * STEPS_PER_CHUNK and counts["truncate"] == 0
    assert 0 < max(counts.values()) and all(counts[k] < KILL_RANGE[k] for k in KILL_KINDS)
    counts.update(dict.fromkeys(KILL_KINDS, 0))
    torn = study.copy("rows not yet recorded", tmp_path / "torn")
    assert run_cli(study_args(study.config, torn, "--resume"))[0] == 0
    assert 0 < counts["truncate"] < KILL_RANGE["truncate"]
    assert all(counts[k] < KILL_RANGE[k] for k in KILL_KINDS)


# ----------------------------------------------------------------------------- damaged files


@st.composite
def damages(draw):
    state = draw(st.sampled_from(["complete", "first chunk", "mid-study", "rows not yet recorded"]))
    target = draw(st.sampled_from(["steps.csv", "summary.json", "checkpoint"]))
    kind = draw(st.sampled_from(["truncate", "garble", "flip a bit", "change a digit"]))
    position = draw(st.floats(0.0, 1.0, exclude_max=True))
    garbage = draw(st.binary(min_size=1, max_size=8))
    return state, target, kind, position, garbage


def damage(folder: Path, target: str, kind: str, position: float, garbage: bytes) -> Path:
    """Damage ``target`` at a relative ``position``: cut it there, overwrite bytes with
    ``garbage``, flip one bit, or change the next digit into another (damage that still parses:
    a silently wrong number unless checksums catch it). Returns the damaged file."""
    if target == "checkpoint":
        checkpoints = sorted((folder / "checkpoints").glob("chunk-*.pt"))
        assume(checkpoints)
        path = checkpoints[0]
    else:
        path = folder / target
    data = bytearray(path.read_bytes())
    offset = int(position * len(data))
    if kind == "truncate":
        del data[offset:]
    elif kind == "garble":
        data[offset:offset + len(garbage)] = garbage[:len(data) - offset]
    elif kind == "flip a bit":
        data[offset] ^= 1 << garbage[0] % 8
    else:
        digits = [i for i in range(offset, len(data)) if chr(data[i]).isdigit()]
        assume(digits)
        data[digits[0]] = ord("0") + (data[digits[0]] - ord("0") + 1 + garbage[0] % 9) % 10
    assume(data != path.read_bytes())
    path.write_bytes(data)
    return path


@settings(PROFILE, max_examples=DAMAGE_EXAMPLES, suppress_health_check=SUPPRESSED)
@given(case=damages())
def test_damaged_files_are_recovered_or_refused_unchanged(study, scratch, case):
    """Truncate or garble steps.csv, summary.json or a checkpoint anywhere: --resume ends identical
    to the uninterrupted study, or (summary.json really changed) refuses in one line with every
    file unchanged; load_results raises a StudyDamagedError naming the file, never a float error."""
    state, target, kind, position, garbage = case
    out = study.copy(state, scratch() / "study")
    summary_before = (out / "summary.json").read_text()
    path = damage(out, target, kind, position, garbage)
    before = file_hashes(out)

    try:
        load_results(out)
    except StudyDamagedError as error:
        message = str(error)
        assert "\n" not in message and path.name in message and "; " in message, message
    assert file_hashes(out) == before

    status, stderr = run_cli(study_args(study.config, out, "--resume"))
    try:
        summary_unchanged = json.loads((out / "summary.json").read_text()) == json.loads(summary_before)
    except (ValueError, UnicodeDecodeError):
        summary_unchanged = False
    event(f"{target} {kind}: {'refused' if status else 'recovered'}")  # --hypothesis-show-statistics
    if target != "summary.json" or summary_unchanged:
        assert status == 0, stderr  # rows and checkpoints are always recoverable
        study.assert_identical(out)
    else:
        assert_refused(status, stderr, before, out, "summary.json")


def test_issue_reproducer_rows_cut_short_are_retrained_not_padded(study, scratch):
    """Issue 9, part 1: killed after the first chunk, 20 bytes cut off steps.csv, --resume."""
    out = scratch() / "study"
    status = run_in_child(study_args(study.config, out), ("step", STEPS_PER_CHUNK + 1))
    assert os.WIFSIGNALED(status)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed_chunks"] == ["0000"]
    csv = out / "steps.csv"
    csv.write_bytes(csv.read_bytes()[:-20])
    with pytest.raises(StudyDamagedError, match=r"steps\.csv: the rows of chunk 0000 .* --resume"):
        load_results(out)
    status, stderr = run_cli(study_args(study.config, out, "--resume"))
    assert status == 0, stderr
    assert "note:" in stderr and "chunk 0000" in stderr
    assert b"\0" not in csv.read_bytes()
    study.assert_identical(out)
    assert load_results(out).statistics == study.summary["statistics"]


@pytest.mark.skipif(not mnist_available(),
                    reason=f"MNIST not found in {default_mnist_dir()} (HDFUNC_MNIST_DIR)")
def test_issue_reproducer_on_quick_mnist(tmp_path):
    """The issue's own reproducer: studies/quick_mnist.toml, --chunk-size 4 (shortened to 20
    steps), SIGKILL after the first chunk, 20 bytes cut off steps.csv, --resume."""
    config = REPO / "studies" / "quick_mnist.toml"
    extra = ["--chunk-size", "4", "--steps", "20", "--threads", "1"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert run_cli(study_args(config, reference, *extra))[0] == 0
    status = run_in_child(study_args(config, out, *extra), ("step", 20 + 1))
    assert os.WIFSIGNALED(status)
    assert json.loads((out / "summary.json").read_text())["completed_chunks"] == ["0000"]
    csv = out / "steps.csv"
    csv.write_bytes(csv.read_bytes()[:-20])
    status, stderr = run_cli(study_args(config, out, *extra, "--resume"))
    assert status == 0, stderr
    assert csv.read_bytes() == (reference / "steps.csv").read_bytes()
    assert (json.loads((out / "summary.json").read_text())
            == json.loads((reference / "summary.json").read_text()))


# ----------------------------------------------------------------------------- refusals


def rewrite_summary(folder: Path, change) -> None:
    path = folder / "summary.json"
    summary = json.loads(path.read_text())
    change(summary)
    if summary.get("format", 0) >= 2:
        summary["checksum"] = summary_checksum(summary)
    path.write_text(json.dumps(summary, indent=1))


def as_format_1(summary: dict) -> None:
    for key in ("chunks", "checksum"):
        summary.pop(key)
    summary["format"] = 1


def foreign_checkpoint(folder: Path) -> None:
    checkpoints = folder / "checkpoints"
    shutil.copy(checkpoints / "chunk-0002.pt", checkpoints / "chunk-0003.pt")


@pytest.mark.parametrize("state, spoil, names", [
    ("mid-study", lambda f: (f / "summary.json").write_bytes(
        (f / "summary.json").read_bytes().replace(b'"seed": 1', b'"seed": 7', 1)), "summary.json"),
    ("mid-study", lambda f: rewrite_summary(f, as_format_1), "format 1"),
    ("mid-study", lambda f: rewrite_summary(f, lambda s: s.update(merged_from=["a", "b"])), "merged"),
    ("mid-study", lambda f: rewrite_summary(f, lambda s: s["runs"].reverse()), "summary.json"),
    ("mid-study", foreign_checkpoint, "chunk-0003.pt"),
])
def test_refusals_leave_every_file_as_it_was(study, tmp_path, state, spoil, names):
    out = study.copy(state, tmp_path / "study")
    spoil(out)
    before = file_hashes(out)
    status, stderr = run_cli(study_args(study.config, out, "--resume"))
    assert_refused(status, stderr, before, out, names)


def test_a_study_with_unverified_rows_is_not_overwritten(study, tmp_path):
    """steps.csv without summary.json: neither a new study nor --resume writes over it."""
    out = study.copy("mid-study", tmp_path / "study")
    (out / "summary.json").unlink()
    before = file_hashes(out)
    for extra in ([], ["--resume"]):
        status, stderr = run_cli(study_args(study.config, out, *extra))
        assert_refused(status, stderr, before, out, "summary.json is missing")


def test_load_results_of_an_old_study_names_the_unreadable_line(study, tmp_path):
    """A format-1 study (no chunk checksums) whose rows turned into NUL bytes: the error names
    the file and the line instead of failing on a float."""
    out = study.copy("complete", tmp_path / "study")
    rewrite_summary(out, as_format_1)
    assert len(load_results(out).runs) == 6  # old studies still read
    csv = out / "steps.csv"
    data = csv.read_bytes()
    position = data.index(b"\n", len(data) // 2) + 1
    csv.write_bytes(data[:position] + b"sgd,0.01,0.0,1,7,1,0.\0\0\0,0.01\n" + data[position:])
    with pytest.raises(StudyDamagedError, match=r"steps\.csv line \d+ cannot be read .*float"):
        load_results(out)
    csv.write_bytes(data[:-20])
    with pytest.raises(StudyDamagedError, match=r"steps\.csv is shorter than summary\.json"):
        load_results(out)


# ----------------------------------------------------------------------------- output folders


def quadratic_args(out: Path) -> list[str]:
    return ["--problem", "quadratic", "-P", "dim=3", "-P", "n_samples=32", "--optimizers", "sgd",
            "--seeds", "1", "--steps", "2", "--batch-size", "8", "--quiet", "--no-plots",
            "--out", str(out)]


def test_out_below_a_file_ends_with_one_line_and_status_2(tmp_path):
    """Issue 9, part 6, as a user runs it: a real process, no traceback."""
    (tmp_path / "afile").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "hdfunc", "study",
                             *quadratic_args(tmp_path / "afile" / "sub")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"hdfunc study: error: cannot use {tmp_path}/afile/sub as the output folder: "
        f"{tmp_path}/afile is a file, not a folder; choose another --out"]


@pytest.mark.parametrize("make_out, reason", [
    (lambda root: root / "afile", "is a file, not a folder"),
    (lambda root: root / "afile" / "a" / "b", "is a file, not a folder"),
    (lambda root: root / "afile" / "summary.json", "is a file, not a folder"),
])
def test_unusable_out_paths(tmp_path, make_out, reason):
    (tmp_path / "afile").write_text("x")
    status, stderr = run_cli(quadratic_args(make_out(tmp_path)))
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and reason in lines[0], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
@pytest.mark.parametrize("inside", [False, True])
def test_read_only_out_folder(tmp_path, inside):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        status, stderr = run_cli(quadratic_args(folder / "sub" if inside else folder))
    finally:
        folder.chmod(0o755)
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "permission denied" in lines[0], stderr
    assert list(folder.iterdir()) == []


def test_an_unwritable_out_is_reported_before_any_data_is_loaded(tmp_path, monkeypatch):
    """Whoever runs the tests (root too): a folder the OS reports as not writable is refused
    before the problem is built."""
    from hdfunc.studies import engine
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path
                        else real_access(path, mode, **kw))
    monkeypatch.setattr(engine, "make_problem", lambda *a, **k: pytest.fail("data loaded"))
    status, stderr = run_cli(quadratic_args(tmp_path / "new"))
    assert status == 2 and stderr.count("\n") == 1 and "permission denied" in stderr, stderr
    assert not (tmp_path / "new").exists()


def test_a_study_file_that_is_a_folder_ends_with_one_line(tmp_path):
    status, stderr = run_cli(["--config", str(tmp_path), "--quiet"])
    assert status == 2 and stderr.strip().splitlines() == [
        f"hdfunc study: error: cannot read {tmp_path}: Is a directory"]
