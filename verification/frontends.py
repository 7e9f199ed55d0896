"""Functional rules ≡ other front ends of the project (the optimizer classes of ``hdfunc.optim``,
when that module exists). Without it this module contributes no checks."""

from __future__ import annotations

from typing import Any, Callable

import torch

import hdfunc

from verification import checks as C
from verification.catalog import builtin_spec, calibrate
from verification.report import judged


def _find_class(module: Any, rule_name: str) -> Any:
    """The optimizer class for ``rule_name`` (e.g. sgd_hd -> SGDHD / SgdHd / SGD_HD)."""
    key = rule_name.replace("_", "").lower()
    for name in getattr(module, "__all__", None) or vars(module):
        value = getattr(module, name, None)
        if callable(value) and name.replace("_", "").lower() == key:
            return value  # an Optimizer subclass, or a function that returns one
    return None


def check_front_end(cls: Any, rule_name: str, problem: Any, steps: int) -> list:
    """The optimizer class ``cls`` takes the same steps as the functional rule ``rule_name``
    with the same α_0 and β."""
    spec = builtin_spec(rule_name)
    calibration = calibrate(spec, problem)
    lr, beta = calibration.lr, calibration.hypergrad_lr
    ours = C.run_trajectory(hdfunc.RULES[rule_name](lr, beta), problem.loss, problem.params, steps)
    hypergrads = []  # the optimizer's h_t, where it exposes its HD state (param_groups' hd_state)

    def record(optimizer: Any) -> None:
        hd = optimizer.param_groups[0].get("hd_state")
        if isinstance(hd, dict) and isinstance(hd.get("hypergrad"), torch.Tensor):
            hypergrads.append(hd["hypergrad"].detach().clone())

    theirs, _ = C.optimizer_trajectory(
        problem, lambda tensors: cls(tensors, lr=lr, hypergrad_lr=beta), steps, record)
    name = getattr(cls, "__name__", "optimizer")
    dtype = C.dtype_name(problem.dtype)
    tol = C.tolerance(problem.dtype, "front_end")
    abs_err, scale = C._trajectory_error(ours, theirs)
    out = [judged(C.FRONT_END, f"{name} params", rule_name, problem.name, dtype, abs_err, scale,
                  tol, f"{steps} steps",
                  f"the parameters of hdfunc.{rule_name} and hdfunc.optim.{name}")]
    if len(hypergrads) == steps:
        exact = [C.node_of(state).hypergrad for _, state in ours[1:]]
        abs_err = max(C.tree_max_diff(h, e) for h, e in zip(hypergrads, exact))
        scale = max(C.tree_max_abs(e) for e in exact)
        out.append(judged(C.FRONT_END, f"{name} h_t", rule_name, problem.name, dtype, abs_err,
                          scale, tol, f"{steps} steps",
                          f"h_t of hdfunc.optim.{name} and of hdfunc.{rule_name} (exact by the "
                          "one-step identity)"))
    return out


def front_end_tasks(plan: Any, problem: Callable[..., Any], *, quick: bool) -> list:
    try:
        import hdfunc.optim as optim  # written separately; optional
    except ImportError:
        return []
    from verification.suite import Task
    tasks = []
    for rule_name in hdfunc.HD_OF.values():
        cls = _find_class(optim, rule_name)
        if cls is None:
            continue
        for name in plan.problems[:1] if quick else plan.problems:
            tasks.append(Task(f"{rule_name} / {name} / hdfunc.optim",
                              lambda cls=cls, rule_name=rule_name, name=name: check_front_end(
                                  cls, rule_name, problem(name), plan.equivalence_steps),
                              C.FRONT_END, rule_name, name))
    return tasks
