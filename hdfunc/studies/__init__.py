"""Batched multi-seed studies with ``torch.func.vmap`` (docs/studies.md).

    from hdfunc.studies import StudyConfig, run_study, print_summary
    results = run_study(StudyConfig(problem="classification", steps=200, seeds=8))
    print_summary(results)

The names below are imported on first use (PEP 562), so ``hdfunc study --help`` starts without
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hdfunc._lazy import lazy_exports

_EXPORTS = {
    "hdfunc.studies.config": ("PAPER_BETA", "OptimizerSpec", "RunKey", "StudyConfig",
                              "demo_config", "parse_optimizer"),
    "hdfunc.studies.engine": ("BatchedTrainer", "minibatch_indices", "run_study"),
    "hdfunc.studies.problems": ("PROBLEMS", "Problem", "make_problem"),
    "hdfunc.studies.results": ("RunSummary", "StudyResults", "load_results", "print_summary"),
    "hdfunc.studies.storage": ("StudyDamagedError", "StudyError"),
}
_WHERE, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["BatchedTrainer", "OptimizerSpec", "PAPER_BETA", "PROBLEMS", "Problem", "RunKey",
           "RunSummary", "StudyConfig", "StudyDamagedError", "StudyError", "StudyResults",
           "demo_config", "load_results", "make_problem", "minibatch_indices", "parse_optimizer",
           "print_summary", "run_study"]

if TYPE_CHECKING:
    from hdfunc.studies.config import (PAPER_BETA, OptimizerSpec, RunKey, StudyConfig,
                                       demo_config, parse_optimizer)
    from hdfunc.studies.engine import BatchedTrainer, minibatch_indices, run_study
    from hdfunc.studies.problems import PROBLEMS, Problem, make_problem
    from hdfunc.studies.results import RunSummary, StudyResults, load_results, print_summary
    from hdfunc.studies.storage import StudyDamagedError, StudyError

