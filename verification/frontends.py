"""Functional rules ≡ other front ends of the project: each optimizer class of ``hdfunc.optim``
that the rule registry (``hdfunc.REGISTRY``) pairs with an HD rule takes that rule's steps."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

import hdfunc

from verification import checks as C
from verification.catalog import builtin_spec, calibrate
from verification.report import judged


def check_front_end(cls: Any, rule_name: str, problem: Any, steps: int,
                    options: Optional[dict] = None) -> list:
    """The optimizer class ``cls`` (built with ``options`` besides α_0 and β) takes the same
    steps as the functional rule ``rule_name`` with the same α_0 and β."""
    spec = builtin_spec(rule_name)
    calibration = calibrate(spec, problem)
    lr, beta = calibration.lr, calibration.hypergrad_lr
    ours = C.run_trajectory(hdfunc.RULES[rule_name](lr, beta), problem.loss, problem.params, steps)
    hypergrads = []  # the optimizer's h_t, where it exposes it (hd_stats(), as hdfunc.optim)

    def record(optimizer: Any) -> None:
        stats = optimizer.hd_stats()[0] if hasattr(optimizer, "hd_stats") else {}
        if isinstance(stats.get("hypergrad"), torch.Tensor):
            hypergrads.append(stats["hypergrad"])  # h_t (hd_stats() returns copies)

    theirs, _ = C.optimizer_trajectory(
        problem, lambda tensors: cls(tensors, **{**(options or {}), "lr": lr, "hypergrad_lr": beta}),
        steps, record)
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
    """One task per problem (the first only in quick mode) for each registered HD rule with an
    optimizer class that the catalogue verifies."""
    from verification.catalog import BASES
    from verification.suite import Task
    tasks = []
    for rule_name, info in hdfunc.REGISTRY.items():
        if info.optimizer is None or rule_name not in BASES:
            continue
        cls = info.optimizer_class()
        for name in plan.problems[:1] if quick else plan.problems:
            tasks.append(Task(f"{rule_name} / {name} / hdfunc.optim",
                              lambda cls=cls, rule_name=rule_name, name=name,
                              options=info.optimizer_options: check_front_end(
                                  cls, rule_name, problem(name), plan.equivalence_steps, options),
                              C.FRONT_END, rule_name, name))
    return tasks
