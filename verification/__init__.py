"""The hdfunc verification suite: every hypergradient the library uses is checked against the
exact derivative computed by ``torch.func`` (reverse mode, forward mode, finite differences),
through one step, K unrolled steps and the HD updates themselves; plus equivalences with the
base rules, ``torch.optim`` and ``vmap``.

    python -m verification --quick                      # representative subset, < 1 minute
    python -m verification --rule mypkg.rules:my_rule   # verify your own HD rule
    report = verification.run(quick=True)               # the same from Python
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hdfunc._lazy import lazy_exports

# Imported on first use (PEP 562), so ``hdfunc verify --help`` starts without importing torch.
_EXPORTS = {
    "verification.catalog": ("RuleSpec", "all_builtin_specs", "builtin_spec", "quick_specs",
                             "user_spec"),
    "verification.problems": ("PROBLEM_NAMES", "Problem", "make_problem"),
    "verification.report": ("Finding", "Outcome", "Report"),
    "verification.suite": ("FULL", "QUICK", "Plan", "run"),
}
_WHERE, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["FULL", "Finding", "Outcome", "PROBLEM_NAMES", "Plan", "Problem", "QUICK", "Report",
           "RuleSpec", "all_builtin_specs", "builtin_spec", "make_problem", "quick_specs", "run",
           "user_spec"]

if TYPE_CHECKING:
    from verification.catalog import (RuleSpec, all_builtin_specs, builtin_spec, quick_specs,
                                      user_spec)
    from verification.problems import PROBLEM_NAMES, Problem, make_problem
    from verification.report import Finding, Outcome, Report
    from verification.suite import FULL, QUICK, Plan, run

