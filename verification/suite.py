"""Plans and runs the checks; the Python API is :func:`run`.

    import verification
    report = verification.run(quick=True)
    print(report.summary()); print(report.table())
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from verification import checks as C
from verification.catalog import (RuleSpec, all_builtin_specs, hyperdescent_rule_specs,
                                  quick_specs, user_spec)
from verification.problems import PROBLEM_NAMES, Problem, make_problem
from verification.report import Finding, Outcome, Report, environment, errored


@dataclass(frozen=True)
class Plan:
    """How much to check. ``states`` are the steps t whose h_t is checked (several, mid
    trajectory), on a trajectory of ``steps`` steps from each seed's problem.

    Attributes:
        problems: the problems the checks run on.
        seeds: the seeds of each problem.
        steps: the length of each trajectory.
        states: the steps t whose one-step h_t is checked.
        second_order_states: the steps t of the second-order check.
        unrolled_steps: the K of the K-step checks.
        hyper_steps: the K of d loss_K/dβ and d loss_K/dα_0.
        hyper_problems: the problems of those checks.
        finding_steps: the K of the greedy-vs-exact findings.
        finding_seeds: the seeds of the findings.
        equivalence_steps: the steps of the equivalence checks (base rule, torch.optim, vmap).
        vmap_seeds: the seeds of the vmap equivalence.
        batch_seeds: the seeds of the vmapped one-step check (one vmap per rule and problem).
        batch_problems: its problems (None: all of the plan's).
    """

    problems: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    states: tuple[int, ...]
    second_order_states: tuple[int, ...]
    unrolled_steps: tuple[int, ...]
    hyper_steps: int
    hyper_problems: tuple[str, ...]
    finding_steps: tuple[int, ...]
    finding_seeds: int
    equivalence_steps: int
    vmap_seeds: int = 3
    batch_seeds: int = 4  # seeds of the vmapped one-step check (one vmap per rule and problem)
    batch_problems: Optional[tuple[str, ...]] = None  # its problems (None: all of the plan's)


QUICK = Plan(problems=PROBLEM_NAMES, seeds=(0,), steps=8, states=(3, 8),
             second_order_states=(5,), unrolled_steps=(10,), hyper_steps=5,
             hyper_problems=("quadratic", "relu_mlp"), finding_steps=(1, 5, 20), finding_seeds=4,
             equivalence_steps=10, batch_seeds=4, batch_problems=("quadratic",))
FULL = Plan(problems=PROBLEM_NAMES, seeds=(0, 1), steps=20, states=(2, 3, 20),
            second_order_states=(10,), unrolled_steps=(20, 200), hyper_steps=20,
            hyper_problems=("quadratic", "rosenbrock", "relu_mlp"),
            finding_steps=(1, 3, 10, 30, 100, 300), finding_seeds=8, equivalence_steps=30,
            batch_seeds=16)

# Which built-in specs get the costlier checks (K-step loops), by name: in the full run every
# base the library ships, in the quick run a representative few.
QUICK_UNROLLED = ("sgd_hd[global,additive]", "adam_hd[element,additive]")
QUICK_HYPER = ("sgd_hd[global,additive]", "sgd_hd[global,additive,higher-order]",
               "adam_hd[element,multiplicative,higher-order]")
FULL_UNROLLED = ("sgd_hd[global,additive]", "sgd_hd[element,additive]",
                 "sgd_hd+l2[global,additive]", "sgdn_hd[global,additive]",
                 "sgdn_hd[tensor,additive]", "adam_hd[global,additive]",
                 "adam_hd[element,additive]", "adamw_hd[global,additive]",
                 "rmsprop_hd[global,additive]", "adagrad_hd[global,additive]",
                 "lion_hd[global,additive]")


def differentiated_through(spec: RuleSpec, problem: Problem) -> bool:
    """Whether the multi-step checks (K-step, d loss_K / d beta, d alpha_0), which
    differentiate through training, run ``spec`` on ``problem``. On a problem with exactly-zero
    gradient entries (dead ReLU units) a rule with a square root of a second moment needs
    ``eps_root`` > 0 to be differentiable through training: the built-in rules are run there
    with it, user rules only where the user asks for that problem (``problems=``)."""
    return not problem.exact_zeros or spec.family != "user"


def full_hyper(spec: RuleSpec) -> bool:
    """d loss_K/dβ, dα_0 in the full run: every variant of SGD-HD and Adam-HD, the global
    variants of the other bases."""
    return spec.family in ("sgd_hd", "adam_hd") or spec.granularity == "global"


FINDING_SPECS = {True: ("sgd_hd[global,additive]", "adam_hd[element,additive]"),
                 False: ("sgd_hd[global,additive]", "sgd_hd[element,additive]",
                         "sgdn_hd[global,additive]", "adam_hd[global,additive]",
                         "adam_hd[element,additive]")}


@dataclass
class Task:
    """A unit of work for the progress bar: ``run()`` returns outcomes or findings."""

    label: str
    run: Callable[[], list]
    check: str
    rule: str
    problem: str


def _guarded(task: Task, dtype: torch.dtype) -> list:
    try:
        return task.run()
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - every failure becomes a row in the report
        return [errored(task.check, task.rule, task.problem, C.dtype_name(dtype), task.label,
                        error)]


# ----------------------------------------------------------------------------- the plan table


@dataclass
class Planner:
    """What :func:`plan_tasks` plans for: the plan, the mode, and the problems (built once per
    name and seed)."""

    plan: Plan
    quick: bool
    explicit: bool
    dtype: torch.dtype
    device: Any
    only: Optional[str] = None
    problems: dict = field(default_factory=dict)

    def problem(self, name: str, seed: int = 0) -> Problem:
        """The problem ``name`` with ``seed``, in the planner's dtype and device, built on first
        use and kept in ``problems``.

        Args:
            name: the problem's name.
            seed: its seed.

        Returns:
            The :class:`Problem`.
        """
        if (name, seed) not in self.problems:
            self.problems[(name, seed)] = make_problem(name, seed=seed, dtype=self.dtype,
                                                       device=self.device)
        return self.problems[(name, seed)]


def _user(spec: RuleSpec) -> bool:
    return spec.family == "user"


@dataclass(frozen=True)
class CheckKind:
    """A row of the plan: the rules it ``applies`` to (in quick or full mode), the
    ``problems`` it runs on, whether it differentiates ``through_training`` (then skipped
    where :func:`differentiated_through` says no, unless the problems were chosen), and the
    tasks it ``make``\\ s for one rule on one problem."""

    name: str
    applies: Callable[[RuleSpec, Planner], bool]
    problems: Callable[[Plan, bool], Sequence[str]]
    make: Callable[[RuleSpec, str, Planner], list[Task]]
    through_training: bool = False

    def tasks(self, spec: RuleSpec, planner: Planner) -> list[Task]:
        """The tasks of this check for ``spec``: none where it does not apply, else those
        ``make`` returns on each of its problems (for a check through training, only the problems
        :func:`differentiated_through` allows, unless the problems were chosen).

        Args:
            spec: the rule.
            planner: the plan, mode and problems.

        Returns:
            The tasks.
        """
        if not self.applies(spec, planner):
            return []
        tasks = []
        for name in self.problems(planner.plan, planner.quick):
            if self.through_training and not (
                    planner.explicit or differentiated_through(spec, planner.problem(name))):
                continue
            tasks += self.make(spec, name, planner)
        return tasks


def _trajectory_tasks(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    return [_case_task(spec, name, seed, p.plan, p.problem, p.dtype) for seed in p.plan.seeds]


def _one_step_vmapped_task(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    return [Task(f"{spec.name} / {name} / one step, vmapped seeds", lambda: (
        C.check_one_step_vmapped(spec, p.problem(name), p.plan.states, p.plan.batch_seeds)),
        C.ONE_STEP, spec.name, name)]


def _unrolled_tasks(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    return [Task(f"{spec.name} / {name} / K={steps}", lambda steps=steps: C.check_unrolled(
        C.make_case(spec, p.problem(name), 2), steps), C.UNROLLED, spec.name, name)
        for steps in p.plan.unrolled_steps]


def _hyper_task(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    return [Task(f"{spec.name} / {name} / hyper K={p.plan.hyper_steps}", lambda: C.check_hyper(
        C.make_case(spec, p.problem(name), 2), p.plan.hyper_steps), C.HYPER_BETA, spec.name, name)]


def _vmap_task(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    return [Task(f"{spec.name} / {name} / vmap", lambda: C.check_vmap(
        spec, p.problem(name), p.plan.equivalence_steps, p.plan.vmap_seeds),
        C.VMAP, spec.name, name)]


def _beta_zero_task(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    return [Task(f"{spec.name} / {name} / beta=0", lambda: C.check_beta_zero(
        spec, p.problem(name), p.plan.equivalence_steps), C.BETA_ZERO, spec.name, name)]


def _hyperdescent_tasks(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    from verification.hyperdescent import HYPERDESCENT, HyperdescentCase, check_hyperdescent

    def run(seed: int) -> list:
        case = HyperdescentCase(spec, p.problem(name, seed), p.plan.steps, seed)
        return [o for t in p.plan.states for o in check_hyperdescent(case, t)]

    return [Task(f"{spec.name} / {name} / seed {seed} / hyperdescent",
                 lambda seed=seed: run(seed), HYPERDESCENT, spec.name, name)
            for seed in p.plan.seeds]


def _unsupported_task(spec: RuleSpec) -> list[Task]:
    """One INCONCLUSIVE row for a rule the suite cannot verify yet, saying why (rather than
    failing a rule that may be right)."""
    from verification.derivatives import Judge

    return [Task(f"{spec.name} / not verified", lambda: [
        Judge("rule", spec.name, "-", torch.float64, "", "").inconclusive("-", spec.unsupported)],
        "rule", spec.name, "-")]


def _finding_task(spec: RuleSpec, name: str, p: Planner) -> list[Task]:
    return [Task(f"{spec.name} / {name} / greedy vs exact", lambda: C.greedy_vs_exact(
        spec, p.problem(name), p.plan.finding_steps, p.plan.finding_seeds),
        "finding", spec.name, name)]


def _all(plan: Plan, quick: bool) -> Sequence[str]:
    return plan.problems


def _first(count_quick: int, count_full: Optional[int]) -> Callable[[Plan, bool], Sequence[str]]:
    """The first problems of the plan: ``count_quick`` in quick mode, ``count_full`` (None:
    all) in the full run."""
    return lambda plan, quick: plan.problems[:count_quick if quick else count_full]


# Every rule gets these checks, in this order, where ``applies`` says so (a user rule, family
# "user", gets every check that applies to a rule of unknown family).
RULE_CHECKS = (
    CheckKind("trajectory (one step, second order, oracle, hyper-hypergradient)",
              lambda spec, p: not spec.adapts, _all, _trajectory_tasks),
    CheckKind("hyperdescent (each adapted hyperparameter: one step, rate law)",
              lambda spec, p: bool(spec.adapts), _all, _hyperdescent_tasks),
    CheckKind("one step, vmapped seeds", lambda spec, p: not spec.adapts,
              lambda plan, quick: [n for n in plan.batch_problems or plan.problems
                                   if n in plan.problems], _one_step_vmapped_task),
    CheckKind("K-step unrolled", lambda spec, p: not spec.adapts and (_user(spec) or spec.name in (
        QUICK_UNROLLED if p.quick else FULL_UNROLLED)), _all, _unrolled_tasks,
        through_training=True),
    CheckKind("d loss_K / d beta, d alpha_0", lambda spec, p: not spec.adapts and (_user(spec) or (
        spec.name in QUICK_HYPER if p.quick else full_hyper(spec))),
        lambda plan, quick: plan.hyper_problems, _hyper_task, through_training=True),
    CheckKind("vmap over seeds", lambda spec, p: not spec.adapts and (
        _user(spec) or not p.quick or spec.name in QUICK_UNROLLED), _first(1, 2), _vmap_task),
    CheckKind("beta=0", lambda spec, p: not _user(spec) and spec.base is not None
              and not spec.higher_order and not spec.transition and not spec.scheduled, _all,
              _beta_zero_task),
)
# A library-wide check: greedy vs exact, for a few built-in rules.
FINDINGS = CheckKind("greedy vs exact", lambda spec, p: spec.name in FINDING_SPECS[p.quick],
                     _first(1, None), _finding_task)


def _torch_optim_tasks(specs: Sequence[RuleSpec], p: Planner) -> list[Task]:
    """torch.optim: once per base family (its global additive spec), on every problem."""
    families: dict[str, RuleSpec] = {}
    for spec in all_builtin_specs():
        families.setdefault(spec.family, spec)
    return [Task(f"{family} / {name} / torch.optim", lambda spec=spec, name=name: (
        C.check_torch_optim(spec, p.problem(name), p.plan.equivalence_steps)),
        C.TORCH_OPTIM, family, name)
        for family, spec in families.items()
        if spec.torch_optimizer is not None and not (p.only and not fnmatch.fnmatch(spec.name,
                                                                                     p.only))
        for name in p.plan.problems]


def _finding_tasks(specs: Sequence[RuleSpec], p: Planner) -> list[Task]:
    return [task for spec in specs for task in FINDINGS.tasks(spec, p)]


def _front_end_tasks(specs: Sequence[RuleSpec], p: Planner) -> list[Task]:
    from verification import frontends
    return [task for task in frontends.front_end_tasks(p.plan, p.problem, quick=p.quick)
            if not p.only or fnmatch.fnmatch(task.rule, p.only)]


# The library-wide checks (``catalog``), after every rule's, in this order.
CATALOG_CHECKS = (_torch_optim_tasks, _finding_tasks, _front_end_tasks)


def plan_tasks(specs: Sequence[RuleSpec], plan: Plan, *, quick: bool, catalog: bool,
               dtype: torch.dtype, device: Any, only: Optional[str] = None,
               explicit: bool = False) -> list[Task]:
    """The tasks for ``specs``: for each rule the :data:`RULE_CHECKS` that apply to it; with
    ``catalog``, then the library-wide :data:`CATALOG_CHECKS` (torch.optim, findings, other
    front ends). ``explicit``: the problems were chosen by the user, and every check runs on
    each of them."""
    planner = Planner(plan, quick, explicit, dtype, device, only)
    tasks = [task for spec in specs if spec.unsupported for task in _unsupported_task(spec)]
    tasks += [task for spec in specs if not spec.unsupported for kind in RULE_CHECKS
              for task in kind.tasks(spec, planner)]
    if catalog:
        for library_check in CATALOG_CHECKS:
            tasks += library_check(specs, planner)
    return tasks


@dataclass(frozen=True)
class CaseCheck:
    """A check on one trajectory: ``run(case, t)`` at each step t that ``steps(plan, spec,
    seed)`` gives (None: the whole trajectory at once)."""

    check: str
    run: Callable[[C.Case, Optional[int]], list]
    steps: Callable[[Plan, RuleSpec, int], Sequence[Optional[int]]]


# Checks 1, 2, the oracle (first seed) and the analytic hyper-hypergradient (higher-order
# rules, t >= 3), in this order, on one trajectory.
CASE_CHECKS = (
    CaseCheck(C.ONE_STEP, C.check_one_step, lambda plan, spec, seed: plan.states),
    CaseCheck(C.SECOND_ORDER, C.check_second_order,
              lambda plan, spec, seed: plan.second_order_states),
    CaseCheck(C.ORACLE, lambda case, t: C.check_oracle(case),
              lambda plan, spec, seed: [None] if seed == plan.seeds[0] else []),
    CaseCheck(C.HYPER_ANALYTIC, C.check_hyper_analytic, lambda plan, spec, seed: [
        t for t in plan.states if t >= 3] if spec.higher_order else []),
)


def _case_task(spec: RuleSpec, name: str, seed: int, plan: Plan,
               problem: Callable[[str, int], Problem], dtype: torch.dtype) -> Task:
    """The :data:`CASE_CHECKS` on one trajectory; a check that raises becomes an ERROR row and
    the others still run."""
    def run() -> list:
        case = C.make_case(spec, problem(name, seed), plan.steps, seed)
        out: list[Outcome] = []
        for kind in CASE_CHECKS:
            for t in kind.steps(plan, spec, seed):
                where = f"seed {seed}, t={t if t is not None else f'1..{plan.steps}'}"
                out += _each(lambda: kind.run(case, t), kind.check, case, where)
        return out

    return Task(f"{spec.name} / {name} / seed {seed}", run, "trajectory", spec.name, name)


def _each(fn: Callable[[], list], check: str, case: C.Case, where: str) -> list:
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001
        rule, problem, dtype = case.label()
        return [errored(check, rule, problem, dtype, where, error)]


def run(rules: Optional[Iterable[RuleSpec | Callable[[float, float], Any]]] = None, *,
        quick: bool = False, only: Optional[str] = None, problems: Optional[Sequence[str]] = None,
        device: Any = "cpu", dtype: torch.dtype = torch.float64, progress: bool = False,
        plan: Optional[Plan] = None, threads: Optional[int] = 1) -> Report:
    """Run the verification suite and return a :class:`~verification.report.Report`.

    ``rules``: None for every built-in rule and variant (a representative subset with
    ``quick``); otherwise :class:`RuleSpec` objects or user factories ``factory(lr,
    hypergrad_lr) -> rule`` (the protocol of docs/writing-a-rule.md), which get every check
    that applies to a rule of unknown family (no base-rule / torch.optim equivalence).
    ``only``: a glob on rule names (e.g. ``"adam*"``). ``problems``: a subset of
    :data:`~verification.problems.PROBLEM_NAMES`. Ctrl-C stops early and returns what ran, with
    ``report.interrupted`` set. ``threads``: torch's intra-op CPU threads while the suite runs
    (restored afterwards; None leaves torch's setting). The problems are tiny, so one thread is
    the fastest by far: several threads only contend for them, most of all on a busy machine.

    Args:
        rules: the rules to verify (None: the built-in rules).
        quick: a representative subset of the rules and checks (< 1 minute).
        only: a glob on rule names, or None.
        problems: the problems to run on (None: each check's own).
        device: the device to run on.
        dtype: the dtype of the problems.
        progress: show a progress bar.
        plan: how much to check (None: :data:`QUICK` or :data:`FULL`, as ``quick`` says).
        threads: torch's intra-op CPU threads while the suite runs (None: torch's setting).

    Returns:
        The :class:`~verification.report.Report`.

    Raises:
        ValueError: an unknown problem, no rule matching ``only``, or ``threads`` < 1.
    """
    plan = plan or (QUICK if quick else FULL)
    if problems:
        unknown = [p for p in problems if p not in PROBLEM_NAMES]
        if unknown:
            raise ValueError(f"unknown problem(s) {unknown}; choose from {', '.join(PROBLEM_NAMES)}")
        plan = replace(plan, problems=tuple(problems),
                       hyper_problems=tuple(p for p in plan.hyper_problems if p in problems)
                       or tuple(problems[:1]))
    if rules is None:
        from verification.hyperdescent import hyperdescent_specs
        specs = ((quick_specs() if quick else all_builtin_specs()) + hyperdescent_specs(quick)
                 + hyperdescent_rule_specs(quick))
    else:
        specs = [r if isinstance(r, RuleSpec) else user_spec(r) for r in rules]
    if only:
        specs = [s for s in specs if fnmatch.fnmatch(s.name, only)]
        if not specs:
            raise ValueError(f"no rule matches --only {only!r}")
    device = torch.device(device)
    start = time.perf_counter()
    tasks = plan_tasks(specs, plan, quick=quick, catalog=rules is None, only=only, dtype=dtype,
                       device=device, explicit=bool(problems))
    report = Report(meta={"mode": "quick" if quick else "full", "device": str(device),
                          "dtype": C.dtype_name(dtype), "rules": len(specs),
                          "problems": ", ".join(plan.problems), **environment()})
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    bar = None
    if progress:
        from hdfunc._progress import progress_bar
        bar = progress_bar(total=len(tasks), desc="verifying", unit="task", leave=False)
    try:
        for task in tasks:
            if bar is not None:
                bar.set_postfix_str(task.label[:60], refresh=False)
            for item in _guarded(task, dtype):
                (report.findings if isinstance(item, Finding) else report.outcomes).append(item)
            if bar is not None:
                bar.update()
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(previous_threads)
    report.meta["seconds"] = round(time.perf_counter() - start, 1)
    return report
