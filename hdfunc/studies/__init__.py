"""Batched multi-seed studies with ``torch.func.vmap`` (docs/studies.md).

    from hdfunc.studies import StudyConfig, run_study, print_summary
    results = run_study(StudyConfig(problem="classification", steps=200, seeds=8))
    print_summary(results)
"""

from hdfunc.studies.config import (PAPER_BETA, OptimizerSpec, RunKey, StudyConfig, demo_config,
                                     parse_optimizer)
from hdfunc.studies.engine import BatchedTrainer, minibatch_indices, run_study
from hdfunc.studies.problems import PROBLEMS, Problem, make_problem
from hdfunc.studies.results import RunSummary, StudyResults, load_results, print_summary
from hdfunc.studies.storage import StudyDamagedError, StudyError

__all__ = ["BatchedTrainer", "OptimizerSpec", "PAPER_BETA", "PROBLEMS", "Problem", "RunKey",
           "RunSummary", "StudyConfig", "StudyDamagedError", "StudyError", "StudyResults",
           "demo_config", "load_results", "make_problem", "minibatch_indices", "parse_optimizer",
           "print_summary", "run_study"]
