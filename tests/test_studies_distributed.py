"""A study sharded over 2 processes (torchrun, gloo, loopback) equals the single-process study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import free_port
from hdfunc.studies import StudyConfig, run_study
from hdfunc.studies.distributed import shard_seeds

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def test_shard_seeds_partitions_the_seeds():
    seeds = [3, 1, 4, 15, 9]
    shards = [shard_seeds(seeds, r, 2) for r in range(2)]
    assert shards == [[3, 4, 9], [1, 15]]
    with pytest.raises(ValueError, match="cannot be sharded"):
        shard_seeds([0], 0, 2)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_study_equals_single_process(tmp_path):
    args = ["--problem", "classification", "-P", "dim=6", "-P", "classes=3", "-P", "n_samples=128",
            "-P", "hidden=8", "--optimizers", "sgd,sgd_hd", "--lr0", "1e-2,1e-3", "--seeds", "5",
            "--steps", "25", "--batch-size", "16", "--quiet"]
    out = tmp_path / "sharded"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "hdfunc", "study", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    config = StudyConfig(problem="classification",
                         problem_options={"dim": 6, "classes": 3, "n_samples": 128, "hidden": 8},
                         optimizers=["sgd", "sgd_hd"], lr0=[1e-2, 1e-3], seeds=5, steps=25,
                         batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_study(config, tmp_path / "single", progress=False, plots=False)
    finally:
        torch.set_num_threads(threads)

    merged = json.loads((out / "summary.json").read_text())
    assert merged["complete"] and len(merged["runs"]) == 20
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank-0", "rank-1"]
    shard0 = json.loads((out / "shards" / "rank-0" / "summary.json").read_text())
    assert {r["seed"] for r in shard0["runs"]} == {0, 2, 4}
    for a, b in zip(merged["runs"], [vars(r) for r in single.runs]):
        assert (a["optimizer"], a["lr0"], a["beta"], a["seed"]) == (
            b["optimizer"], b["lr0"], b["beta"], b["seed"])
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
    rows_sharded = (out / "steps.csv").read_text().splitlines()
    rows_single = (tmp_path / "single" / "steps.csv").read_text().splitlines()
    assert len(rows_sharded) == len(rows_single) == 1 + 20 * 25
    keys = lambda rows: [r.split(",")[:5] for r in rows]  # noqa: E731
    assert keys(rows_sharded) == keys(rows_single)
    numbers = lambda rows: np.array([[float(x) for x in r.split(",")[5:]] for r in rows[1:]])  # noqa: E731
    np.testing.assert_allclose(numbers(rows_sharded), numbers(rows_single), rtol=1e-5)
    assert (out / "plots" / "loss.png").is_file()
    assert [r["hd_better"] for r in merged["statistics"]["paired"]] == [
        r["hd_better"] for r in single.statistics["paired"]]
