"""Statistics of a study over seeds (scipy).

* Per optimizer, α_0 and β: the median final loss over seeds with a 95 % percentile-bootstrap
  confidence interval (``scipy.stats.bootstrap``; diverged runs count as +inf, so they pull the
  median up rather than vanish).
* Per HD optimizer and its base at the same α_0 (paired by seed: same initialisation, same
  minibatches): how many seeds HD ends lower, the median difference, a one-sided Wilcoxon
  signed-rank test over the pairs where both runs are finite and an exact sign test over all pairs.
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
    """``x`` as a float, or None if it is not finite (JSON has no nan or inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def median_ci(values: np.ndarray, confidence: float = CONFIDENCE, seed: int = 0) -> tuple:
    """(median, low, high): the median and its percentile-bootstrap CI (nan CI for < 2 values);
    +inf values (diverged runs) are allowed."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    if values.size < 2 or np.all(values == values[0]):
        same = median if values.size >= 2 else math.nan
        return median, same, same
    finite = np.where(np.isfinite(values), values, _BIG)
    result = sps.bootstrap((finite,), np.median, confidence_level=confidence,
                           n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                           random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    back = lambda x: math.inf if x >= _BIG / 2 else float(x)  # noqa: E731
    return median, back(low), back(high)


def final_loss_table(results: Any) -> list[dict]:
    """One row per (optimizer, α_0, β): n, diverged, median final loss and its CI."""
    groups: dict[tuple, list] = {}
    for r in results.runs:
        groups.setdefault((r.optimizer, r.lr0, r.beta), []).append(r)
    rows = []
    for (optimizer, lr0, beta), runs in groups.items():
        finals = np.array([r.final for r in runs])
        median, low, high = median_ci(finals)
        rows.append({"optimizer": optimizer, "lr0": lr0, "beta": beta, "n": len(runs),
                     "diverged": sum(r.diverged for r in runs),
                     "median": finite_or_none(median), "ci_low": finite_or_none(low),
                     "ci_high": finite_or_none(high),
                     "ci_high_inf": math.isinf(high)})
    return rows


def paired_comparisons(results: Any) -> list[dict]:
    """HD vs its base optimizer on the same seeds, per α_0 (and β of the HD runs)."""
    specs = results.config.optimizer_specs
    rows = []
    for hd in (s for s in specs if s.is_hd):
        bases = [s for s in specs if not s.is_hd and s.name == hd.base_name]
        if not bases:
            continue
        base = next((s for s in bases if s.label == s.name), bases[0])
        for lr0 in results.config.lr0:
            base_losses = results.final_losses(base.label, float(lr0))
            for beta in results.config.betas_for(hd):
                hd_losses = results.final_losses(hd.label, float(lr0), beta)
                seeds = sorted(set(base_losses) & set(hd_losses))
                if not seeds:
                    continue
                rows.append(paired_test(hd.label, base.label, float(lr0), beta,
                                        np.array([hd_losses[s] for s in seeds]),
                                        np.array([base_losses[s] for s in seeds])))
    return rows


def paired_test(hd: str, base: str, lr0: float, beta: float, hd_losses: np.ndarray,
                base_losses: np.ndarray) -> dict:
    """Paired comparison of final losses (lower is better); +inf marks a diverged run."""
    n = len(hd_losses)
    both_inf = np.isinf(hd_losses) & np.isinf(base_losses)
    hd_better = int(np.sum((hd_losses < base_losses) & ~both_inf))
    base_better = int(np.sum((hd_losses > base_losses) & ~both_inf))
    decided = hd_better + base_better
    sign_p = (float(sps.binomtest(hd_better, decided, 0.5, alternative="greater").pvalue)
              if decided else None)
    finite = np.isfinite(hd_losses) & np.isfinite(base_losses)
    diff = hd_losses[finite] - base_losses[finite]
    wilcoxon_p = None
    if diff.size >= 2 and np.any(diff != 0):
        wilcoxon_p = float(sps.wilcoxon(diff, alternative="less").pvalue)
    return {"hd": hd, "base": base, "lr0": lr0, "beta": beta, "n": n, "hd_better": hd_better,
            "base_better": base_better,
            "median_difference": finite_or_none(float(np.median(diff))) if diff.size else None,
            "wilcoxon_p": wilcoxon_p, "sign_test_p": sign_p}


def study_statistics(results: Any) -> dict:
    return {"confidence": CONFIDENCE, "final_loss": final_loss_table(results),
            "paired": paired_comparisons(results)}


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def format_table(statistics: dict) -> str:
    """A compact text table of :func:`study_statistics`."""
    lines = []
    rows = statistics.get("final_loss", [])
    if rows:
        pct = int(100 * statistics.get("confidence", CONFIDENCE))
        lines.append(f"{'optimizer':<22} {'lr0':>8} {'beta':>8} {'n':>4} {'div':>4} "
                     f"{'median final loss':>18}  {pct}% CI")
        for r in rows:
            high = "inf" if r.get("ci_high_inf") else _num(r["ci_high"])
            median = _num(r["median"]) if r["median"] is not None else "inf"
            lines.append(f"{r['optimizer']:<22} {r['lr0']:>8.0e} {r['beta']:>8.0e} {r['n']:>4} "
                         f"{r['diverged']:>4} {median:>18}  [{_num(r['ci_low'])}, {high}]")
    paired = statistics.get("paired", [])
    if paired:
        lines.append("")
        lines.append(f"{'HD vs base':<30} {'lr0':>8} {'HD lower':>9} {'median Δ':>11} "
                     f"{'Wilcoxon p':>11} {'sign p':>9}")
        for r in paired:
            lines.append(f"{r['hd'] + ' vs ' + r['base']:<30} {r['lr0']:>8.0e} "
                         f"{str(r['hd_better']) + '/' + str(r['n']):>9} "
                         f"{_num(r['median_difference'], '.3g'):>11} {_num(r['wilcoxon_p'], '.3g'):>11} "
                         f"{_num(r['sign_test_p'], '.3g'):>9}")
        lines.append("(paired by seed: same initialisation and minibatches; HD lower: seeds where "
                     "the HD run ends with the lower final loss; median Δ = HD - base; "
                     "one-sided p-values)")
    return "\n".join(lines) if lines else "(no finished runs)"
