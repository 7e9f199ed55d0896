"""Statistics of a study over seeds (scipy).

For every metric a study measured (final training loss, last-epoch loss, validation loss and
accuracy, iterations to a target loss; :data:`hdfunc.studies.config.METRICS`):

* per optimizer, α_0 and β: the median over seeds with a 95 % percentile-bootstrap confidence
  interval (``scipy.stats.bootstrap``; diverged runs count as the worst value, ±inf, so they move
  the median rather than vanish);
* per HD optimizer and its base at the same α_0 (paired by seed — looked up by the seed, never by
  position — same initialisation, same minibatches): on how many seeds HD is better, the median
  difference, a one-sided Wilcoxon signed-rank test over the pairs where both are finite and an
  exact sign test over all decided pairs;
* per HD optimizer and every other optimizer of the study that is not its base (the peers:
  torch.optim optimizers, Prodigy, D-Adaptation, Schedule-Free, DoG ...), the same paired test at
  each one's best and at each one's worst setting of its own grid (α_0 or d_0, and β);
* per optimizer, the sensitivity to its initial rate: the best and worst median over its grid,
  their spread and how many settings come within 10 % of the best.
The runs of one seed share initialisation and minibatches whichever path trained them (the
vmapped rules or the loop over a ``torch.optim.Optimizer``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
_BIG = 1e100  # stands for +inf inside the bootstrap (its sums and squares stay finite)


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or None if it is not finite (JSON has no nan or inf).

    Args:
        x: a real number.

    Returns:
        ``float(x)``, or None for nan and ±inf.
    """
    x = float(x)
    return x if math.isfinite(x) else None


def median_ci(values: np.ndarray, confidence: float = CONFIDENCE, seed: int = 0) -> tuple:
    """(median, low, high): the median and its percentile-bootstrap CI (nan CI for < 2 values);
    ±inf values (diverged runs, targets never reached) are allowed.

    Args:
        values: one value per seed.
        confidence: the level of the interval.
        seed: the seed of the bootstrap's resampling.

    Returns:
        ``(median, low, high)`` as floats (any may be ±inf).
    """
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    if values.size < 2 or np.all(values == values[0]):
        same = median if values.size >= 2 else math.nan
        return median, same, same
    finite = np.clip(np.where(np.isnan(values), _BIG, values), -_BIG, _BIG)
    result = sps.bootstrap((finite,), np.median, confidence_level=confidence,
                           n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                           random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    back = lambda x: math.inf if x >= _BIG / 2 else -math.inf if x <= -_BIG / 2 else float(x)  # noqa: E731
    return back(median) if abs(median) >= _BIG / 2 else median, back(low), back(high)


def _higher_better(metric: str) -> bool:
    from hdfunc.studies.config import METRICS
    return METRICS[metric]


def metric_table(results: Any, metric: str = "final_loss") -> list[dict]:
    """One row per (optimizer, α_0, β): n, diverged, the median of ``metric`` over seeds and its
    bootstrap CI (diverged runs and missing values count as the worst value, ±inf).

    Args:
        results: a ``StudyResults``.
        metric: a name of :data:`hdfunc.studies.config.METRICS`.

    Returns:
        Rows with the keys optimizer, lr0, beta, n, diverged, median, ci_low, ci_high (None
            where not finite), median_inf, ci_low_inf and ci_high_inf (the sign of an infinite
            value: +1, -1 or 0).
    """
    groups: dict[tuple, list] = {}
    for r in results.runs:
        groups.setdefault((r.optimizer, r.lr0, r.beta), []).append(r)
    rows = []
    sign = lambda x: 0 if math.isfinite(x) or math.isnan(x) else (1 if x > 0 else -1)  # noqa: E731
    for (optimizer, lr0, beta), runs in groups.items():
        values = np.array([r.metric(metric) for r in runs])
        median, low, high = median_ci(values)
        rows.append({"optimizer": optimizer, "lr0": lr0, "beta": beta, "n": len(runs),
                     "diverged": sum(r.diverged for r in runs),
                     "median": finite_or_none(median), "ci_low": finite_or_none(low),
                     "ci_high": finite_or_none(high), "median_inf": sign(median),
                     "ci_low_inf": sign(low), "ci_high_inf": math.isinf(high) and high > 0})
    return rows


def final_loss_table(results: Any) -> list[dict]:
    """:func:`metric_table` of the final loss.

    Args:
        results: a ``StudyResults``.

    Returns:
        Its rows.
    """
    return metric_table(results, "final_loss")


def paired_comparisons(results: Any, metric: str = "final_loss") -> list[dict]:
    """HD vs its base optimizer on the same seeds, per α_0 (and β of the HD runs): the runs are
    paired by their seed (same initialisation and minibatches), looked up by key, never by
    position; the seeds paired are recorded in each row (``seeds``, ``paired_by``).

    Args:
        results: a ``StudyResults``.
        metric: a name of :data:`hdfunc.studies.config.METRICS`.

    Returns:
        One row of :func:`paired_test` per HD optimizer, α_0 and β that has a base to compare.
    """
    specs = results.config.optimizer_specs
    higher = _higher_better(metric)
    rows = []
    for hd in (s for s in specs if s.is_hd):
        bases = [s for s in specs if not s.is_hd and s.name == hd.base_name]
        if not bases:
            continue
        base = next((s for s in bases if s.label == s.name), bases[0])
        for lr0 in results.config.lr0_for(hd):
            base_values = results.metric_values(metric, base.label, float(lr0))
            for beta in results.config.betas_for(hd):
                hd_values = results.metric_values(metric, hd.label, float(lr0), beta)
                seeds = sorted(set(base_values) & set(hd_values))
                if not seeds:
                    continue
                row = paired_test(hd.label, base.label, float(lr0), beta,
                                  np.array([hd_values[s] for s in seeds]),
                                  np.array([base_values[s] for s in seeds]),
                                  higher_better=higher)
                row.update(metric=metric, paired_by="seed", seeds=seeds)
                rows.append(row)
    return rows


def paired_test(hd: str, base: str, lr0: float, beta: float, hd_losses: np.ndarray,
                base_losses: np.ndarray, *, higher_better: bool = False) -> dict:
    """Paired comparison of one value per seed (lower is better unless ``higher_better``);
    ±inf marks the worst value (a diverged run).

    Args:
        hd: the HD optimizer's label.
        base: the base optimizer's label.
        lr0: α_0 of both.
        beta: β of the HD runs.
        hd_losses: the HD runs' values, one per seed.
        base_losses: the base runs' values, the same seeds in the same order.
        higher_better: larger values are better (accuracy).

    Returns:
        The row: hd, base, lr0, beta, n, hd_better, base_better, median_difference (HD - base),
            wilcoxon_p and sign_test_p (one-sided, alternative: HD better; None where the test
            does not apply).
    """
    hd_losses = np.asarray(hd_losses, dtype=np.float64)
    base_losses = np.asarray(base_losses, dtype=np.float64)
    n = len(hd_losses)
    flip = -1.0 if higher_better else 1.0  # compare "badness": lower is better
    hd_bad, base_bad = flip * hd_losses, flip * base_losses
    both_inf = np.isinf(hd_bad) & np.isinf(base_bad) & (hd_bad == base_bad)
    hd_better = int(np.sum((hd_bad < base_bad) & ~both_inf))
    base_better = int(np.sum((hd_bad > base_bad) & ~both_inf))
    decided = hd_better + base_better
    sign_p = (float(sps.binomtest(hd_better, decided, 0.5, alternative="greater").pvalue)
              if decided else None)
    finite = np.isfinite(hd_losses) & np.isfinite(base_losses)
    diff = hd_losses[finite] - base_losses[finite]
    wilcoxon_p = None
    if diff.size >= 2 and np.any(diff != 0):
        wilcoxon_p = float(sps.wilcoxon(flip * diff, alternative="less").pvalue)
    return {"hd": hd, "base": base, "lr0": lr0, "beta": beta, "n": n, "hd_better": hd_better,
            "base_better": base_better,
            "median_difference": finite_or_none(float(np.median(diff))) if diff.size else None,
            "wilcoxon_p": wilcoxon_p, "sign_test_p": sign_p}


def _settings(results: Any, spec: Any, metric: str) -> list[tuple[float, float, float]]:
    """(lr0, beta, median of ``metric`` as badness: lower is better) per setting of ``spec``'s
    grid that has runs, in grid order."""
    flip = -1.0 if _higher_better(metric) else 1.0
    out = []
    for lr0 in results.config.lr0_for(spec):
        for beta in results.config.betas_for(spec):
            values = list(results.metric_values(metric, spec.label, float(lr0), beta).values())
            if values:
                out.append((float(lr0), beta, flip * float(np.median(values))))
    return out


def _best_worst(settings: list[tuple[float, float, float]]) -> dict:
    """The first setting of lowest badness and the first of highest."""
    order = [s[2] if not math.isnan(s[2]) else math.inf for s in settings]
    return {"best": settings[int(np.argmin(order))], "worst": settings[int(np.argmax(order))]}


def peer_comparisons(results: Any, metric: str = "final_loss") -> list[dict]:
    """Each HD optimizer against each other optimizer of the study that is not HD and not its
    base (its peers), paired by seed, at each one's **best** setting (the lowest median of
    ``metric`` over its own grid: α_0 or d_0, and β) and at each one's **worst**.

    Args:
        results: a ``StudyResults``.
        metric: a name of :data:`hdfunc.studies.config.METRICS`.

    Returns:
        One row of :func:`paired_test` per HD optimizer, peer and setting ("best", "worst"), with
        ``setting``, ``base_lr0`` (the peer's grid value), ``metric``, ``paired_by`` and
        ``seeds``; ``hd`` / ``base`` name the HD optimizer and the peer.
    """
    specs = results.config.optimizer_specs
    higher = _higher_better(metric)
    rows = []
    for hd in (s for s in specs if s.is_hd):
        hd_settings = _settings(results, hd, metric)
        if not hd_settings:
            continue
        for peer in (s for s in specs if not s.is_hd and s.name != hd.base_name):
            peer_settings = _settings(results, peer, metric)
            if not peer_settings:
                continue
            ours, theirs = _best_worst(hd_settings), _best_worst(peer_settings)
            for setting in ("best", "worst"):
                lr0, beta, _ = ours[setting]
                peer_lr0, peer_beta, _ = theirs[setting]
                hd_values = results.metric_values(metric, hd.label, lr0, beta)
                peer_values = results.metric_values(metric, peer.label, peer_lr0, peer_beta)
                seeds = sorted(set(hd_values) & set(peer_values))
                if not seeds:
                    continue
                row = paired_test(hd.label, peer.label, lr0, beta,
                                  np.array([hd_values[s] for s in seeds]),
                                  np.array([peer_values[s] for s in seeds]), higher_better=higher)
                row.update(setting=setting, base_lr0=peer_lr0, metric=metric, paired_by="seed",
                           seeds=seeds)
                rows.append(row)
    return rows


def sensitivity(results: Any, metric: str = "final_loss") -> list[dict]:
    """Per optimizer (and β): how much ``metric`` depends on the initial rate, over its grid
    (α_0, or d_0 / reps_rel for the peers that expose those).

    Args:
        results: a ``StudyResults``.
        metric: a name of :data:`hdfunc.studies.config.METRICS`.

    Returns:
        Rows with optimizer, beta, settings (grid points with runs), best_lr0, best (median),
            worst_lr0, worst, spread (worst - best, in the metric's units; None when a setting
            diverged: then ``spread_inf`` is True), near_best (settings whose median is within
            10 % of the best) and diverged_settings (settings with a non-finite median).
    """
    flip = -1.0 if _higher_better(metric) else 1.0
    rows = []
    for spec in results.config.optimizer_specs:
        for beta in results.config.betas_for(spec):
            settings = [s for s in _settings(results, spec, metric) if s[1] == beta]
            if not settings:
                continue
            ends = _best_worst(settings)
            best, worst = ends["best"][2], ends["worst"][2]
            near = sum(1 for s in settings
                       if math.isfinite(best) and s[2] <= best + 0.1 * abs(best))
            spread = worst - best
            rows.append({"optimizer": spec.label, "beta": beta, "settings": len(settings),
                         "best_lr0": ends["best"][0], "best": finite_or_none(flip * best),
                         "worst_lr0": ends["worst"][0], "worst": finite_or_none(flip * worst),
                         "spread": finite_or_none(spread),
                         "spread_inf": not math.isfinite(spread) and not math.isnan(spread),
                         "near_best": near,
                         "diverged_settings": sum(1 for s in settings if not math.isfinite(s[2]))})
    return rows


def study_statistics(results: Any) -> dict:
    """All statistics of a study, as stored in its ``summary.json``.

    Args:
        results: a ``StudyResults``.

    Returns:
        ``{"confidence", "metric" (the study's primary one), "final_loss": metric_table(...),
        "paired": paired_comparisons(...) of the final loss, "metrics": {name: {"table",
        "paired", "peers" (:func:`peer_comparisons`), "sensitivity"}} for every metric the study
        measured}``.
    """
    metrics = {name: {"table": metric_table(results, name),
                      "paired": paired_comparisons(results, name),
                      "peers": peer_comparisons(results, name),
                      "sensitivity": sensitivity(results, name)}
               for name in results.available_metrics()}
    return {"confidence": CONFIDENCE, "metric": results.config.metric,
            "final_loss": metrics["final_loss"]["table"],
            "paired": metrics["final_loss"]["paired"], "metrics": metrics}


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def _grid(x: float) -> str:
    """A grid value as ``1e-02``, or ``2.5e-07`` where one digit would round it."""
    short = f"{x:.0e}"
    return short if float(short) == x else f"{x:.2g}" if 1e-3 <= abs(x) < 1e3 else f"{x:.1e}"


def _value(row: dict, key: str, fmt: str = ".4g") -> str:
    if row.get(key) is not None:
        return format(row[key], fmt)
    inf = row.get(key + "_inf")
    return "inf" if inf is True or inf == 1 else "-inf" if inf == -1 else "-"



def _test_header(better: str) -> str:
    """The headings of a paired test's columns (:func:`_test_columns`)."""
    return f"{better:>9} {'median Δ':>11} {'Wilcoxon p':>11} {'sign p':>9}"


def _test_columns(row: dict) -> str:
    """A paired test's columns: seeds where HD is better of n, median Δ, the two p-values."""
    return (f"{str(row['hd_better']) + '/' + str(row['n']):>9} "
            f"{_num(row['median_difference'], '.3g'):>11} {_num(row['wilcoxon_p'], '.3g'):>11} "
            f"{_num(row['sign_test_p'], '.3g'):>9}")

METRIC_TITLES = {"final_loss": "final train loss", "epoch_loss": "last-epoch loss",
                 "val_loss": "validation loss", "val_accuracy": "val accuracy",
                 "best_val_loss": "best val loss", "iterations_to_target": "iters to target"}


def format_table(statistics: dict, metric: str | None = None) -> str:
    """A compact text table of :func:`study_statistics` for one metric: every grid axis
    (optimizer, α_0, β) in every row.

    Args:
        statistics: the dict :func:`study_statistics` returns.
        metric: the metric (default: the study's ``metric``, else the final loss).

    Returns:
        The table, or ``"(no finished runs)"``.

    Raises:
        ValueError: the study did not measure ``metric``.
    """
    metric = metric or statistics.get("metric") or "final_loss"
    per_metric = statistics.get("metrics", {})
    peers, spread = [], []
    if metric in per_metric:
        rows, paired = per_metric[metric]["table"], per_metric[metric]["paired"]
        peers = per_metric[metric].get("peers", [])
        spread = per_metric[metric].get("sensitivity", [])
    elif metric == "final_loss":
        rows, paired = statistics.get("final_loss", []), statistics.get("paired", [])
    else:
        raise ValueError(f"this study has no metric {metric!r}; it has "
                         f"{list(per_metric) or ['final_loss']}")
    title = METRIC_TITLES.get(metric, metric)
    lines = []
    if rows:
        pct = int(100 * statistics.get("confidence", CONFIDENCE))
        lines.append(f"{'optimizer':<22} {'lr0':>8} {'beta':>8} {'n':>4} {'div':>4} "
                     f"{'median ' + title:>24}  {pct}% CI")
        for r in rows:
            lines.append(f"{r['optimizer']:<22} {_grid(r['lr0']):>8} {r['beta']:>8.0e} {r['n']:>4} "
                         f"{r['diverged']:>4} {_value(r, 'median'):>24}  "
                         f"[{_value(r, 'ci_low')}, {_value(r, 'ci_high')}]")
    if paired:
        better = "HD higher" if _higher_better(metric) else "HD lower"
        lines.append("")
        lines.append(f"{'HD vs base (' + title + ')':<36} {'lr0':>8} {'beta':>8} "
                     + _test_header(better))
        for r in paired:
            lines.append(f"{r['hd'] + ' vs ' + r['base']:<36} {r['lr0']:>8.0e} {r['beta']:>8.0e} "
                         + _test_columns(r))
        lines.append(f"(paired by seed: the HD run and the base run of the same seed share "
                     f"initialisation and minibatches; {better}: seeds where HD is better; "
                     f"median Δ = HD - base; one-sided p-values)")
    if peers:
        better = "HD higher" if _higher_better(metric) else "HD lower"
        lines.append("")
        lines.append(f"{'HD vs peer (' + title + ')':<40} {'setting':>7} {'HD lr0':>8} "
                     f"{'HD beta':>8} {'peer lr0':>8} " + _test_header(better))
        # where a pair's best and worst settings are the same runs (a grid of one setting each),
        # one row "both" instead of two equal rows
        def runs_of(r: dict) -> tuple:
            return r["hd"], r["base"], r["lr0"], r["beta"], r["base_lr0"]

        same = ({runs_of(r) for r in peers if r["setting"] == "best"}
                & {runs_of(r) for r in peers if r["setting"] == "worst"})
        for r in peers:
            setting = r["setting"]
            if runs_of(r) in same:
                if setting == "worst":
                    continue
                setting = "both"
            lines.append(f"{r['hd'] + ' vs ' + r['base']:<40} {setting:>7} {_grid(r['lr0']):>8} "
                         f"{r['beta']:>8.0e} {_grid(r['base_lr0']):>8} " + _test_columns(r))
        lines.append("(each at its own best / worst setting of its grid, \"both\" where they are the "
                     "same; paired by seed; median Δ = HD - peer; one-sided p-values, "
                     "alternative: HD better)")
    if spread and len({r["settings"] for r in spread} - {1}):
        lines.append("")
        lines.append(f"{'sensitivity (' + title + ')':<36} {'grid':>4} {'best at':>8} "
                     f"{'best':>10} {'worst at':>8} {'worst':>10} {'spread':>10} {'≤10% off':>8}")
        for r in spread:
            worst = _num(r["worst"]) if r["worst"] is not None else "inf"
            gap = "inf" if r["spread_inf"] else _num(r["spread"], ".3g")
            lines.append(f"{r['optimizer']:<36} {r['settings']:>4} {_grid(r['best_lr0']):>8} "
                         f"{_num(r['best']):>10} {_grid(r['worst_lr0']):>8} {worst:>10} {gap:>10} "
                         f"{r['near_best']:>8}")
        lines.append("(medians over seeds at each grid value; spread = worst - best; ≤10% off: "
                     "grid values whose median is within 10 % of the best)")
    return "\n".join(lines) if lines else "(no finished runs)"


def format_performance(rows: list[dict]) -> str:
    """A text table of :func:`hdfunc.studies.results.performance_table`: per optimizer its path,
    milliseconds per run-step, run-steps per second and optimizer-state memory per run.

    Args:
        rows: the rows.

    Returns:
        The table ("" when nothing was timed).
    """
    if not rows:
        return ""
    lines = [f"{'throughput':<36} {'path':>5} {'run-steps':>10} {'seconds':>9} "
             f"{'ms/run-step':>12} {'run-steps/s':>12} {'state KiB/run':>14}"]
    for r in rows:
        lines.append(f"{r['optimizer']:<36} {r['path']:>5} {r['run_steps']:>10} "
                     f"{r['seconds']:>9.1f} {_num(r['ms_per_run_step'], '.3g'):>12} "
                     f"{_num(r['run_steps_per_second'], '.4g'):>12} "
                     f"{r['state_bytes'] / 1024:>14.1f}")
    lines.append("(vmap: all runs of a chunk in one vmapped step; loop: a torch.optim optimizer, "
                 "run after run; state: the optimizer's tensors for one run)")
    return "\n".join(lines)
