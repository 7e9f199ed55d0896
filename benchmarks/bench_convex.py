"""Deterministic (full-batch) benchmark against the strongest practical baseline (issue 12).

    python benchmarks/bench_convex.py --out docs/figures  # the run of docs/convex-benchmark.md
    python benchmarks/bench_convex.py --quick             # a smoke run (about a minute)
    python benchmarks/bench_convex.py --problems quad1e4,tanh --instances 4 --out /tmp/part

Counts gradient evaluations until the relative suboptimality (f(θ) - f*)/(f(θ_0) - f*) of an
evaluated point first drops to 1e-6, for

    gd          hdfunc.sgd(α), α the best of a log grid
    sgd_hd      hdfunc.sgd_hd(α_0, β) additive, (α_0, β) the best of a grid
    sgd_hd_mul  hdfunc.sgd_hd(α_0, β', mode="multiplicative"), (α_0, β') the best of a grid
    hb          hdfunc.rules.sgdm(α, μ) (heavy ball), (α, μ) the best of a grid
    hb_hd       hdfunc.rules.sgdm_hd_lr_momentum: heavy ball with α and μ adapted (multiplicative)
    adam        hdfunc.adam(α), α the best of a log grid
    adam_hd     hdfunc.adam_hd(α_0, β) additive, (α_0, β) the best of a grid
    lbfgs       torch.optim.LBFGS(history_size=10, line_search_fn="strong_wolfe"): every closure
                call, line-search ones included, is one evaluation

on least squares, quadratics of condition number 1e2/1e4/1e6, L2-regularised softmax regression
on MNIST images, and a realisable two-layer tanh regression (non-convex). One evaluation = one
(f, ∇f) pair; the functional rules take one per step, and f(θ_t) is read from the evaluation
that gives ∇f(θ_t), so "n evaluations" means the n-th evaluated point was the first at 1e-6.

Protocol: every method's grid is run on the tuning instances of a problem (all grid points
batched with ``torch.func.vmap``; default: all instances, logreg: the first 2) and the point with
the smallest median number of evaluations there (ties: the smaller worst case, then the smaller
median final suboptimality) is reported over all ``--instances`` instances (median and range;
when the tuning instances are all of them, their runs are reused, i.e. oracle tuning, which
favours the tuned baselines). Step-size grids are relative to L̂, a power-iteration estimate of
the largest Hessian eigenvalue at θ_0; L-BFGS is not tuned.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.func import grad, grad_and_value, jvp, vmap

import hdfunc
from hdfunc.rules import sgdm, sgdm_hd_lr_momentum
from hdfunc.tree import tree_stack

DTYPE = torch.float64
TARGET = 1e-6
DIVERGED = 1e6  # a row whose relative suboptimality exceeds this is treated as diverged
LBFGS_HISTORY = 10
MNIST_DIR = "/work/shared/data/mnist"

METHODS = ("gd", "sgd_hd", "sgd_hd_mul", "hb", "hb_hd", "adam", "adam_hd", "lbfgs")
METHOD_LABELS = {
    "gd": "GD (tuned α)", "sgd_hd": "SGD-HD add.", "sgd_hd_mul": "SGD-HD mult.",
    "hb": "heavy ball (tuned α, μ)", "hb_hd": "HB-HD (α, μ adapted)", "adam": "Adam (tuned α)",
    "adam_hd": "Adam-HD add.", "lbfgs": f"L-BFGS (m={LBFGS_HISTORY}, strong Wolfe)",
}
PROBLEMS = ("lstsq", "quad1e2", "quad1e4", "quad1e6", "logreg", "tanh")


# ----------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """A family of instances of one smooth problem: ``loss(theta, data)`` for a flat float64
    ``theta`` and one instance's ``data``; ``data`` holds the instances stacked on dim 0."""

    name: str
    title: str
    loss: Callable[[torch.Tensor, dict], torch.Tensor]
    data: dict
    theta0: torch.Tensor  # (K, d)
    fstar: torch.Tensor  # (K,)
    note: str = ""
    fstar_note: str = ""
    tune_default: int | None = None  # instances the grids are tuned on (None: all)
    f0: torch.Tensor = field(init=False)
    lhat: torch.Tensor = field(init=False)  # (K,) power-iteration estimate of λ_max(∇²f(θ_0))
    g0: torch.Tensor = field(init=False)  # (K,) ‖∇f(θ_0)‖

    def __post_init__(self) -> None:
        K = self.theta0.shape[0]
        self.f0 = torch.stack([self.loss(self.theta0[k], self.instance(k)).detach()
                               for k in range(K)])
        self.g0 = torch.stack([grad(self.loss)(self.theta0[k], self.instance(k)).norm()
                               for k in range(K)])
        self.lhat = torch.stack([power_iteration(self.loss, self.theta0[k], self.instance(k))
                                 for k in range(K)])

    @property
    def instances(self) -> int:
        return self.theta0.shape[0]

    @property
    def dim(self) -> int:
        return self.theta0.shape[1]

    def instance(self, k: int) -> dict:
        return {key: value[k] for key, value in self.data.items()}

    def rows(self, index: list[int]) -> dict:
        idx = torch.as_tensor(index)
        return {key: value[idx] for key, value in self.data.items()}

    def rel(self, f: torch.Tensor, index: Any) -> torch.Tensor:
        """Relative suboptimality of values ``f`` of the instances ``index``."""
        fstar, f0 = self.fstar[index], self.f0[index]
        return (f - fstar) / (f0 - fstar)


def power_iteration(loss: Callable, theta: torch.Tensor, data: dict,
                    iters: int = 30) -> torch.Tensor:
    """λ_max of ∇²f(θ) by power iteration on Hessian-vector products (forward over reverse)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    v = v / v.norm()
    g = grad(loss)
    lam = torch.zeros((), dtype=theta.dtype)
    for _ in range(iters):
        _, hv = jvp(lambda t: g(t, data), (theta,), (v,))
        lam = torch.dot(v, hv)
        v = hv / hv.norm()
    return lam.abs()


def quadratic_loss(theta: torch.Tensor, data: dict) -> torch.Tensor:
    """f(θ) = ½ θᵀHθ - bᵀθ."""
    return 0.5 * theta @ (data["H"] @ theta) - data["b"] @ theta


def quadratic_fstar(H: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The closed-form minimum of ½ θᵀHθ - bᵀθ (H positive definite): -½ bᵀH⁻¹b."""
    return -0.5 * b @ torch.linalg.solve(H, b)


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def make_quadratic(instances: int, seed: int, dim: int, cond: float) -> Problem:
    """H = Q diag(λ) Qᵀ, λ log-spaced over [1/cond, 1], Q random orthogonal; b = Hθ*,
    θ* ~ N(0, I); θ_0 = 0. f* in closed form."""
    gen = torch.Generator().manual_seed(seed)
    eig = torch.logspace(0, -math.log10(cond), dim, dtype=DTYPE)
    Hs, bs = [], []
    for _ in range(instances):
        q = random_orthogonal(dim, gen)
        H = (q * eig) @ q.T
        H = 0.5 * (H + H.T)
        theta_star = torch.randn(dim, generator=gen, dtype=DTYPE)
        Hs.append(H)
        bs.append(H @ theta_star)
    H, b = torch.stack(Hs), torch.stack(bs)
    fstar = torch.stack([quadratic_fstar(H[k], b[k]) for k in range(instances)])
    exp = int(round(math.log10(cond)))
    return Problem(f"quad1e{exp}", f"quadratic, κ = 1e{exp} (d = {dim})", quadratic_loss,
                   {"H": H, "b": b}, torch.zeros(instances, dim, dtype=DTYPE), fstar,
                   note=f"d = {dim}, eigenvalues log-spaced over [1e-{exp}, 1], random rotation,"
                        " θ* ~ N(0, I), θ_0 = 0",
                   fstar_note="closed form -½ bᵀH⁻¹b")


def lstsq_loss(theta: torch.Tensor, data: dict) -> torch.Tensor:
    r = data["A"] @ theta - data["b"]
    return 0.5 * (r * r).mean()


def make_lstsq(instances: int, seed: int, rows: int, dim: int) -> Problem:
    """f(θ) = ‖Aθ - b‖²/(2m), A Gaussian m × d (Marchenko-Pastur spectrum),
    b = Aθ_true + 0.1 ε."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(instances, rows, dim, generator=gen, dtype=DTYPE)
    truth = torch.randn(instances, dim, generator=gen, dtype=DTYPE)
    b = (A @ truth[..., None])[..., 0] + 0.1 * torch.randn(instances, rows, generator=gen,
                                                         dtype=DTYPE)
    mp_cond = ((1 + (dim / rows) ** 0.5) / (1 - (dim / rows) ** 0.5)) ** 2  # Marchenko-Pastur
    fstar = []
    for k in range(instances):
        solution = torch.linalg.lstsq(A[k], b[k][:, None]).solution[:, 0]
        fstar.append(lstsq_loss(solution, {"A": A[k], "b": b[k]}))
    return Problem("lstsq", f"least squares (m = {rows}, d = {dim})", lstsq_loss,
                   {"A": A, "b": b}, torch.zeros(instances, dim, dtype=DTYPE), torch.stack(fstar),
                   note=f"A Gaussian {rows} × {dim} (κ(AᵀA) ≈ {mp_cond:.0f}),"
                        " b = Aθ_true + 0.1·N(0, 1) (residual > 0), θ_0 = 0",
                   fstar_note="closed form (torch.linalg.lstsq)")


def logreg_loss(theta: torch.Tensor, data: dict) -> torch.Tensor:
    X, Y = data["X"], data["Y"]  # (n, p+1) with a bias column; one-hot (n, C)
    W = theta.reshape(X.shape[-1], Y.shape[-1])
    Z = X @ W
    nll = (torch.logsumexp(Z, dim=-1) - (Z * Y).sum(-1)).mean()
    return nll + 0.5 * data["l2"] * (theta * theta).sum()


def minimise_long(loss: Callable, theta0: torch.Tensor, data: dict, iters: int = 2000,
                  newton: int = 5) -> tuple[torch.Tensor, float]:
    """A high-precision minimum: L-BFGS (history 50, strong Wolfe, up to ``iters`` iterations)
    then ``newton`` Newton steps with the exact Hessian (torch.func.hessian), keeping the best.
    Returns (f*, ‖∇f‖ at the minimiser)."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=iters, max_eval=int(iters * 1.25),
                            tolerance_grad=1e-14, tolerance_change=0, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = loss(theta, data)
        f.backward()
        return f

    opt.step(closure)
    best = theta.detach().clone()
    fbest = loss(best, data)
    for _ in range(newton):
        g = grad(loss)(best, data)
        H = torch.func.hessian(loss)(best, data)
        candidate = best - torch.linalg.solve(H, g)
        fc = loss(candidate, data)
        if not fc <= fbest:
            break
        best, fbest = candidate, fc
    return fbest.detach(), float(grad(loss)(best, data).norm())


def make_logreg(instances: int, seed: int, per_instance: int, l2: float,
                data_dir: str = MNIST_DIR) -> Problem | None:
    """Softmax regression (10 classes, bias, L2 ``l2`` on all weights) on disjoint random subsets
    of the MNIST test images, each image centre-cropped to 20 × 20 and 2 × 2 average-pooled to
    10 × 10 (100 features + bias: d = 1010). θ_0 = 0. None (with a message) if the data is
    absent."""
    if not Path(data_dir).is_dir():
        print(f"[logreg] skipped: no MNIST folder at {data_dir}", flush=True)
        return None
    from hdfunc.studies.data import load_mnist

    try:
        dataset = load_mnist(data_dir, split="test")
    except Exception as error:  # a missing or unreadable file: skip the problem, say why
        print(f"[logreg] skipped: {error}", flush=True)
        return None
    images = dataset.inputs.to(DTYPE).reshape(-1, 1, 28, 28)[:, :, 4:24, 4:24]
    feats = torch.nn.functional.avg_pool2d(images, 2).reshape(images.shape[0], -1)
    labels = dataset.labels
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(feats.shape[0], generator=gen)
    if instances * per_instance > feats.shape[0]:
        raise ValueError(f"logreg: {instances} × {per_instance} images > {feats.shape[0]}")
    Xs, Ys = [], []
    for k in range(instances):
        idx = order[k * per_instance:(k + 1) * per_instance]
        Xs.append(torch.cat([feats[idx], torch.ones(per_instance, 1, dtype=DTYPE)], 1))
        Ys.append(torch.nn.functional.one_hot(labels[idx], 10).to(DTYPE))
    data = {"X": torch.stack(Xs), "Y": torch.stack(Ys),
            "l2": torch.full((instances,), l2, dtype=DTYPE)}
    dim = Xs[0].shape[1] * 10
    theta0 = torch.zeros(instances, dim, dtype=DTYPE)
    fstar, gnorms = [], []
    for k in range(instances):
        f, g = minimise_long(logreg_loss, theta0[k], {key: v[k] for key, v in data.items()})
        fstar.append(f)
        gnorms.append(g)
    return Problem("logreg", f"MNIST softmax regression (n = {per_instance}, d = {dim})",
                   logreg_loss, data, theta0, torch.stack(fstar),
                   note=f"{instances} disjoint random subsets of {per_instance} MNIST test images"
                        f" ({dataset.description.split(' from ')[0]}), 20 × 20 centre crop,"
                        f" 2 × 2 average pool → 100 features + bias, 10 classes, L2 {l2:g},"
                        " θ_0 = 0",
                   fstar_note="L-BFGS (m = 50, ≤ 2000 iterations) + Newton polish, float64;"
                              f" max ‖∇f(θ*)‖ = {max(gnorms):.1e}",
                   tune_default=2)


def tanh_loss(theta: torch.Tensor, data: dict) -> torch.Tensor:
    X, y = data["X"], data["y"]
    p = X.shape[-1]
    h = theta.shape[-1] // (p + 1)
    W1, w2 = theta[:p * h].reshape(p, h), theta[p * h:]
    r = torch.tanh(X @ W1) @ w2 - y
    return 0.5 * (r * r).mean()


def make_tanh(instances: int, seed: int, samples: int, inputs: int, hidden: int) -> Problem:
    """Realisable teacher-student regression with a two-layer tanh network (no biases):
    y = tanh(X W1*) w2*, the student of the same width from a random θ_0. f* = 0 (the
    teacher); a run stuck at another critical point counts as not reached."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(instances, samples, inputs, generator=gen, dtype=DTYPE)
    W1 = torch.randn(instances, inputs, hidden, generator=gen, dtype=DTYPE) / inputs ** 0.5
    w2 = torch.randn(instances, hidden, generator=gen, dtype=DTYPE) / hidden ** 0.5
    y = (torch.tanh(X @ W1) @ w2[..., None])[..., 0]
    theta0 = torch.cat([
        (torch.randn(instances, inputs, hidden, generator=gen, dtype=DTYPE)
         / inputs ** 0.5).reshape(instances, -1),
        torch.randn(instances, hidden, generator=gen, dtype=DTYPE) / hidden ** 0.5], 1)
    return Problem("tanh", f"2-layer tanh regression (non-convex, d = {theta0.shape[1]})",
                   tanh_loss, {"X": X, "y": y}, theta0, torch.zeros(instances, dtype=DTYPE),
                   note=f"teacher-student: n = {samples}, {inputs} inputs, {hidden} tanh units, no"
                        " biases, student of the teacher's width from a random θ_0",
                   fstar_note="0 (realisable: the teacher attains it)")


SIZES = {  # per problem: full run, --quick
    "lstsq": ({"rows": 200, "dim": 50}, {"rows": 60, "dim": 20}),
    "quad": ({"dim": 100}, {"dim": 20}),
    "logreg": ({"per_instance": 300, "l2": 1e-4}, {"per_instance": 100, "l2": 1e-2}),
    "tanh": ({"samples": 200, "inputs": 8, "hidden": 4}, {"samples": 40, "inputs": 4,
                                                         "hidden": 3}),
}


def make_problem(name: str, instances: int, seed: int, quick: bool,
                 data_dir: str = MNIST_DIR) -> Problem | None:
    pick = 1 if quick else 0
    if name == "lstsq":
        return make_lstsq(instances, seed, **SIZES["lstsq"][pick])
    if name.startswith("quad1e"):
        return make_quadratic(instances, seed, cond=10.0 ** int(name[6:]), **SIZES["quad"][pick])
    if name == "logreg":
        return make_logreg(instances, seed, data_dir=data_dir, **SIZES["logreg"][pick])
    if name == "tanh":
        return make_tanh(instances, seed, **SIZES["tanh"][pick])
    raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")


# ----------------------------------------------------------------------------- methods


@dataclass
class Config:
    """One grid point: ``make(problem, k)`` builds the rule for instance k (its hyperparameters
    may depend on the instance's L̂ and ‖∇f(θ_0)‖); ``group``: the configs of one group share
    the static structure of their rule (the rest is in the state), so one vmap runs them."""

    label: str
    make: Callable[[Problem, int], Any]
    group: str
    params: dict


def _log_grid(low: int, high: int, per_decade: int) -> list[float]:
    return [10.0 ** (j / per_decade) for j in range(low, high + 1)]


def method_grid(method: str, quick: bool) -> list[Config]:
    """The grid of one method (module docstring; docs/convex-benchmark.md states them)."""
    if method == "gd":
        return [Config(f"α={c:.3g}/L̂", lambda P, k, c=c: hdfunc.sgd(c / float(P.lhat[k])), "gd",
                       {"lr_times_L": c}) for c in _log_grid(-8, 6, 4)]
    if method == "sgd_hd":
        out = []
        for a in (0.01, 0.1, 1.0):
            for bt in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
                # β = β̃ α_0/‖g_0‖²: β̃ is the relative change of α in the first steps
                out.append(Config(
                    f"α0={a:g}/L̂, β̃={bt:g}",
                    lambda P, k, a=a, bt=bt: hdfunc.sgd_hd(
                        a / float(P.lhat[k]), bt * a / float(P.lhat[k]) / float(P.g0[k]) ** 2),
                    "sgd_hd", {"lr0_times_L": a, "beta_tilde": bt}))
        return out
    if method == "sgd_hd_mul":
        return [Config(f"α0={a:g}/L̂, β'={bp:g}",
                       lambda P, k, a=a, bp=bp: hdfunc.sgd_hd(a / float(P.lhat[k]), bp,
                                                              mode="multiplicative"),
                       "sgd_hd_mul", {"lr0_times_L": a, "beta_prime": bp})
                for a in (0.01, 0.1, 1.0) for bp in (0.002, 0.02, 0.2, 1.0)]
    if method == "hb":
        return [Config(f"α={c:.3g}/L̂, μ={mu:g}",
                       lambda P, k, c=c, mu=mu: sgdm(c / float(P.lhat[k]), momentum=mu),
                       f"hb{mu}", {"lr_times_L": c, "momentum": mu})
                for mu in (0.5, 0.9, 0.99, 0.999) for c in _log_grid(-8, 4, 4)]
    if method == "hb_hd":
        return [Config(f"α0={a:g}/L̂, μ0={mu:g}, β'={bp:g}",
                       lambda P, k, a=a, mu=mu, bp=bp: sgdm_hd_lr_momentum(
                           a / float(P.lhat[k]), bp, bp, momentum=mu, mode="multiplicative"),
                       "hb_hd", {"lr0_times_L": a, "momentum0": mu, "beta_prime": bp})
                for a in (0.1, 1.0) for mu in (0.5, 0.9) for bp in (0.002, 0.02, 0.2)]
    if method == "adam":
        return [Config(f"α={c:.3g}", lambda P, k, c=c: hdfunc.adam(c), "adam", {"lr": c})
                for c in _log_grid(-10, 2, 2)]
    if method == "adam_hd":
        out = []
        for a in (1e-3, 1e-2, 1e-1, 1.0):
            for bt in (1e-3, 1e-2, 1e-1, 1.0):
                # β = β̃ α_0/(‖g_0‖ √d): Adam's first direction is sign(g_0), of norm √d
                out.append(Config(
                    f"α0={a:g}, β̃={bt:g}",
                    lambda P, k, a=a, bt=bt: hdfunc.adam_hd(
                        a, bt * a / (float(P.g0[k]) * P.dim ** 0.5)),
                    "adam_hd", {"lr0": a, "beta_tilde": bt}))
        return out
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------- running


def evals_to_target(rel: torch.Tensor, target: float = TARGET) -> int | None:
    """1 + the index of the first evaluation with rel <= target (None: never)."""
    hit = (rel <= target).nonzero()
    return int(hit[0, 0]) + 1 if hit.numel() else None


def run_rows(problem: Problem, rows: list[tuple[Any, int]], budget: int,
             check_every: int = 50) -> torch.Tensor:
    """Runs rows (rule, instance) batched by vmap for up to ``budget`` evaluations; all rules
    must share one static structure (``rows[0]``'s rule steps every row from its own state).
    Returns the relative suboptimality of every evaluated point, (evaluations, rows); rows stop
    together once each has reached the target or diverged (the tail is then NaN)."""
    rule = rows[0][0]
    index = [k for _, k in rows]
    data = problem.rows(index)
    theta = problem.theta0[torch.as_tensor(index)].clone()
    state = tree_stack([r.init(problem.theta0[k]) for r, k in rows])
    value_and_grad = grad_and_value(problem.loss)

    def step(theta, state, data):
        g, f = value_and_grad(theta, data)
        updates, state = rule.update(g, state, theta)
        return hdfunc.apply_updates(theta, updates), state, f

    batched = vmap(step)
    fstar, f0 = problem.fstar[index], problem.f0[index]
    out = torch.full((budget, len(rows)), float("nan"), dtype=DTYPE)
    for t in range(budget):
        theta, state, f = batched(theta, state, data)
        out[t] = (f - fstar) / (f0 - fstar)
        if (t + 1) % check_every == 0:
            seen = out[:t + 1]
            done = (seen <= TARGET).any(0) | ~torch.isfinite(out[t]) | (out[t] > DIVERGED)
            if bool(done.all()):
                break
    return out


def run_configs(problem: Problem, configs: list[Config], instances: list[int],
                budget: int) -> torch.Tensor:
    """Every config on every instance of ``instances``; (evaluations, configs, instances)."""
    out = torch.full((budget, len(configs), len(instances)), float("nan"), dtype=DTYPE)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.group, []).append(i)
    for members in groups.values():
        rows = [(configs[i].make(problem, k), k) for i in members for k in instances]
        rel = run_rows(problem, rows, budget)
        out[:, members, :] = rel.reshape(budget, len(members), len(instances))
    return out


class _Reached(Exception):
    pass


def run_lbfgs(problem: Problem, k: int, budget: int, history: int = LBFGS_HISTORY,
              loss: Callable | None = None) -> torch.Tensor:
    """torch.optim.LBFGS (strong-Wolfe line search) on instance k; every closure call (the
    line search's included) is one evaluation. Stops at the target or after ``budget``
    evaluations. Returns the relative suboptimality of each evaluated point (evaluations,)."""
    loss = loss or problem.loss
    data = problem.instance(k)
    theta = problem.theta0[k].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=budget, max_eval=budget, tolerance_grad=0,
                            tolerance_change=0, history_size=history,
                            line_search_fn="strong_wolfe")
    rels: list[float] = []

    def closure():
        if len(rels) >= budget:
            raise _Reached  # the budget is spent (LBFGS's own max_eval is per step call)
        opt.zero_grad()
        f = loss(theta, data)
        f.backward()
        rels.append(float(problem.rel(f.detach(), k)))
        if rels[-1] <= TARGET:
            raise _Reached
        return f

    while len(rels) < budget:
        before = len(rels)
        try:
            opt.step(closure)
        except _Reached:
            break
        if len(rels) <= before + 1:  # no progress possible (converged to rounding, or stuck)
            break
    return torch.tensor(rels, dtype=DTYPE)


# ----------------------------------------------------------------------------- study


def summarize(values: list[int | None]) -> dict:
    reached = [v for v in values if v is not None]
    out = {"evals": values, "reached": len(reached), "n": len(values)}
    if len(reached) == len(values) and values:
        srt = sorted(reached)
        out.update(median=float(torch.tensor(srt, dtype=torch.float64).median()),
                   low=srt[0], high=srt[-1])
    elif reached and len(reached) * 2 > len(values):
        # the median exists (a majority reached): not-reached ones count as +∞
        srt = sorted(reached) + [math.inf] * (len(values) - len(reached))
        out.update(median=srt[(len(srt) - 1) // 2], low=srt[0], high=None)
    return out


def best_so_far(rel: torch.Tensor) -> torch.Tensor:
    """Running minimum over the evaluations (dim 0), NaN (stopped runs) held at the last value."""
    filled = rel.clone()
    filled[~torch.isfinite(filled)] = math.inf
    return torch.cummin(filled, dim=0).values


def study_problem(problem: Problem, methods: list[str], budget: int, tune: int | None,
                  quick: bool, log: Callable[[str], None]) -> tuple[dict, dict]:
    """All ``methods`` on one problem: each grid on the tuning instances, its best point on all
    instances (the tuning runs are reused when they are all the instances)."""
    K = problem.instances
    tune = tune or problem.tune_default or K
    tune_idx = list(range(min(tune, K)))
    result: dict = {"problem": problem.name, "title": problem.title, "note": problem.note,
                    "fstar_note": problem.fstar_note, "dim": problem.dim, "instances": K,
                    "tune_instances": tune_idx, "lhat": problem.lhat.tolist(), "methods": {}}
    curves: dict[str, torch.Tensor] = {}
    for method in methods:
        start = time.perf_counter()
        if method == "lbfgs":
            runs = [run_lbfgs(problem, k, budget) for k in range(K)]
            evals = [evals_to_target(r) for r in runs]
            curve = torch.full((budget, K), math.nan, dtype=DTYPE)
            for k, r in enumerate(runs):
                curve[:len(r), k] = r
            entry = {"config": f"history {LBFGS_HISTORY}, strong Wolfe", "grid": [],
                     **summarize(evals)}
        else:
            grid = method_grid(method, quick)
            tuned = run_configs(problem, grid, tune_idx, budget)  # (T, G, tune)
            grid_rows = []
            for i, c in enumerate(grid):
                ev = [evals_to_target(tuned[:, i, j]) for j in range(len(tune_idx))]
                final = best_so_far(tuned[:, i, :])[-1]
                grid_rows.append({"label": c.label, "params": c.params, "evals": ev,
                                  "final_rel": [float(x) for x in final]})

            def key(row: dict) -> tuple:
                ev = sorted(math.inf if e is None else e for e in row["evals"])
                fin = sorted(row["final_rel"])
                return (ev[(len(ev) - 1) // 2], ev[-1], fin[(len(fin) - 1) // 2])

            best = min(range(len(grid)), key=lambda i: key(grid_rows[i]))
            if len(tune_idx) == K:
                rel = tuned[:, best, :]
            else:
                rel = run_configs(problem, [grid[best]], list(range(K)), budget)[:, 0, :]
            evals = [evals_to_target(rel[:, k]) for k in range(K)]
            curve = rel
            entry = {"config": grid[best].label, "params": grid[best].params, "grid": grid_rows,
                     "at_grid_edge": grid_edges(grid, best), **summarize(evals)}
        curves[method] = best_so_far(curve)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        result["methods"][method] = entry
        edge = (f"; at the grid's edge in {', '.join(entry['at_grid_edge'])}"
                if entry.get("at_grid_edge") else "")
        log(f"[{problem.name}] {method:<11} {format_cell(entry):<22} "
            f"({entry['seconds']:.1f} s; {entry['config']}{edge})")
    return result, curves


def grid_edges(grid: list[Config], best: int) -> list[str]:
    """The hyperparameters whose chosen value is the smallest or largest of the grid's."""
    edges = []
    for key, value in grid[best].params.items():
        values = {c.params[key] for c in grid}
        if len(values) > 1 and value in (min(values), max(values)):
            edges.append(key)
    return edges


def format_cell(entry: dict) -> str:
    if "median" not in entry:
        return f"— ({entry['reached']}/{entry['n']})" if entry["reached"] else "—"
    med = entry["median"]
    med = "∞" if med == math.inf else f"{med:.0f}"
    high = "n.r." if entry["high"] is None else str(entry["high"])
    text = f"{med} ({entry['low']}–{high})"
    if entry["reached"] < entry["n"]:
        text += f" [{entry['reached']}/{entry['n']}]"
    return text


def markdown_table(results: list[dict], methods: list[str], budget: int) -> str:
    head = "| problem | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |"
    sep = "|---|" + "---|" * len(methods)
    lines = [head, sep]
    for res in results:
        cells = []
        medians = {m: res["methods"][m].get("median", math.inf) for m in methods}
        best = min(medians.values())
        for m in methods:
            cell = format_cell(res["methods"][m])
            if best < math.inf and medians[m] == best:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {res['title']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Median gradient evaluations to relative suboptimality ≤ {TARGET:g} over the "
                 f"instances (range min–max); — : not reached within {budget} evaluations; "
                 "[r/n]: only r of n instances reached it (n.r.: not reached; the median "
                 "counts those as ∞). "
                 "Bold: the best median per problem.")
    return "\n".join(lines)


def sensitivity_table(results: list[dict], methods: list[str]) -> str:
    """Per method and problem: grid points reaching the target on every tuning instance / grid
    size, and the median evaluations of the best and of the worst such point."""
    tuned = [m for m in methods if m != "lbfgs"]
    lines = ["| problem | " + " | ".join(METHOD_LABELS[m] for m in tuned) + " |",
             "|---|" + "---|" * len(tuned)]
    for res in results:
        cells = []
        for m in tuned:
            grid = res["methods"][m]["grid"]
            ok = []
            for row in grid:
                if all(e is not None for e in row["evals"]):
                    ev = sorted(row["evals"])
                    ok.append(ev[(len(ev) - 1) // 2])
            if ok:
                cells.append(f"{len(ok)}/{len(grid)}: {min(ok)}–{max(ok)}")
            else:
                cells.append(f"0/{len(grid)}")
        lines.append(f"| {res['title']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Each cell: grid points that reached the target on all tuning instances / grid "
                 "size: the median evaluations of the best–worst of those points.")
    return "\n".join(lines)


COLORS = {"gd": "#1f77b4", "sgd_hd": "#ff7f0e", "sgd_hd_mul": "#d62728", "hb": "#2ca02c",
          "hb_hd": "#9467bd", "adam": "#8c564b", "adam_hd": "#e377c2", "lbfgs": "#000000"}


def _panel_grid(n: int, panel_height: float):
    """pyplot (Agg), a figure and its axes: one panel per problem, up to 3 to a row (the unused
    panels of the last row hidden)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, panel_height * rows), dpi=110,
                             squeeze=False)
    for ax in list(axes.flat)[n:]:  # the last row's unused panels
        ax.axis("off")
    return plt, fig, axes


def plot_convergence(results: list[dict], curves: dict, methods: list[str], budget: int,
                     path: Path) -> None:
    plt, fig, axes = _panel_grid(len(results), panel_height=4.6)
    for ax, res in zip(axes.flat, results):
        for m in methods:
            c = curves[res["problem"]][m].clamp(min=1e-12)  # (budget, K) best so far
            finite = torch.isfinite(c).all(1)
            last = int(finite.nonzero().max()) + 1 if finite.any() else 0
            done = (c <= TARGET).all(1).nonzero()
            if done.numel():
                last = min(last, int(done[0, 0]) + 1)
            if last == 0:
                continue
            c = c[:last]
            x = torch.arange(1, last + 1)
            q = torch.quantile(c, torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE), dim=1)
            ax.plot(x, q[1], color=COLORS[m], lw=1.8, label=METHOD_LABELS[m])
            ax.fill_between(x, q[0], q[2], color=COLORS[m], alpha=0.15, lw=0)
        ax.axhline(TARGET, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(1, budget)
        ax.set_ylim(1e-8, 10)
        ax.set_title(res["title"], fontsize=11)
        ax.set_xlabel("gradient evaluations")
        ax.set_ylabel("best relative suboptimality")
        ax.grid(alpha=0.3, which="both", lw=0.5)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=11,
               frameon=False)
    fig.suptitle(f"Deterministic convergence: median over instances (band: min–max), "
                 f"target {TARGET:g} dashed", fontsize=12)
    fig.tight_layout(rect=(0, 0.07 if len(labels) > 4 else 0.04, 1, 0.96))
    fig.savefig(path)
    plt.close(fig)


def plot_sensitivity(results: list[dict], path: Path) -> None:
    """Median evaluations to the target on the tuning instances against the (initial) step
    size in units of 1/L̂: GD, SGD-HD additive (best β̃ per α_0) and multiplicative (best β'),
    heavy ball (best μ per α), HB-HD (best μ_0 and β' per α_0); not reached: 2 × budget."""
    plt, fig, axes = _panel_grid(len(results), panel_height=4.4)
    series = [("gd", "lr_times_L", None, "GD"),
              ("sgd_hd", "lr0_times_L", "beta_tilde", "SGD-HD add. (best β̃)"),
              ("sgd_hd_mul", "lr0_times_L", "beta_prime", "SGD-HD mult. (best β')"),
              ("hb", "lr_times_L", "momentum", "heavy ball (best μ)"),
              ("hb_hd", "lr0_times_L", "momentum0", "HB-HD (best μ0, β')")]
    for ax, res in zip(axes.flat, results):
        budget = res["budget"]
        for m, xkey, other, label in series:
            if m not in res["methods"]:
                continue
            best: dict[float, float] = {}
            for row in res["methods"][m]["grid"]:
                ev = sorted(budget * 2 if e is None else e for e in row["evals"])
                med = ev[(len(ev) - 1) // 2]
                x = row["params"][xkey]
                best[x] = min(best.get(x, math.inf), med)
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], "o-", color=COLORS[m], label=label)
        ax.axhline(budget, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(5, budget * 3)
        ax.set_title(res["title"], fontsize=11)
        ax.set_xlabel("(initial) step size × L̂")
        ax.set_ylabel("evaluations to 1e-6 (2× budget: not reached)")
        ax.grid(alpha=0.3, which="both", lw=0.5)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=11, frameon=False)
    fig.suptitle("Sensitivity to the (initial) step size, tuning instances (dashed: budget)",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The command line; torch's default dtype and thread count, which the run sets, are
    restored on return (so a test may call it in its own process)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        return _run(argv)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS),
                        help=f"comma-separated subset of {','.join(PROBLEMS)}")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--instances", type=int, default=None,
                        help="instances per problem (default 8; --quick: 2)")
    parser.add_argument("--tune", type=int, default=None,
                        help="instances the grids are tuned on, the first ones (default: all;"
                             " logreg: 2)")
    parser.add_argument("--budget", type=int, default=None,
                        help="evaluation budget per run (default 2000; --quick: 200)")
    parser.add_argument("--out", default=None,
                        help="folder for the outputs (default docs/figures; --quick: "
                             "bench_convex_quick in the temporary folder, so a smoke run never "
                             "overwrites the documented results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=MNIST_DIR, help="folder of the MNIST IDX files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny problems, 2 instances, 200 evaluations: a smoke run")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(DTYPE)
    instances = args.instances or (2 if args.quick else 8)
    budget = args.budget or (200 if args.quick else 2000)
    problems = [p for p in args.problems.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {','.join(METHODS)}")
    for p in problems:
        if p not in PROBLEMS:
            parser.error(f"unknown problem {p!r}; choose from {','.join(PROBLEMS)}")
    if args.out is None:
        args.out = (str(Path(tempfile.gettempdir()) / "bench_convex_quick") if args.quick
                    else "docs/figures")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results, curves = [], {}
    for name in problems:
        t0 = time.perf_counter()
        problem = make_problem(name, instances, args.seed, args.quick, args.data_dir)
        if problem is None:
            continue
        log(f"[{name}] {problem.title}: {problem.instances} instances, f* by "
            f"{problem.fstar_note} (set-up {time.perf_counter() - t0:.1f} s)")
        res, curve = study_problem(problem, methods, budget, args.tune, args.quick, log)
        res["budget"] = budget
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        curves[name] = curve
        log(f"[{name}] done in {res['seconds']:.1f} s")
    wall = time.perf_counter() - started
    meta = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None
                                                              else sys.argv[1:])),
            "date": date, "wall_seconds": round(wall, 1), "torch": torch.__version__,
            "python": platform.python_version(), "threads": args.threads,
            "cpus": os.cpu_count(), "machine": platform.machine(), "target": TARGET,
            "budget": budget, "instances": instances, "tune": args.tune, "seed": args.seed,
            "quick": args.quick, "lbfgs_history": LBFGS_HISTORY}
    table = markdown_table(results, methods, budget) if results else "(no problem ran)"
    sens = sensitivity_table(results, methods) if results else ""
    (out / "convex_results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                        indent=1, default=str))
    # Markdown text, named .txt: a .md file under docs/ would be a page of the mkdocs site
    (out / "convex_table.txt").write_text(table + "\n\n" + sens + "\n")
    if results and not args.no_plots:
        plot_convergence(results, curves, methods, budget, out / "convex_convergence.png")
        if any(m in methods for m in ("gd", "sgd_hd", "sgd_hd_mul", "hb")):
            plot_sensitivity(results, out / "convex_sensitivity.png")
    log(table)
    log("")
    log(sens)
    log(f"wall time {wall:.1f} s; outputs in {out}/convex_*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
