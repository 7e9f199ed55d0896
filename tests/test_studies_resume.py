"""Interrupted studies resume without recomputing and end exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hdfunc.studies import StudyConfig, run_study
from hdfunc.studies.engine import BatchedTrainer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> StudyConfig:
    base = dict(problem="classification",
                problem_options={"dim": 8, "classes": 4, "n_samples": 256, "hidden": 16},
                optimizers=["sgd", "sgd_hd"], lr0=[1e-2, 1e-3], seeds=3, steps=30, batch_size=32,
                chunk_size=3, checkpoint_every=5)
    base.update(changes)
    return StudyConfig(**base)


def outputs(folder: Path) -> tuple[str, list]:
    summary = json.loads((folder / "summary.json").read_text())
    return (folder / "steps.csv").read_text(), summary["runs"], summary["statistics"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("error, changes, saved", [
    (Interrupt, {"checkpoint_every": 5}, 15),  # a crash: back to the last periodic checkpoint
    (KeyboardInterrupt, {"checkpoint_every": 0, "checkpoint_seconds": 1e9}, 17),  # Ctrl-C: saved
])
def test_resume_after_interruption_mid_chunk(tmp_path, monkeypatch, error, changes, saved):
    reference = tmp_path / "reference"
    run_study(config(**changes), reference, progress=False, plots=False)

    calls = {"n": 0}
    original = BatchedTrainer._make_step

    def failing_make_step(self):
        step = original(self)

        def counted(*args):
            calls["n"] += 1
            if calls["n"] == 30 + 30 + 18:  # two chunks done, third interrupted in step 18
                raise error
            return step(*args)
        return counted

    monkeypatch.setattr(BatchedTrainer, "_make_step", failing_make_step)
    out = tmp_path / "interrupted"
    with pytest.raises(error):
        run_study(config(**changes), out, progress=False, plots=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed_chunks"] == ["0000", "0001"] and not summary["complete"]
    checkpoint = torch.load(out / "checkpoints" / "chunk-0002.pt", weights_only=False)
    assert checkpoint["step"] == saved
    with open(out / "steps.csv", "a") as f:  # a torn write after the last summary is cut off
        f.write("sgd,0.001,0.0,9,1,0.5")

    steps_before = calls["n"]
    calls["n"] = -10**9  # never fail again; count the steps the resumed study trains
    run_study(config(**changes), out, resume=True, progress=False, plots=False)
    resumed_steps = calls["n"] + 10**9
    assert steps_before == 78
    assert resumed_steps == (30 - saved) + 30  # the rest of chunk 2 and chunk 3 only
    assert outputs(out) == outputs(reference)
    assert not list((out / "checkpoints").glob("*.pt"))


def test_resume_after_kill(tmp_path):
    """SIGKILL a running ``hdfunc study`` mid-way, then --resume: identical final results."""
    cfg = config(steps=80, checkpoint_every=10, seeds=4, chunk_size=4)
    study = tmp_path / "study.toml"
    study.write_text(
        'problem = "classification"\noptimizers = ["sgd", "sgd_hd"]\nlr0 = [1e-2, 1e-3]\n'
        'seeds = 4\nsteps = 80\nbatch_size = 32\nchunk_size = 4\ncheckpoint_every = 10\n'
        '[problem_options]\ndim = 8\nclasses = 4\nn_samples = 256\nhidden = 16\n')
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "hdfunc", "study", "--config", str(study), "--out", str(out),
               "--quiet", "--no-plots"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    killed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        summary_path = out / "summary.json"
        if summary_path.is_file():
            try:
                done = json.loads(summary_path.read_text())["completed_chunks"]
            except (json.JSONDecodeError, KeyError):
                done = []
            if done and list((out / "checkpoints").glob("*.pt")):
                process.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    process.wait(timeout=60)
    assert killed, f"the study ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    assert not json.loads((out / "summary.json").read_text())["complete"]

    resumed = subprocess.run(command + ["--resume"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = tmp_path / "reference"
    run_study(cfg, reference, progress=False, plots=False)
    assert outputs(out) == outputs(reference)
