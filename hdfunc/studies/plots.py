"""Figures of a study (matplotlib, Agg backend; PNG, at least 1000 px wide).

Curves show every seed as a thin line and the **median over seeds** (the statistic the tables
report) as a thick one; a band — the 95 % percentile-bootstrap interval of that median — is drawn
only with at least :data:`BAND_MIN_SEEDS` seeds (with fewer it says little and, unlike a
t-interval, it never reaches beyond the seeds' own values).

* ``loss.png``          minibatch training loss vs iteration (moving-average smoothed), log-log,
                        one panel per α_0 (the paper's Fig. 2 sweep layout)
* ``lr.png``            the applied learning rate α_t vs iteration, one panel per α_0 and rule
                        family; log axes (symlog where some α_t ≤ 0, as SGD-HD's can be)
* ``epochs.png``        per epoch: mean minibatch training loss and, with a validation set,
                        validation loss (the paper's Fig. 3), one column per α_0
* ``final_vs_lr0.png``  median of the study's metric vs α_0 over decades, per base optimizer and
                        its HD variant(s) (with ≥ 2 values of α_0)
* ``grid_<hd>.png``     the α_0 × β grid of each HD optimizer (and its base) as a heat map of the
                        median iterations to ``target_loss`` (the paper's Fig. 4), or of the
                        study's metric without a target (with ≥ 2 values of α_0 or β)
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MAX_POINTS = 600
DPI = 100
PANEL_WIDTH, PANEL_HEIGHT, MIN_WIDTH = 5.6, 4.2, 10.5  # inches; MIN_WIDTH × DPI ≥ 1000 px
BAND_MIN_SEEDS = 8
BOOTSTRAP = 400
FONT = 11


def _label(optimizer: str, beta: float, betas: int) -> str:
    return f"{optimizer} β={beta:g}" if betas > 1 and beta else optimizer


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (nan-aware) over ``window`` points.

    Args:
        y: a 1-d series.
        window: the number of points averaged (<= 1: ``y`` unchanged).

    Returns:
        The smoothed series, of ``y``'s length (nan where the window holds no finite value).
    """
    if window <= 1:
        return y
    kernel = np.ones(window)
    valid = np.isfinite(y)
    total = np.convolve(np.where(valid, y, 0.0), kernel)[: len(y)]
    count = np.convolve(valid.astype(float), kernel)[: len(y)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def median_band(curves: np.ndarray, confidence: float = 0.95, resamples: int = BOOTSTRAP,
                seed: int = 0) -> tuple:
    """Median over runs (axis 0) and, with at least :data:`BAND_MIN_SEEDS` runs, the percentile
    bootstrap interval of that median at each point (runs resampled with replacement); non-finite
    values are ignored.

    Args:
        curves: ``(runs, points)``.
        confidence: the level of the interval.
        resamples: bootstrap resamples.
        seed: the seed of the resampling.

    Returns:
        ``(median, low, high)``; ``low`` and ``high`` are None with fewer runs.
    """
    curves = np.where(np.isfinite(curves), curves, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(curves, axis=0)
        if curves.shape[0] < BAND_MIN_SEEDS:
            return median, None, None
        pick = np.random.default_rng(seed).integers(0, curves.shape[0], (resamples, curves.shape[0]))
        medians = np.nanmedian(curves[pick], axis=1)
        tail = 50 * (1 - confidence)
        low, high = np.nanpercentile(medians, [tail, 100 - tail], axis=0)
    return median, low, high


def _grid(count: int, cols: int | None = None) -> tuple[plt.Figure, list]:
    cols = min(count, cols or 3)
    rows = math.ceil(count / cols)
    width = max(PANEL_WIDTH * cols, MIN_WIDTH)
    fig, axes = plt.subplots(rows, cols, figsize=(width, PANEL_HEIGHT * rows + 0.6), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _thin(steps: np.ndarray) -> np.ndarray:
    stride = max(1, len(steps) // MAX_POINTS)
    keep = np.arange(0, len(steps), stride)
    return np.union1d(keep, [len(steps) - 1]) if len(steps) else keep


def _layout(fig: plt.Figure) -> None:
    """tight_layout leaving room for the figure's title (about 0.5 inch, whatever the height)."""
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))


def _style(ax: plt.Axes) -> None:
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=FONT - 1)


def _draw(ax: plt.Axes, x: np.ndarray, data: np.ndarray, label: str) -> bool:
    """Thin per-seed lines, the median (thick) and its band; returns whether anything showed."""
    median, low, high = median_band(data)
    if not np.any(np.isfinite(median)):
        return False
    line, = ax.plot(x, median, lw=2.0, label=label, zorder=3)
    for row in data:
        ax.plot(x, row, lw=0.6, alpha=0.3, color=line.get_color(), zorder=2)
    if low is not None:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.25, lw=0, zorder=1)
    return True


def _finish_curves(ax: plt.Axes, x: np.ndarray, shown: list[np.ndarray], ylabel: str) -> None:
    """Label and scale a panel of curves against the iteration: a log iteration axis (when it
    starts above 0), the value axis fitted to the ``shown`` data, a legend, the common style."""
    ax.set_xlabel("iteration", fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    if x[0] > 0:
        ax.set_xscale("log")
    if shown:
        _set_value_scale(ax, np.concatenate(shown))
        ax.legend(fontsize=FONT - 1)
    _style(ax)


def _set_value_scale(ax: plt.Axes, values: np.ndarray) -> None:
    """Log scale for positive values, symlog when some are ≤ 0 (linear near zero)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return
    if np.all(finite > 0):
        ax.set_yscale("log")
        return
    nonzero = np.abs(finite[finite != 0])
    linthresh = float(np.percentile(nonzero, 5)) if nonzero.size else 1e-6
    ax.set_yscale("symlog", linthresh=max(linthresh, 1e-12))
    ax.axhline(0.0, color="0.3", lw=0.8)


def _suffix(results: Any) -> str:
    n = len(results.config.seed_list)
    band = ("; band: 95% bootstrap CI of the median" if n >= BAND_MIN_SEEDS else
            f"; no band (fewer than {BAND_MIN_SEEDS} seeds)")
    return f"median over {n} seeds (thick), each seed (thin){band}"


def _runs(results: Any, label: str, lr0: float, beta: float) -> list:
    return [r for r in results.runs if r.optimizer == label and r.lr0 == lr0 and r.beta == beta]


def plot_curves(results: Any, path: Path, which: str) -> Path | None:
    """Loss (``which="loss"``) or applied rate (``"lr"``) vs iteration, on log axes.

    Args:
        results: a ``StudyResults``.
        path: the PNG file to write.
        which: "loss" or "lr".

    Returns:
        ``path``, or None (nothing written) if the study has no curves.
    """
    config = results.config
    if not results.curves or len(results.steps) == 0:
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
        fig, axes = _grid(len(panels), cols=len(families) if len(families) > 1 else 3)
    index = 0 if which == "loss" else 1
    window = max(1, len(results.steps) // 50) if which == "loss" else 1
    keep = _thin(results.steps)
    x = results.steps[keep]
    for ax, (lr0, panel_specs, title) in zip(axes, panels):
        shown: list[np.ndarray] = []
        for spec in panel_specs:
            betas = config.betas_for(spec)
            for beta in betas:
                curves = [results.curves[r.key][index] for r in _runs(results, spec.label, lr0, beta)
                          if r.key in results.curves]
                if not curves:
                    continue
                data = np.stack([smooth(c, window)[keep] for c in curves])
                if _draw(ax, x, data, _label(spec.label, beta, len(betas))):
                    shown.append(data.ravel())
        ax.set_title(title, fontsize=FONT)
        _finish_curves(ax, x, shown, "training loss (minibatch, smoothed)" if which == "loss"
                       else "learning rate α_t")
    what = "training loss" if which == "loss" else "applied learning rate"
    fig.suptitle(f"{config.name}: {what}; {_suffix(results)}", fontsize=FONT)
    _layout(fig)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_epochs(results: Any, path: Path) -> Path | None:
    """Per epoch: mean minibatch training loss and (with a validation set) validation loss.

    Args:
        results: a ``StudyResults``.
        path: the PNG file to write.

    Returns:
        ``path``, or None if the runs carry no per-epoch metrics.
    """
    config = results.config
    if not any(r.epoch_metrics.get("train_loss") for r in results.runs):
        return None
    rows = ["train_loss"] + (["val_loss"] if any("val_loss" in r.epoch_metrics
                                                 for r in results.runs) else [])
    lr0s = [float(x) for x in config.lr0]
    cols = len(lr0s)
    fig, axes = plt.subplots(len(rows), cols, squeeze=False,
                             figsize=(max(PANEL_WIDTH * cols, MIN_WIDTH), PANEL_HEIGHT * len(rows) + 0.6))
    titles = {"train_loss": "training loss (mean minibatch loss of the epoch)",
              "val_loss": "validation loss (after the epoch)"}
    for i, metric in enumerate(rows):
        for j, lr0 in enumerate(lr0s):
            ax = axes[i][j]
            shown = []
            for spec in config.optimizer_specs:
                betas = config.betas_for(spec)
                for beta in betas:
                    runs = [r for r in _runs(results, spec.label, lr0, beta)
                            if r.epoch_metrics.get(metric)]
                    if not runs:
                        continue
                    length = min(len(r.epoch_metrics[metric]) for r in runs)
                    data = np.array([[np.nan if v is None else v for v in r.epoch_metrics[metric][:length]]
                                     for r in runs], dtype=np.float64)
                    if _draw(ax, np.arange(1, length + 1), data, _label(spec.label, beta, len(betas))):
                        shown.append(data.ravel())
            ax.set_title(f"α₀ = {lr0:g}: {titles[metric]}", fontsize=FONT)
            ax.set_xlabel("epoch", fontsize=FONT)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric.replace("_", " "), fontsize=FONT)
            if shown:
                _set_value_scale(ax, np.concatenate(shown))
                ax.legend(fontsize=FONT - 1)
            _style(ax)
    fig.suptitle(f"{config.name}: per epoch; {_suffix(results)}", fontsize=FONT)
    _layout(fig)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _metric_rows(results: Any, metric: str) -> list[dict]:
    statistics = results.statistics or {}
    per_metric = statistics.get("metrics", {})
    if metric in per_metric:
        return per_metric[metric]["table"]
    return statistics.get("final_loss", []) if metric == "final_loss" else []


def plot_final_vs_lr0(results: Any, path: Path, metric: str | None = None) -> Path | None:
    """Median of ``metric`` (with its CI) vs α_0, per base optimizer and its HD variants.

    Args:
        results: a ``StudyResults`` with statistics.
        path: the PNG file to write.
        metric: the metric (default: the study's).

    Returns:
        ``path``, or None (nothing written) with fewer than two α_0 or no statistics.
    """
    config = results.config
    metric = metric or config.metric
    table = _metric_rows(results, metric)
    if len(config.all_lr0()) < 2 or not table:
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
                finite = [r["ci_high"] for r in rows if r["ci_high"] is not None]
                top = max(finite) if finite else 1.0
                y = np.array([r["median"] if r["median"] is not None else np.nan for r in rows])
                low = np.array([r["ci_low"] if r["ci_low"] is not None else np.nan for r in rows])
                high = np.array([r["ci_high"] if r["ci_high"] is not None else top for r in rows])
                style = "-o" if spec.is_hd else "--s"
                line, = ax.plot(x, y, style, ms=5, lw=1.8, label=_label(spec.label, beta, len(betas)))
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
                missing = [r["lr0"] for r in rows if r["median"] is None]
                if missing:
                    ax.plot(missing, [top] * len(missing), "x", color=line.get_color(), ms=9, mew=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("initial learning rate α₀" if not any(
            s.lr0_arg != "lr" for s in specs if s.base_name == family) else "initial scale "
            + ", ".join(sorted({s.lr0_arg for s in specs if s.base_name == family})), fontsize=FONT)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (median)", fontsize=FONT)
        ax.set_title(family, fontsize=FONT)
        ax.legend(fontsize=FONT - 1)
        _style(ax)
    fig.suptitle(f"{config.name}: {metric.replace('_', ' ')} vs α₀ (median of "
                 f"{len(config.seed_list)} seeds, 95% CI; x: median diverged / not reached)",
                 fontsize=FONT)
    _layout(fig)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _best_settings(results: Any, metric: str) -> dict:
    """Per optimizer label: (lr0, beta) of its lowest median ``metric`` (highest for accuracy)."""
    from hdfunc.studies.stats import _best_worst, _settings
    out = {}
    for spec in results.config.optimizer_specs:
        settings = _settings(results, spec, metric)
        if settings:
            lr0, beta, _ = _best_worst(settings)["best"]
            out[spec.label] = (lr0, beta)
    return out


def plot_best(results: Any, path: Path, which: str, metric: str | None = None) -> Path | None:
    """Loss (``which="loss"``) or applied rate (``"lr"``) vs iteration of every optimizer at its
    own best setting (lowest median ``metric`` over its grid), one panel: the comparison of a
    study whose optimizers have grids of their own (``lr0_by_optimizer``).

    Args:
        results: a ``StudyResults``.
        path: the PNG file to write.
        which: "loss" or "lr".
        metric: the metric that picks the best setting (default: the study's).

    Returns:
        ``path``, or None if the study has no curves.
    """
    config = results.config
    if not results.curves or len(results.steps) == 0:
        return None
    best = _best_settings(results, metric or config.metric)
    index = 0 if which == "loss" else 1
    window = max(1, len(results.steps) // 50) if which == "loss" else 1
    keep = _thin(results.steps)
    x = results.steps[keep]
    fig, axes = _grid(1)
    ax, shown = axes[0], []
    for spec in config.optimizer_specs:
        if spec.label not in best:
            continue
        lr0, beta = best[spec.label]
        curves = [results.curves[r.key][index] for r in _runs(results, spec.label, lr0, beta)
                  if r.key in results.curves]
        if not curves:
            continue
        data = np.stack([smooth(c, window)[keep] for c in curves])
        if _draw(ax, x, data, f"{spec.label} ({spec.lr0_arg} = {lr0:g})"):
            shown.append(data.ravel())
    _finish_curves(ax, x, shown, "training loss (minibatch, smoothed)" if which == "loss"
                   else "applied step size (d·lr for Prodigy / D-Adapt, η for DoG)")
    what = "training loss" if which == "loss" else "applied step size"
    fig.suptitle(f"{config.name}: {what}, each optimizer at its best setting;\n{_suffix(results)}",
                 fontsize=FONT)
    _layout(fig)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_sensitivity(results: Any, path: Path, metric: str | None = None) -> Path | None:
    """Median ``metric`` (95 % CI band) vs the position in each optimizer's own grid (its α_0,
    d_0 or reps_rel, in decades from its first value), all optimizers in one panel: how much the
    outcome depends on the initial rate.

    Args:
        results: a ``StudyResults`` with statistics.
        path: the PNG file to write.
        metric: the metric (default: the study's).

    Returns:
        ``path``, or None without statistics.
    """
    config = results.config
    metric = metric or config.metric
    table = _metric_rows(results, metric)
    if not table:
        return None
    fig, axes = _grid(1)
    ax = axes[0]
    top = max((r["ci_high"] for r in table if r["ci_high"] is not None), default=1.0)
    for spec in config.optimizer_specs:
        grid = config.lr0_for(spec)
        for beta in config.betas_for(spec):
            rows = sorted((r for r in table if r["optimizer"] == spec.label and r["beta"] == beta),
                          key=lambda r: r["lr0"])
            if not rows:
                continue
            x = np.log10([r["lr0"] for r in rows]) - np.log10(min(grid))
            y = np.array([r["median"] if r["median"] is not None else np.nan for r in rows])
            low = np.array([r["ci_low"] if r["ci_low"] is not None else np.nan for r in rows])
            high = np.array([r["ci_high"] if r["ci_high"] is not None else top for r in rows])
            label = f"{spec.label}: {spec.lr0_arg} {min(grid):g}…{max(grid):g}"
            line, = ax.plot(x, y, "-o" if spec.is_hd else "--s", ms=5, lw=1.8, label=label)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
            missing = [xi for xi, r in zip(x, rows) if r["median"] is None]
            if missing:
                ax.plot(missing, [top] * len(missing), "x", color=line.get_color(), ms=9, mew=2)
    ax.set_yscale("log")
    ax.set_xlabel("decades above the grid's first value (each optimizer's own α₀ / d₀ / reps_rel)",
                  fontsize=FONT)
    ax.set_ylabel(f"{metric.replace('_', ' ')} (median)", fontsize=FONT)
    ax.legend(fontsize=FONT - 2)
    _style(ax)
    fig.suptitle(f"{config.name}: sensitivity to the initial rate (median of "
                 f"{len(config.seed_list)} seeds, 95% CI; x: median diverged)", fontsize=FONT)
    _layout(fig)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_grids(results: Any, folder: Path, metric: str | None = None) -> list[Path]:
    """For each HD optimizer, its α_0 × β grid (rows β, base optimizer as the bottom row,
    columns α_0) as a heat map of the median of ``metric`` over seeds, each cell annotated;
    default metric: ``iterations_to_target`` when the study has a ``target_loss`` (the paper's
    Fig. 4), else the study's metric.

    Args:
        results: a ``StudyResults`` with statistics.
        folder: where ``grid_<label>.png`` go.
        metric: the metric of the cells.

    Returns:
        The files written (none with a single α_0 and a single β).
    """
    config = results.config
    metric = metric or ("iterations_to_target" if config.target_loss is not None else config.metric)
    table = _metric_rows(results, metric)
    lr0s = config.all_lr0()
    written = []
    for hd in (s for s in config.optimizer_specs if s.is_hd):
        betas = sorted(config.betas_for(hd), reverse=True)
        if not table or (len(lr0s) < 2 and len(betas) < 2):
            continue
        base = next((s for s in config.optimizer_specs if not s.is_hd and s.name == hd.base_name), None)
        rows = [(f"β = {b:g}", hd.label, b) for b in betas]
        if base is not None:
            rows.append((f"{base.label} (no HD)", base.label, 0.0))
        cells = np.full((len(rows), len(lr0s)), np.nan)
        text = [["" for _ in lr0s] for _ in rows]
        for i, (_, label, beta) in enumerate(rows):
            for j, lr0 in enumerate(lr0s):
                row = next((r for r in table if r["optimizer"] == label and r["lr0"] == lr0
                            and r["beta"] == beta), None)
                if row is None:
                    continue
                if row["median"] is not None:
                    cells[i, j] = row["median"]
                    text[i][j] = f"{row['median']:.4g}"
                else:
                    text[i][j] = "not\nreached" if metric == "iterations_to_target" else "div."
        fig, ax = plt.subplots(figsize=(max(MIN_WIDTH, 1.6 * len(lr0s) + 3), 1.0 * len(rows) + 2.4))
        positive = cells[np.isfinite(cells)]
        log = positive.size > 0 and np.all(positive > 0) and positive.max() / positive.min() > 10
        norm = LogNorm(positive.min(), positive.max()) if log else None
        image = ax.imshow(np.ma.masked_invalid(cells), cmap="viridis_r", aspect="auto", norm=norm)
        ax.set_facecolor("0.85")
        for i in range(len(rows)):
            for j in range(len(lr0s)):
                if text[i][j]:
                    value = cells[i, j]
                    dark = np.isfinite(value) and image.norm(value) > 0.5
                    ax.text(j, i, text[i][j], ha="center", va="center", fontsize=FONT - 1,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(lr0s)), [f"{x:g}" for x in lr0s], fontsize=FONT)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=FONT)
        ax.set_xlabel("initial learning rate α₀", fontsize=FONT)
        if base is not None:
            ax.axhline(len(rows) - 1.5, color="white", lw=3)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(metric.replace("_", " ") + " (median)", fontsize=FONT)
        what = (f"iterations until the loss (mean of the last {config.target_window} minibatches) "
                f"≤ {config.target_loss:g}" if metric == "iterations_to_target"
                else metric.replace("_", " "))
        ax.set_title(f"{config.name}: {hd.label}, {what};\nmedian of {len(config.seed_list)} seeds",
                     fontsize=FONT)
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", hd.label)
        path = folder / f"grid_{name}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return written


def plot_study(results: Any, folder: str | Path) -> list[Path]:
    """Write all figures of ``results`` into ``folder``; returns the files written.

    Args:
        results: a ``StudyResults``.
        folder: the folder (made if missing).

    Returns:
        The PNG files written (``loss.png``, ``lr.png``, ``epochs.png``, ``final_vs_lr0.png``,
        ``grid_<hd>.png`` where they apply).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if results.config.lr0_by_optimizer:  # grids of their own: compare each at its best setting
        written = [plot_best(results, folder / "best_loss.png", "loss"),
                   plot_best(results, folder / "best_lr.png", "lr"),
                   plot_sensitivity(results, folder / "sensitivity.png")]
        return [p for p in written if p is not None]
    written = [plot_curves(results, folder / "loss.png", "loss"),
               plot_curves(results, folder / "lr.png", "lr"),
               plot_epochs(results, folder / "epochs.png"),
               plot_final_vs_lr0(results, folder / "final_vs_lr0.png")]
    return [p for p in written if p is not None] + plot_grids(results, folder)
