"""Test problems for the verification suite: smooth losses over pytrees of parameters.

Each problem is built from a seed, a dtype and a device, and carries its data in the closure of
``loss`` (a pure function of the params, so it composes with ``torch.func``). The quadratic also
exposes its Hessian ``A`` for closed-form checks.

    problem = make_problem("quadratic", seed=0, dtype=torch.float64)
    params = problem.params            # the starting point (a pytree)
    problem.loss(params)               # a 0-d tensor
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.func import grad, jvp

from hdfunc.tree import PyTree, tree_flatten, tree_map, tree_unflatten

PROBLEM_NAMES = ("quadratic", "logistic", "mlp", "rosenbrock", "tiny_quadratic", "relu_mlp")


@dataclass(frozen=True, eq=False)
class Problem:
    """A smooth loss over a pytree of parameters, with a starting point.

    ``smoothness`` estimates L (the largest Hessian eigenvalue at the start), so ``0.5 / L`` is
    a safe gradient-descent step there. ``hessian`` is the constant Hessian of a quadratic
    (over the flattened params, in ``tree_flatten`` order) and ``linear_term`` its linear
    term: loss(θ) = ½ θᵀAθ - bᵀθ.

    Attributes:
        name: the problem's name (one of :data:`PROBLEM_NAMES`, or a scaled variant).
        params: the starting point, a pytree of tensors.
        loss: the loss, a function of the params.
        smoothness: the estimate of L at the start.
        description: the problem in words, for the report.
        hessian: the quadratic's constant Hessian A, or None.
        linear_term: the quadratic's linear term b, or None.
        seed: the seed the problem was built with.
        smooth: False for a piecewise smooth loss (ReLU), whose K-step finite differences may
            cross a kink.
        exact_zeros: whether some gradient entries are exactly zero at every step (dead units).
    """

    name: str
    params: PyTree
    loss: Callable[[PyTree], torch.Tensor]
    smoothness: float
    description: str = ""
    hessian: Optional[torch.Tensor] = None
    linear_term: Optional[torch.Tensor] = None
    seed: int = 0
    smooth: bool = True  # False: piecewise smooth (ReLU): the K-step finite differences may cross a kink
    exact_zeros: bool = False  # some gradient entries are exactly zero at every step (dead units)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the params (that of their first leaf)."""
        return tree_flatten(self.params)[0][0].dtype


def flatten_params(params: PyTree) -> torch.Tensor:
    """All leaves of ``params`` concatenated into one vector (``tree_flatten`` order)."""
    return torch.cat([p.reshape(-1) for p in tree_flatten(params)[0]])


def estimate_smoothness(loss: Callable[[PyTree], torch.Tensor], params: PyTree,
                        iterations: int = 30, seed: int = 0) -> float:
    """Largest |eigenvalue| of the Hessian at ``params`` by power iteration on Hessian-vector
    products (forward-over-reverse)."""
    gen = torch.Generator().manual_seed(seed)
    leaves, spec = tree_flatten(params)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in leaves]
    estimate = 1.0
    for _ in range(iterations):
        norm = math.sqrt(sum(float((x * x).sum()) for x in v)) or 1.0
        v = [x / norm for x in v]
        hv = jvp(grad(loss), (params,), (tree_unflatten(v, spec),))[1]
        hv = tree_flatten(hv)[0]
        estimate = math.sqrt(sum(float((x * x).sum()) for x in hv))
        v = hv
    return max(estimate, 1e-8)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    # Drawn in float64 on the CPU, so a seed gives the same problem on every device and dtype.
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(device=device,
                                                                            dtype=dtype)


# ----------------------------------------------------------------------------- the problems


def quadratic(seed: int = 0, dtype: torch.dtype = torch.float64, device: Any = "cpu", *,
              structure: Optional[PyTree] = None, condition: float = 1e3) -> Problem:
    """An ill-conditioned quadratic ½ θᵀAθ - bᵀθ, A = Q diag(λ) Qᵀ with λ log-spaced in
    [1/condition, 1]. ``structure`` is a pytree of shapes (tuples) giving the params' layout
    (default: a dict with a matrix and a vector, so per-tensor rates see two tensors)."""
    if condition < 1:
        raise ValueError(f"condition must be >= 1, got {condition}")
    if structure is None:
        structure = {"matrix": (3, 4), "vector": (6,)}
    shapes, spec = tree_flatten(structure, is_leaf=lambda x: isinstance(x, tuple) and all(
        isinstance(i, int) for i in x))
    if not shapes:
        raise ValueError("structure must contain at least one shape")
    gen = torch.Generator().manual_seed(seed)
    n = sum(math.prod(s) for s in shapes)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0.0, -math.log10(condition), n, dtype=torch.float64)
    a = (q * eigenvalues) @ q.T
    a = (0.5 * (a + a.T)).to(device=device, dtype=dtype)
    b = _randn(gen, n, dtype=dtype, device=device)
    start = _randn(gen, n, dtype=dtype, device=device)
    params = tree_unflatten([x.reshape(s) for x, s in zip(
        torch.split(start, [math.prod(s) for s in shapes]), shapes)], spec)

    def loss(p: PyTree) -> torch.Tensor:
        theta = flatten_params(p)
        return 0.5 * theta @ (a @ theta) - b @ theta

    return Problem("quadratic", params, loss, smoothness=1.0,
                   description=f"½θᵀAθ - bᵀθ, n={n}, cond(A)={condition:g}",
                   hessian=a, linear_term=b, seed=seed)


def logistic(seed: int = 0, dtype: torch.dtype = torch.float64, device: Any = "cpu", *,
             samples: int = 64, features: int = 8, l2: float = 1e-3) -> Problem:
    """L2-regularised logistic regression on synthetic data; params {"weight", "bias" (0-d)}."""
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, samples, features, dtype=dtype, device=device)
    truth = _randn(gen, features, dtype=dtype, device=device)
    noise = _randn(gen, samples, dtype=dtype, device=device)
    y = ((x @ truth + noise) > 0).to(dtype)
    params = {"weight": 0.1 * _randn(gen, features, dtype=dtype, device=device),
              "bias": torch.zeros((), dtype=dtype, device=device)}

    def loss(p: PyTree) -> torch.Tensor:
        logits = x @ p["weight"] + p["bias"]
        data = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return data + 0.5 * l2 * (p["weight"] ** 2).sum()

    return Problem("logistic", params, loss, estimate_smoothness(loss, params, seed=seed),
                   description=f"logistic regression, {samples}×{features}, L2 {l2:g}", seed=seed)


def _mlp(seed: int, dtype: torch.dtype, device: Any, *,
         activation: Callable[[torch.Tensor], torch.Tensor], samples: int, features: int,
         hidden: int, classes: int, dead: int = 0,
         bias_first: bool = False) -> tuple[PyTree, Callable[[PyTree], torch.Tensor]]:
    """The params and loss of a one-hidden-layer MLP with softmax cross-entropy on synthetic
    data: nested-dict params {"hidden": {"weight", "bias"}, "output": {"weight", "bias"}}.

    The last ``dead`` hidden units get bias -50 (negative pre-activation on every sample).
    ``bias_first`` draws the hidden bias before the hidden weight rather than after it: each
    problem keeps its own historical draw order, so a seed gives the same problem as ever.
    """
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, samples, features, dtype=dtype, device=device)
    labels = torch.randint(0, classes, (samples,), generator=gen).to(device)

    def draw_weight() -> torch.Tensor:
        return _randn(gen, hidden, features, dtype=dtype, device=device) / math.sqrt(features)

    def draw_bias() -> torch.Tensor:
        return 0.1 * _randn(gen, hidden, dtype=dtype, device=device)

    if bias_first:
        bias = draw_bias()
        weight = draw_weight()
    else:
        weight = draw_weight()
        bias = draw_bias()
    if dead:
        bias = torch.cat([bias[:hidden - dead],
                          torch.full((dead,), -50.0, dtype=dtype, device=device)])
    params = {
        "hidden": {"weight": weight, "bias": bias},
        "output": {"weight": _randn(gen, classes, hidden, dtype=dtype, device=device) / math.sqrt(hidden),
                   "bias": torch.zeros(classes, dtype=dtype, device=device)},
    }

    def loss(p: PyTree) -> torch.Tensor:
        h = activation(x @ p["hidden"]["weight"].T + p["hidden"]["bias"])
        logits = h @ p["output"]["weight"].T + p["output"]["bias"]
        return torch.nn.functional.cross_entropy(logits, labels)

    return params, loss


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, device: Any = "cpu", *,
        samples: int = 32, features: int = 5, hidden: int = 8, classes: int = 3) -> Problem:
    """A one-hidden-layer tanh MLP with softmax cross-entropy; nested-dict params
    {"hidden": {"weight", "bias"}, "output": {"weight", "bias"}} (smooth, non-convex)."""
    params, loss = _mlp(seed, dtype, device, activation=torch.tanh, samples=samples,
                        features=features, hidden=hidden, classes=classes)
    return Problem("mlp", params, loss, estimate_smoothness(loss, params, seed=seed),
                   description=f"tanh MLP {features}-{hidden}-{classes}, {samples} samples", seed=seed)


def relu_mlp(seed: int = 0, dtype: torch.dtype = torch.float64, device: Any = "cpu", *,
             samples: int = 32, features: int = 5, hidden: int = 10, dead: int = 3,
             classes: int = 3) -> Problem:
    """A one-hidden-layer ReLU MLP with softmax cross-entropy whose last ``dead`` hidden units
    are dead (bias -50: negative pre-activation on every sample, so their weights get exactly
    zero gradients at every step, and Adam's or RMSprop's v stays exactly 0 there). Through
    training, autodiff then meets sqrt'(0) = inf (see ``eps_root``); the loss is piecewise
    smooth, so only derivatives that no kink lies close to are compared with finite
    differences."""
    if not 0 <= dead < hidden:
        raise ValueError(f"dead must lie in [0, hidden), got {dead}")
    params, loss = _mlp(seed, dtype, device, activation=torch.relu, samples=samples,
                        features=features, hidden=hidden, classes=classes, dead=dead,
                        bias_first=True)
    return Problem("relu_mlp", params, loss, estimate_smoothness(loss, params, seed=seed),
                   description=f"ReLU MLP {features}-{hidden}-{classes} with {dead} dead units, "
                               f"{samples} samples", seed=seed, smooth=False, exact_zeros=True)


def tiny_quadratic(seed: int = 0, dtype: torch.dtype = torch.float64, device: Any = "cpu",
                   **options: Any) -> Problem:
    """The quadratic scaled by 1e-8, so that gradient entries lie around 1e-8 (Adam's and
    RMSprop's default ε, 100 × Adagrad's): an ε omitted or misplaced anywhere in a direction
    or a hypergradient changes it by a relative O(1) here, where on the unscaled problems it
    changes it by only ~ε/|g| ≈ 1e-8: within float32's tolerances, and in float64 close to
    them once g_t has shrunk (the issue's Rosenbrock case passed at 6.9e-11)."""
    return scaled(quadratic(seed, dtype, device, **options), 1e-8, "tiny_quadratic")


def scaled(problem: Problem, factor: float, name: Optional[str] = None) -> Problem:
    """``problem`` with its loss multiplied by ``factor`` (gradients, Hessian and L scale with
    it; the minimiser does not)."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"a problem's scale must be a positive finite number, got {factor}")
    inner = problem.loss
    return Problem(name or f"{problem.name}*{factor:g}", problem.params,
                   lambda p: factor * inner(p), problem.smoothness * factor,
                   description=f"{problem.description}, loss × {factor:g}",
                   hessian=None if problem.hessian is None else factor * problem.hessian,
                   linear_term=None if problem.linear_term is None else factor * problem.linear_term,
                   seed=problem.seed, smooth=problem.smooth, exact_zeros=problem.exact_zeros)


def rosenbrock(seed: int = 0, dtype: torch.dtype = torch.float64, device: Any = "cpu", *,
               pairs: int = 3) -> Problem:
    """Σ (1-x_i)² + 100 (y_i - x_i²)² over ``pairs`` independent (x_i, y_i); params (x, y),
    started near the classic (-1.2, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = -1.2 + 0.1 * _randn(gen, pairs, dtype=dtype, device=device)
    y0 = 1.0 + 0.1 * _randn(gen, pairs, dtype=dtype, device=device)
    params = (x0, y0)

    def loss(p: PyTree) -> torch.Tensor:
        x, y = p
        return ((1 - x) ** 2 + 100 * (y - x * x) ** 2).sum()

    return Problem("rosenbrock", params, loss, estimate_smoothness(loss, params, seed=seed),
                   description=f"Rosenbrock, {pairs} pairs", seed=seed)


BUILDERS: dict[str, Callable[..., Problem]] = {
    "quadratic": quadratic, "logistic": logistic, "mlp": mlp, "rosenbrock": rosenbrock,
    "tiny_quadratic": tiny_quadratic, "relu_mlp": relu_mlp,
}


def make_problem(name: str, seed: int = 0, dtype: torch.dtype = torch.float64,
                 device: Any = "cpu", **options: Any) -> Problem:
    """Build the problem called ``name`` (one of :data:`PROBLEM_NAMES`).

    Args:
        name: the problem, one of :data:`PROBLEM_NAMES`.
        seed: the seed of its data and starting point.
        dtype: the dtype of its params and data.
        device: the device of its params and data.
        **options: the problem builder's own options (e.g. ``condition`` of the quadratic).

    Returns:
        The :class:`Problem`.

    Raises:
        ValueError: ``name`` is not a known problem.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEM_NAMES)}")
    return BUILDERS[name](seed, dtype, device, **options)


def perturbed_params(problem: Problem, scale: float, seed: int) -> PyTree:
    """The starting point plus Gaussian noise of relative size ``scale`` (for batches of seeds)."""
    gen = torch.Generator().manual_seed(seed)
    return tree_map(lambda p: p + scale * (p.abs().mean() + 0.1) * _randn(
        gen, *p.shape, dtype=p.dtype, device=p.device), problem.params)
