"""Figures of a study (matplotlib, Agg backend; PNG files small enough for docs).

* ``loss.png``          minibatch loss vs iteration, mean over seeds with a 95 % CI band
                        (moving-average smoothed), one panel per α_0
* ``lr.png``            the applied learning rate α_t vs iteration, same layout
* ``final_vs_lr0.png``  the paper's key picture: median final loss (95 % bootstrap CI) vs α_0
                        over decades, one panel per base optimizer with its HD variant(s)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats as sps  # noqa: E402

MAX_POINTS = 600
DPI = 80


def _label(optimizer: str, beta: float, betas: int) -> str:
    return f"{optimizer} β={beta:g}" if betas > 1 and beta else optimizer


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (nan-aware) over ``window`` points."""
    if window <= 1:
        return y
    kernel = np.ones(window)
    valid = np.isfinite(y)
    total = np.convolve(np.where(valid, y, 0.0), kernel)[: len(y)]
    count = np.convolve(valid.astype(float), kernel)[: len(y)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_band(curves: np.ndarray, confidence: float = 0.95) -> tuple:
    """Mean over runs (axis 0) and its t-interval, ignoring non-finite values."""
    curves = np.where(np.isfinite(curves), curves, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves, axis=0)
        n = np.sum(np.isfinite(curves), axis=0)
        sd = np.nanstd(curves, axis=0, ddof=1) if curves.shape[0] > 1 else np.zeros_like(mean)
        half = sps.t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1))
    half = np.where(n > 1, half, 0.0)
    return mean, mean - half, mean + half


def _grid(count: int, cols: int | None = None) -> tuple[plt.Figure, list]:
    cols = min(count, cols or 3)
    rows = math.ceil(count / cols)
    width = max(4.6 * cols, 7.0)  # room for the title above a single panel
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _thin(steps: np.ndarray) -> np.ndarray:
    stride = max(1, len(steps) // MAX_POINTS)
    return np.arange(0, len(steps), stride)


def plot_curves(results: Any, path: Path, which: str) -> Path | None:
    """Loss (``which="loss"``) or applied rate (``"lr"``) vs iteration."""
    config = results.config
    if not results.curves:
        return None
    lr0s = [float(x) for x in config.lr0]
    specs = config.optimizer_specs
    if which == "loss":  # one panel per α_0, all optimizers together
        panels = [(lr0, specs, f"α₀ = {lr0:g}") for lr0 in lr0s]
        fig, axes = _grid(len(panels))
    else:  # rates differ by orders of magnitude between families: one panel per α_0 and family
        families = list(dict.fromkeys(s.base_name for s in specs))
        panels = [(lr0, [s for s in specs if s.base_name == family], f"{family}, α₀ = {lr0:g}")
                  for lr0 in lr0s for family in families]
        fig, axes = _grid(len(panels), cols=len(families))
    index = 0 if which == "loss" else 1
    window = max(1, len(results.steps) // 50) if which == "loss" else 1
    keep = _thin(results.steps)
    positive = True
    for ax, (lr0, panel_specs, title) in zip(axes, panels):
        for spec in panel_specs:
            betas = config.betas_for(spec)
            for beta in betas:
                curves = [results.curves[r.key][index] for r in results.runs
                          if r.optimizer == spec.label and r.lr0 == lr0 and r.beta == beta
                          and r.key in results.curves]
                if not curves:
                    continue
                data = np.stack([smooth(c, window) for c in curves])
                mean, low, high = mean_band(data)
                positive &= bool(np.nanmin(np.where(np.isfinite(data), data, np.inf)) > 0)
                x = results.steps[keep]
                line, = ax.plot(x, mean[keep], lw=1.3, label=_label(spec.label, beta, len(betas)))
                ax.fill_between(x, low[keep], high[keep], color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (minibatch)" if which == "loss" else "learning rate α_t")
        ax.grid(alpha=0.3)
    for ax in axes:
        if which == "loss" and positive:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    n = len(config.seed_list)
    what = "loss, smoothed" if which == "loss" else "applied learning rate"
    fig.suptitle(f"{config.name}: {what}; mean over {n} seeds, 95% CI band", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_final_vs_lr0(results: Any, path: Path) -> Path | None:
    """Median final loss (with CI) vs α_0, per base optimizer and its HD variants."""
    config = results.config
    table = (results.statistics or {}).get("final_loss", [])
    if len(config.lr0) < 2 or not table:
        return None
    specs = config.optimizer_specs
    families = list(dict.fromkeys(s.base_name for s in specs))
    fig, axes = _grid(len(families))
    for ax, family in zip(axes, families):
        for spec in (s for s in specs if s.base_name == family):
            betas = config.betas_for(spec)
            for beta in betas:
                rows = sorted((r for r in table if r["optimizer"] == spec.label and r["beta"] == beta),
                              key=lambda r: r["lr0"])
                if not rows:
                    continue
                x = np.array([r["lr0"] for r in rows])
                top = max((r["ci_high"] or 0) for r in rows if r["median"] is not None) \
                    if any(r["median"] is not None for r in rows) else 1.0
                y = np.array([r["median"] if r["median"] is not None else np.nan for r in rows])
                low = np.array([r["ci_low"] if r["ci_low"] is not None else np.nan for r in rows])
                high = np.array([r["ci_high"] if r["ci_high"] is not None else top for r in rows])
                style = "-o" if spec.is_hd else "--s"
                line, = ax.plot(x, y, style, ms=4, label=_label(spec.label, beta, len(betas)))
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
                diverged = [r["lr0"] for r in rows if r["median"] is None]
                if diverged:
                    ax.plot(diverged, [top] * len(diverged), "x", color=line.get_color(), ms=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("initial learning rate α₀")
        ax.set_ylabel("final training loss (median)")
        ax.set_title(family, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"{config.name}: final loss vs α₀ ({len(config.seed_list)} seeds, 95% CI; "
                 f"x: diverged)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_study(results: Any, folder: str | Path) -> list[Path]:
    """Write all figures of ``results`` into ``folder``; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(results, folder / "loss.png", "loss"),
               plot_curves(results, folder / "lr.png", "lr"),
               plot_final_vs_lr0(results, folder / "final_vs_lr0.png")]
    return [p for p in written if p is not None]
