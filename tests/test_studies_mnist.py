"""On the real MNIST images (../shared/data/mnist; skipped when absent): SGD-HD beats SGD at the
paper's α_0 = 1e-3 on every seed, and the documented small study writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hdfunc.studies import StudyConfig, run_study
from hdfunc.studies.data import default_mnist_dir, mnist_available

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not mnist_available(),
                                reason=f"MNIST not found in {default_mnist_dir()} (HDFUNC_MNIST_DIR)")


def test_sgd_hd_reaches_lower_loss_than_sgd_on_every_seed(tmp_path):
    config = StudyConfig.from_toml(REPO / "studies" / "quick_mnist.toml",
                                   optimizers=["sgd", "sgd_hd"], steps=150, threads=1)
    assert (config.batch_size, config.weight_decay, config.lr0) == (128, 1e-4, [1e-3])
    results = run_study(config, tmp_path, progress=False)
    sgd = results.final_losses("sgd", 1e-3)
    sgd_hd = results.final_losses("sgd_hd", 1e-3, 1e-3)
    assert sorted(sgd) == sorted(sgd_hd) == list(range(8))
    for seed in sgd:
        assert sgd_hd[seed] < sgd[seed], (seed, sgd_hd[seed], sgd[seed])
    # the rate really grew from α_0 (HD accelerates the too-small rate)
    assert all(results.run("sgd_hd", 1e-3, 1e-3, s).final_lr > 2e-3 for s in range(8))
    paired = json.loads((tmp_path / "summary.json").read_text())["statistics"]["paired"][0]
    assert paired["hd_better"] == 8 and paired["sign_test_p"] == pytest.approx(0.5 ** 8)
    for name in ("loss.png", "lr.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert "10000 images" in results.problem
