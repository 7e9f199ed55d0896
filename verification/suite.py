"""Plans and runs the checks; the Python API is :func:`run`.

    import verification
    report = verification.run(quick=True)
    print(report.summary()); print(report.table())
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from verification import checks as C
from verification.catalog import RuleSpec, all_builtin_specs, quick_specs, user_spec
from verification.problems import PROBLEM_NAMES, Problem, make_problem
from verification.report import Finding, Outcome, Report, environment, errored


@dataclass(frozen=True)
class Plan:
    """How much to check. ``states`` are the steps t whose h_t is checked (several, mid
    trajectory), on a trajectory of ``steps`` steps from each seed's problem."""

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


def plan_tasks(specs: Sequence[RuleSpec], plan: Plan, *, quick: bool, catalog: bool,
               dtype: torch.dtype, device: Any, only: Optional[str] = None,
               explicit: bool = False) -> list[Task]:
    """The tasks for ``specs``. A user rule (family "user") gets every check that applies to a
    rule of unknown family; ``catalog`` adds the library-wide checks (torch.optim, findings,
    other front ends). ``explicit``: the problems were chosen by the user, and every check
    runs on each of them."""
    problems: dict[tuple[str, int], Problem] = {}

    def problem(name: str, seed: int = 0) -> Problem:
        if (name, seed) not in problems:
            problems[(name, seed)] = make_problem(name, seed=seed, dtype=dtype, device=device)
        return problems[(name, seed)]

    tasks: list[Task] = []
    for spec in specs:
        user = spec.family == "user"
        for name in plan.problems:
            for seed in plan.seeds:
                tasks.append(_case_task(spec, name, seed, plan, problem, dtype))
        for name in plan.batch_problems or plan.problems:
            if name in plan.problems:
                tasks.append(Task(f"{spec.name} / {name} / one step, vmapped seeds", (
                    lambda spec=spec, name=name: C.check_one_step_vmapped(
                        spec, problem(name), plan.states, plan.batch_seeds)),
                    C.ONE_STEP, spec.name, name))
        unrolled = user or spec.name in (QUICK_UNROLLED if quick else FULL_UNROLLED)
        if unrolled:
            for name in plan.problems:
                if not (explicit or differentiated_through(spec, problem(name))):
                    continue
                for steps in plan.unrolled_steps:
                    tasks.append(Task(f"{spec.name} / {name} / K={steps}", (
                        lambda spec=spec, name=name, steps=steps: C.check_unrolled(
                            C.make_case(spec, problem(name), 2), steps)),
                        C.UNROLLED, spec.name, name))
        hyper = user or (spec.name in QUICK_HYPER if quick else full_hyper(spec))
        if hyper:
            for name in plan.hyper_problems:
                if not (explicit or differentiated_through(spec, problem(name))):
                    continue
                tasks.append(Task(f"{spec.name} / {name} / hyper K={plan.hyper_steps}", (
                    lambda spec=spec, name=name: C.check_hyper(
                        C.make_case(spec, problem(name), 2), plan.hyper_steps)),
                    C.HYPER_BETA, spec.name, name))
        vmap_names = plan.problems[:1] if quick else plan.problems[:2]
        if user or (not quick) or spec.name in QUICK_UNROLLED:
            for name in vmap_names:
                tasks.append(Task(f"{spec.name} / {name} / vmap", (
                    lambda spec=spec, name=name: C.check_vmap(
                        spec, problem(name), plan.equivalence_steps, plan.vmap_seeds)),
                    C.VMAP, spec.name, name))
        if not user and spec.base is not None and not spec.higher_order and not spec.transition:
            for name in plan.problems:
                tasks.append(Task(f"{spec.name} / {name} / beta=0", (
                    lambda spec=spec, name=name: C.check_beta_zero(
                        spec, problem(name), plan.equivalence_steps)),
                    C.BETA_ZERO, spec.name, name))
    if catalog:
        # torch.optim: once per base family (its global additive spec), on every problem.
        families = {}
        for spec in all_builtin_specs():
            families.setdefault(spec.family, spec)
        for family, spec in families.items():
            if spec.torch_optimizer is None or (only and not fnmatch.fnmatch(spec.name, only)):
                continue
            for name in plan.problems:
                tasks.append(Task(f"{family} / {name} / torch.optim", (
                    lambda spec=spec, name=name: C.check_torch_optim(
                        spec, problem(name), plan.equivalence_steps)),
                    C.TORCH_OPTIM, family, name))
        finding_names = set(FINDING_SPECS[quick])
        for spec in specs:
            if spec.name not in finding_names:
                continue
            for name in (plan.problems[:1] if quick else plan.problems):
                tasks.append(Task(f"{spec.name} / {name} / greedy vs exact", (
                    lambda spec=spec, name=name: C.greedy_vs_exact(
                        spec, problem(name), plan.finding_steps, plan.finding_seeds)),
                    "finding", spec.name, name))
        from verification import frontends
        for task in frontends.front_end_tasks(plan, problem, quick=quick):
            if not only or fnmatch.fnmatch(task.rule, only):
                tasks.append(task)
    return tasks


def _case_task(spec: RuleSpec, name: str, seed: int, plan: Plan,
               problem: Callable[[str, int], Problem], dtype: torch.dtype) -> Task:
    """Checks 1, 2 and the analytic hyper-hypergradient on one trajectory."""
    def run() -> list:
        case = C.make_case(spec, problem(name, seed), plan.steps, seed)
        out: list[Outcome] = []
        for t in plan.states:
            out += _each(lambda: C.check_one_step(case, t), C.ONE_STEP, case, f"seed {seed}, t={t}")
        for t in plan.second_order_states:
            out += _each(lambda: C.check_second_order(case, t), C.SECOND_ORDER, case,
                         f"seed {seed}, t={t}")
        if seed == plan.seeds[0]:
            out += _each(lambda: C.check_oracle(case), C.ORACLE, case,
                         f"seed {seed}, t=1..{plan.steps}")
        if spec.higher_order:
            for t in plan.states:
                if t >= 3:
                    out += _each(lambda: C.check_hyper_analytic(case, t), C.HYPER_ANALYTIC, case,
                                 f"seed {seed}, t={t}")
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
        specs = quick_specs() if quick else all_builtin_specs()
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
