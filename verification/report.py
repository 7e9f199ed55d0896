"""Outcomes of the checks and the report: terminal table, JSON and Markdown."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

PASS, FAIL, ERROR, INCONCLUSIVE = "PASS", "FAIL", "ERROR", "INCONCLUSIVE"
VERDICTS = (PASS, INCONCLUSIVE, FAIL, ERROR)  # from best to worst

# Exit status of ``python -m verification`` by overall verdict (2: bad arguments).
EXIT_STATUS = {"PASSED": 0, "FAILED": 1, "INCONCLUSIVE": 3, "INTERRUPTED": 130}


@dataclass
class Outcome:
    """One comparison: ``value`` (the quantity under test) against ``reference`` (an exact or
    independent computation), ``max_rel_err`` = max abs error / ``scale``, passing when it is at
    most ``tolerance``. ``where`` locates it (seed, step t, K ...); ``message`` explains a
    failure in words. An INCONCLUSIVE outcome is a comparison that cannot tell a right
    derivative from a wrong one here (an unroll so ill-conditioned that rounding alone could
    explain the difference, a finite difference whose own error is too large): it neither
    passes nor fails, and ``message`` says why. ``first_step`` is the first step at which a
    step-by-step comparison failed (the oracle's), for the diagnosis.

    Attributes:
        check: the check's name.
        method: how the reference was computed.
        rule: the rule's name.
        problem: the problem's name.
        dtype: the dtype compared in.
        max_abs_err: the largest absolute error.
        max_rel_err: ``max_abs_err`` / scale.
        tolerance: the largest ``max_rel_err`` that passes.
        verdict: PASS, FAIL, INCONCLUSIVE or ERROR.
        where: where the comparison was made (seed, step t, K ...).
        message: a failure or an inconclusive result explained in words.
        first_step: the first step at which a step-by-step comparison failed, or None.
    """

    check: str
    method: str
    rule: str
    problem: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    verdict: str
    where: str = ""
    message: str = ""
    first_step: Optional[int] = None

    @property
    def failed(self) -> bool:
        """Whether the comparison FAILED or could not run (ERROR)."""
        return self.verdict in (FAIL, ERROR)

    @property
    def inconclusive(self) -> bool:
        """Whether the comparison could not decide (INCONCLUSIVE)."""
        return self.verdict == INCONCLUSIVE


def judged(check: str, method: str, rule: str, problem: str, dtype: str, abs_err: float,
           scale: float, tolerance: float, where: str, what: str,
           allowance: float = 0.0, first_step: Optional[int] = None, hint: str = "",
           inconclusive_reason: str = "") -> Outcome:
    """An outcome from an absolute error and the scale it is relative to. ``what`` names the
    two quantities compared, for the failure message. ``allowance`` is an absolute error
    that the reference itself may carry (a finite difference's rounding floor and error
    estimate, capped by the caller): it is added to the tolerance, relative to the scale, so
    ``max_rel_err`` is always the raw error and the outcome passes when it is at most the
    (effective) ``tolerance`` reported. ``hint`` is appended to a failure message.
    ``inconclusive_reason``, when given, turns a failure into INCONCLUSIVE with that reason
    (the caller found the comparison unable to resolve the difference)."""
    if not math.isfinite(abs_err) or not math.isfinite(scale):
        rel = math.inf
    elif scale > 0:
        rel = abs_err / scale
    else:
        rel = 0.0 if abs_err == 0 else math.inf
    if allowance > 0 and scale > 0 and math.isfinite(allowance):
        tolerance = tolerance + allowance / scale
    verdict = PASS if rel <= tolerance else FAIL
    message = ""
    if verdict == FAIL and inconclusive_reason:
        message = (f"{check} ({method}) INCONCLUSIVE for rule {rule} on problem {problem} "
                   f"({dtype}, {where}): {what} differ by {rel:.3g} relative (tolerance "
                   f"{tolerance:.2g}), but {inconclusive_reason}")
        return Outcome(check, method, rule, problem, dtype, float(abs_err), float(rel),
                       float(tolerance), INCONCLUSIVE, where, message, first_step)
    if verdict == FAIL and not math.isfinite(abs_err):
        message = (f"{check} ({method}) FAILED for rule {rule} on problem {problem} "
                   f"({dtype}, {where}): {what} differ by a non-finite amount (NaN or inf: a "
                   f"derivative is not finite)")
    elif verdict == FAIL:
        message = (f"{check} ({method}) FAILED for rule {rule} on problem {problem} "
                   f"({dtype}, {where}): {what} differ by {abs_err:.3g} absolute, "
                   f"{rel:.3g} relative (tolerance {tolerance:.2g})")
    if message and hint:
        message += f". {hint}"
    return Outcome(check, method, rule, problem, dtype, float(abs_err), float(rel),
                   float(tolerance), verdict, where, message, first_step)


def errored(check: str, rule: str, problem: str, dtype: str, where: str,
            error: BaseException) -> Outcome:
    """An ERROR outcome: ``check`` could not run for ``rule`` on ``problem`` because it raised
    ``error`` (a rule that raises, a state without an HD node, a trajectory that diverged).

    Args:
        check: the check's name.
        rule: the rule's name.
        problem: the problem's name.
        dtype: the dtype's name.
        where: where it was to compare (seed, step t, K ...).
        error: the exception the check raised.

    Returns:
        The :class:`Outcome` (verdict ERROR, errors inf), its message naming the error.
    """
    text = f"{type(error).__name__}: {error}".strip()
    return Outcome(check, "-", rule, problem, dtype, math.inf, math.inf, 0.0, ERROR, where,
                   f"{check} could not run for rule {rule} on problem {problem} ({dtype}, "
                   f"{where}): {text}")


@dataclass
class Finding:
    """How HD's greedy one-step hypergradient compares with the exact K-step one (not a test):
    sign agreement (fraction of rate entries × seeds with the same sign), cosine similarity
    (over the same entries) and the median ratio |exact| / |greedy|.

    Attributes:
        rule: the rule's name.
        problem: the problem's name.
        steps: K, the steps of the exact hypergradient.
        sign_agreement: the fraction of entries with the same sign.
        cosine: the cosine similarity.
        samples: the number of entries compared.
        magnitude_ratio: the median |exact| / |greedy|.
    """

    rule: str
    problem: str
    steps: int
    sign_agreement: float
    cosine: float
    samples: int
    magnitude_ratio: float = math.nan


@dataclass
class Report:
    """What a run of the suite found: every comparison, the findings, and the run's settings.

    Attributes:
        outcomes: every comparison, in the order the checks ran.
        findings: the greedy-vs-exact findings (not tests).
        meta: the run's settings and environment (mode, device, dtype, versions, seconds).
        interrupted: whether the run was stopped early (Ctrl-C).
    """

    outcomes: list[Outcome] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    interrupted: bool = False

    # ------------------------------------------------------------------ summary
    @property
    def failures(self) -> list[Outcome]:
        """The outcomes that FAILED or could not run (ERROR).

        Returns:
            Those outcomes, in the order they ran.
        """
        return [o for o in self.outcomes if o.failed]

    @property
    def inconclusives(self) -> list[Outcome]:
        """The outcomes that could not decide (INCONCLUSIVE).

        Returns:
            Those outcomes, in the order they ran.
        """
        return [o for o in self.outcomes if o.inconclusive]

    @property
    def passed(self) -> bool:
        """Whether the verdict is PASSED: some comparisons ran, and none failed, errored or was
        inconclusive, and the run was not interrupted.

        Returns:
            True only for PASSED.
        """
        return (bool(self.outcomes) and not self.failures and not self.inconclusives
                and not self.interrupted)

    @property
    def verdict(self) -> str:
        """PASSED, FAILED (a comparison failed or errored), INCONCLUSIVE (none failed, but some
        could not decide) or INTERRUPTED."""
        if self.interrupted:
            return "INTERRUPTED"
        if self.failures or not self.outcomes:
            return "FAILED"
        return "INCONCLUSIVE" if self.inconclusives else "PASSED"

    @property
    def exit_status(self) -> int:
        """The command line's exit status for the verdict: 0 PASSED, 1 FAILED, 3 INCONCLUSIVE,
        130 INTERRUPTED.

        Returns:
            The exit status.
        """
        return EXIT_STATUS[self.verdict]

    def diagnoses(self) -> list[str]:
        """For each rule the oracle failed: the first part of the HD step that differs from the
        definition (earliest step, then the algorithm's order), where, and what to look at.

        Returns:
            One line per rule that failed the oracle (empty if none did).
        """
        from verification.oracle import HINT, ORACLE, PARTS
        first: dict[str, Outcome] = {}
        for o in self.outcomes:
            if o.check != ORACLE or o.verdict != FAIL or o.method not in PARTS:
                continue
            key = (o.first_step if o.first_step is not None else 10 ** 9, PARTS.index(o.method))
            best = first.get(o.rule)
            if best is None or key < (best.first_step if best.first_step is not None
                                      else 10 ** 9, PARTS.index(best.method)):
                first[o.rule] = o
        return [f"{rule}: the first part of the HD step that differs from its definition is the "
                f"{o.method}, first at step t={o.first_step} on {o.problem} ({o.where}; "
                f"{o.max_rel_err:.3g} relative). {HINT[o.method]}."
                for rule, o in first.items()]

    def counts(self) -> dict[str, int]:
        """How many outcomes have each verdict.

        Returns:
            A dict from verdict (PASS, FAIL, ERROR, INCONCLUSIVE) to its count.
        """
        counts = {PASS: 0, FAIL: 0, ERROR: 0, INCONCLUSIVE: 0}
        for o in self.outcomes:
            counts[o.verdict] = counts.get(o.verdict, 0) + 1
        return counts

    def summary(self) -> str:
        """The verdict and the counts in one line (not the per-check table:
        :meth:`summary_table`).

        Returns:
            The one-line summary.
        """
        c = self.counts()
        rules = len({o.rule for o in self.outcomes})
        problems = len({o.problem for o in self.outcomes})
        state = self.verdict
        inconclusive = f"{c[INCONCLUSIVE]} inconclusive, " if c[INCONCLUSIVE] else ""
        return (f"verification {state}: {c[PASS]} passed, {c[FAIL]} failed, {inconclusive}"
                f"{c[ERROR]} errors "
                f"({len(self.outcomes)} comparisons, {rules} rules, {problems} problems"
                f"{', %.1f s' % self.meta['seconds'] if 'seconds' in self.meta else ''})")

    # ------------------------------------------------------------------ rows
    def rows(self) -> list[dict[str, Any]]:
        """One row per (check, method, rule, problem, dtype): the worst outcome (the rows of
        :meth:`table`; per check and method only: :meth:`rows_by_check`).

        Returns:
            The rows, as dicts from column name to value.
        """
        worst: dict[tuple, Outcome] = {}
        count: dict[tuple, int] = {}
        for o in self.outcomes:
            key = (o.check, o.method, o.rule, o.problem, o.dtype)
            count[key] = count.get(key, 0) + 1
            best = worst.get(key)
            if best is None or _badness(o) > _badness(best):
                worst[key] = o
        rows = []
        for key, o in worst.items():
            rows.append({"check": f"{o.check} [{o.method}]" if o.method != "-" else o.check,
                         "rule": o.rule, "problem": o.problem, "dtype": o.dtype,
                         "max abs err": o.max_abs_err, "max rel err": o.max_rel_err,
                         "tolerance": o.tolerance, "verdict": o.verdict, "n": count[key]})
        return rows

    def rows_by_check(self) -> list[dict[str, Any]]:
        """One row per (check, method): how many comparisons, rules and problems, and the worst
        outcome (largest error relative to its tolerance) with where it happened.

        Returns:
            The rows, as dicts from column name to value.
        """
        groups: dict[tuple, list[Outcome]] = {}
        for o in self.outcomes:
            groups.setdefault((o.check, o.method), []).append(o)
        rows = []
        for (check, method), items in groups.items():
            worst = max(items, key=_badness)
            verdict = worst.verdict
            rows.append({"check": f"{check} [{method}]" if method != "-" else check,
                         "n": len(items), "rules": len({o.rule for o in items}),
                         "problems": len({o.problem for o in items}),
                         "max rel err": max(o.max_rel_err for o in items),
                         "worst": f"{worst.max_rel_err:.1e} / tol {worst.tolerance:.1e}",
                         "at": f"{worst.rule} on {worst.problem} ({worst.where})",
                         "verdict": verdict})
        return rows

    check_summary = rows_by_check  # the earlier name

    def summary_table(self) -> str:
        """The per-check summary (:meth:`rows_by_check`) as aligned text.

        Returns:
            The table as text.
        """
        columns = ["check", "n", "rules", "problems", "max rel err", "worst", "verdict"]
        return _text_table(columns, [[_cell(r[c]) for c in columns] for r in self.rows_by_check()])

    def table(self, failures_only: bool = False) -> str:
        """The full table (:meth:`rows`: the worst outcome per check, method, rule, problem and
        dtype) as aligned text.

        Args:
            failures_only: only the rows whose verdict is not PASS.

        Returns:
            The table as text (a header and a rule line when no row is left).
        """
        rows = [r for r in self.rows() if not failures_only or r["verdict"] != PASS]
        columns = ["check", "rule", "problem", "dtype", "max abs err", "max rel err",
                   "tolerance", "verdict"]
        return _text_table(columns, [[_cell(r[c]) for c in columns] for r in rows])

    def findings_table(self) -> str:
        """The greedy-vs-exact findings as aligned text: per rule, problem and K the sign
        agreement, the cosine similarity and the median |exact| / |greedy|.

        Returns:
            The table as text, or "" when there are no findings.
        """
        if not self.findings:
            return ""
        out = ["greedy one-step vs exact K-step hypergradient (a finding, not a test):",
               f"  {'rule':<34} {'problem':<11} {'K':>4}  {'sign agree':>10}  {'cosine':>7}"
               f"  {'|exact|/|greedy|':>16}  n"]
        for f in self.findings:
            out.append(f"  {f.rule:<34} {f.problem:<11} {f.steps:>4}  {f.sign_agreement:>10.2f}"
                       f"  {f.cosine:>7.3f}  {f.magnitude_ratio:>16.3g}  {f.samples}")
        return "\n".join(out)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """The whole report as a JSON-able dict (what ``--json`` writes; read back by
        :meth:`from_dict`): verdict, summary, counts, settings, the table's rows, every outcome,
        the diagnoses, the failure and inconclusive messages and the findings. Non-finite
        numbers are written as the strings "inf", "-inf" or "nan".

        Returns:
            The dict.
        """
        return {"passed": self.passed, "interrupted": self.interrupted, "summary": self.summary(),
                "counts": self.counts(), "meta": self.meta,
                "rows": [_jsonable(r) for r in self.rows()],
                "outcomes": [_jsonable(asdict(o)) for o in self.outcomes],
                "verdict": self.verdict, "diagnoses": self.diagnoses(),
                "failures": [o.message for o in self.failures],
                "inconclusive": [o.message for o in self.inconclusives],
                "findings": [_jsonable(asdict(f)) for f in self.findings]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """The report that :meth:`to_dict` (``--json``) wrote, e.g. to re-render its Markdown.

        Args:
            data: the dict that :meth:`to_dict` wrote (read back from JSON).

        Returns:
            The :class:`Report`.
        """
        numbers = ("max_abs_err", "max_rel_err", "tolerance")
        outcomes = [Outcome(**{k: _number(v, math.inf) if k in numbers else v
                               for k, v in o.items()}) for o in data.get("outcomes", [])]
        ratios = ("sign_agreement", "cosine", "magnitude_ratio")
        findings = [Finding(**{k: _number(v, math.nan) if k in ratios else v
                               for k, v in f.items()})
                    for f in data.get("findings", [])]
        return cls(outcomes, findings, dict(data.get("meta", {})), bool(data.get("interrupted")))

    @classmethod
    def read_json(cls, path: str | Path) -> "Report":
        """The report a :meth:`write_json` (``--json``) file holds.

        Args:
            path: the JSON file.

        Returns:
            The :class:`Report`.
        """
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as strict JSON to ``path`` (its folder made if need be), through
        a temporary file renamed into place, so that a reader never sees half a report.

        Args:
            path: the JSON file to write.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        tmp.replace(path)

    def markdown(self) -> str:
        """The report as a Markdown page (as docs/verification-report.md): the summary, the
        settings, the diagnoses, failures and inconclusive comparisons, the summary by check,
        the findings, and the full table in a collapsed section.

        Returns:
            The page's text.
        """
        lines = ["# Verification report", "", f"**{self.summary()}**", ""]
        if self.meta:
            lines += ["| setting | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in self.meta.items()]
            lines.append("")
        diagnoses = self.diagnoses()
        if diagnoses:
            lines += ["## Diagnosis", ""] + [f"- {d}" for d in diagnoses] + [""]
        if self.failures:
            lines += ["## Failures", ""] + [f"- {o.message}" for o in self.failures] + [""]
        if self.inconclusives:
            lines += ["## Inconclusive", ""] + [f"- {o.message}" for o in self.inconclusives] + [""]
        lines += ["## Summary by check", "",
                  "Each row gathers every comparison of one check and method, over all rules, "
                  "problems, seeds and steps; `max rel err` is the largest error relative to "
                  "the size of the quantity, `worst` the comparison closest to its tolerance "
                  "and where it was.", "",
                  "| check | comparisons | rules | problems | max rel err | worst (rel err / tolerance) | at | verdict |",
                  "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
        for r in self.rows_by_check():
            lines.append("| " + " | ".join(_cell(r[c]) for c in (
                "check", "n", "rules", "problems", "max rel err", "worst", "at", "verdict")) + " |")
        if self.findings:
            lines += ["", "## Finding: greedy one-step vs exact K-step hypergradient", "",
                      "Not a pass/fail check: how often HD's one-step hypergradient h_{K+1} has "
                      "the sign of the exact derivative dL_K/dα of the loss after K steps with a "
                      "constant rate, their cosine similarity, and the median of |exact| / "
                      "|greedy|, over every rate entry of every seed (`samples`).", "",
                      "| rule | problem | K | sign agreement | cosine | abs(exact)/abs(greedy) | samples |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
            for f in self.findings:
                lines.append(f"| {f.rule} | {f.problem} | {f.steps} | {f.sign_agreement:.2f} | "
                             f"{f.cosine:.3f} | {f.magnitude_ratio:.3g} | {f.samples} |")
        rows = self.rows()
        lines += ["", "## All checks", "",
                  f"One row per check, method, rule, problem and dtype ({len(rows)} rows): the "
                  "worst of its comparisons (seeds, steps t, K).", "",
                  "<details><summary>the full table</summary>", "",
                  "| check | rule | problem | dtype | max abs err | max rel err | tolerance | verdict |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
        for r in rows:
            lines.append("| " + " | ".join(_cell(r[c]) for c in (
                "check", "rule", "problem", "dtype", "max abs err", "max rel err", "tolerance",
                "verdict")) + " |")
        lines += ["", "</details>"]
        return "\n".join(lines) + "\n"

    def write_markdown(self, path: str | Path) -> None:
        """Write :meth:`markdown` to ``path`` (its folder made if need be).

        Args:
            path: the Markdown file to write.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.markdown())


def _text_table(columns: list[str], cells: list[list[str]]) -> str:
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)


def _badness(o: Outcome) -> tuple:
    rank = VERDICTS.index(o.verdict)
    return (rank, o.max_rel_err / o.tolerance if o.tolerance > 0 else o.max_rel_err)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return "0" if value == 0 else f"{value:.1e}"
    return str(value)


def _jsonable(record: dict) -> dict:
    """Strict JSON has no inf or nan: a non-finite float is written as the string "inf",
    "-inf" or "nan" (read back by :func:`_number`), so an undecided (nan) error stays apart
    from an infinite one."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def _number(value: Any, missing: float) -> Any:
    """A number :func:`_jsonable` wrote; ``missing`` for None (reports written before
    non-finite numbers were kept as strings)."""
    if value is None:
        return missing
    return float(value) if isinstance(value, str) else value


def environment() -> dict[str, str]:
    """The Python and torch versions, for a report's settings.

    Returns:
        ``{"python": ..., "torch": ...}``.
    """
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__}


__all__ = ["Outcome", "Finding", "Report", "judged", "errored", "PASS", "FAIL", "ERROR",
           "INCONCLUSIVE", "environment"]
