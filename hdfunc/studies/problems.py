"""Training problems for studies: the paper's models as ``torch.nn`` modules plus data.

A :class:`Problem` holds a dataset (in-memory tensors) and a constructor for a ``torch.nn``
model. The engine builds one model per seed (under that seed's RNG), stacks their parameters with
``torch.func.stack_module_state`` and calls the model functionally (``torch.func.functional_call``)
on a parameter-free copy, so S independent models train as one batched computation.

Problems (``make_problem(name, **options)``):

* ``logreg``  multinomial logistic regression on MNIST (784 → 10)                 (paper §4.1)
* ``mlp``     MLP on MNIST, two hidden ReLU layers of ``hidden`` = 1000 units       (paper §4.2)
* ``vgg``     VGG-style CNN on CIFAR-10 (``config`` "vgg16" or "vgg11", channel widths divided
  by ``width_divisor``; no batch norm — see docs/studies.md)                        (paper §4.3)
* ``quadratic``  synthetic least squares ½(xᵀw - y)² with ill-conditioned features (no data needed)
* ``classification``  synthetic Gaussian-cluster classification, linear or MLP (no data needed)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from hdfunc.studies import data as datasets

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Problem:
    """A dataset plus a model constructor and a loss ``loss_fn(outputs, targets) -> scalar``.

    Args:
        name: the problem's name (a key of :data:`PROBLEMS`).
        build_model: builds a fresh ``torch.nn`` model (without buffers) under the current RNG.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, the mean loss of a batch.
        inputs: all training inputs, one example per row.
        targets: all training targets (class indices or real values).
        description: one line for summaries and logs.
        options: the options the problem was built with (recorded in a study's summary).
        val_inputs: held-out inputs for validation (None: no validation set), e.g. the MNIST test
            images when the model trains on the 60k training images.
        val_targets: their targets.
        val_description: where the validation set comes from.
    """

    name: str
    build_model: Callable[[], nn.Module]
    loss_fn: LossFn
    inputs: torch.Tensor
    targets: torch.Tensor
    description: str
    options: dict = field(default_factory=dict)
    val_inputs: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None
    val_description: str = ""

    @property
    def classifies(self) -> bool:
        """Whether targets are class indices (then accuracy is measured)."""
        return not self.targets.is_floating_point()

    @property
    def num_validation(self) -> int:
        """The number of validation examples (0: none)."""
        return 0 if self.val_targets is None else int(self.val_targets.shape[0])

    @property
    def num_examples(self) -> int:
        """The number of training examples."""
        return int(self.targets.shape[0])

    def init_model(self, seed: int) -> nn.Module:
        """The model of seed ``seed`` with its own initialisation, drawn on the CPU under
        ``torch.manual_seed(seed)`` (so the same on every device) without touching the caller's
        RNG state.

        Args:
            seed: the seed of this model's initialisation.

        Returns:
            A new model on the CPU.

        Raises:
            ValueError: the model has buffers (they do not batch over seeds).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build_model()
        _check_no_buffers(model, self.name)
        return model

    def init_params(self, seed: int) -> dict[str, torch.Tensor]:
        """The initial parameters of seed ``seed`` (those of :meth:`init_model`).

        Args:
            seed: the seed of the initialisation.

        Returns:
            Parameter name -> a detached copy of its initial value.
        """
        return {name: p.detach().clone() for name, p in self.init_model(seed).named_parameters()}

    def template(self) -> nn.Module:
        """A parameter-free copy of the model (on the meta device) for ``functional_call``.

        Returns:
            The model on the meta device.
        """
        with torch.random.fork_rng(devices=[]):
            return self.build_model().to("meta")

    def num_parameters(self) -> int:
        """The number of scalar parameters of one model.

        Returns:
            The total number of elements over the model's parameters.
        """
        return sum(p.numel() for p in self.template().parameters())


def _check_no_buffers(model: nn.Module, name: str) -> None:
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"problem {name!r}: models with buffers ({buffers}) are not supported "
                         f"(their in-place updates do not batch over seeds)")


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def _cross_entropy_vmap(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # What F.cross_entropy computes under torch.func.vmap, bit for bit, in fewer operations:
    # there nll_loss runs torch's Python decomposition (torch._decomp: masks for ignore_index,
    # a count of the targets, a scatter in the backward; about 20 small vmapped operations per
    # step), here the same arithmetic without the masks (no class is ignored): log_softmax, the
    # target's log-probability by gather, negated, summed, divided by the batch size. Its
    # gradient is the decomposition's too: -1/B at each target before log_softmax's backward.
    picked = -torch.gather(torch.log_softmax(outputs, -1), -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked.sum() / targets.shape[0]


# loss_fn -> the same loss written for vmap (fewer vmapped operations, the same numbers)
_VMAP_FORMS: dict[Callable, LossFn] = {_cross_entropy: _cross_entropy_vmap}


def vmap_loss(loss_fn: LossFn) -> LossFn:
    """The formulation of ``loss_fn`` the batched engine differentiates under ``torch.func.vmap``:
    for the problems' cross-entropy, one that gives bit for bit the numbers of
    ``F.cross_entropy`` under vmap (losses and gradients) with fewer vmapped operations; any
    other loss as it is. Outside vmap ``loss_fn`` itself is faster (torch's fused kernels).

    Args:
        loss_fn: a problem's ``loss_fn(outputs, targets) -> scalar``.

    Returns:
        The loss function to call under vmap.
    """
    return _VMAP_FORMS.get(loss_fn, loss_fn)


def _half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(-1) - targets).pow(2).mean()


# ----------------------------------------------------------------------------- models


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (a single Linear if two sizes).

    Args:
        sizes: the widths, input first and output last (at least two).

    Returns:
        The model.
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


def vgg(config: str = "vgg16", width_divisor: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A VGG-style CNN for 32×32 RGB images: 3×3 conv + ReLU blocks and 2×2 max pools, then a
    linear classifier (the CIFAR-10 VGG of the paper's reference code, without batch norm).

    Args:
        config: "vgg16" or "vgg11".
        width_divisor: every channel width is divided by it (at least 1 channel).
        num_classes: the number of outputs.

    Returns:
        The model.

    Raises:
        ValueError: an unknown ``config`` or a ``width_divisor`` that is not a positive integer.
    """
    if config not in VGG_CONFIGS:
        raise ValueError(f"vgg config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
    if not isinstance(width_divisor, int) or width_divisor < 1:
        raise ValueError(f"width_divisor must be a positive integer, got {width_divisor!r}")
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG_CONFIGS[config]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            width = max(1, int(item) // width_divisor)
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    layers += [nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- problems


def _mnist_problem(name: str, widths: list[int], title: str, options: dict,
                   data_dir: str | None, split: str, limit: int | None, download: bool) -> Problem:
    """An :func:`mlp` of ``widths`` with cross-entropy on MNIST (the problem ``name``, described
    as ``title`` on the data; ``options`` and the data arguments are its recorded options), with
    the test split held out where :func:`_with_test_split` says."""
    dataset = _limited(datasets.load_mnist(data_dir, split, download), limit)
    return _with_test_split(
        Problem(name, lambda: mlp(widths), _cross_entropy, dataset.inputs, dataset.labels,
                f"{title} on {dataset.description}",
                {**options, "data_dir": data_dir, "split": split, "limit": limit}),
        dataset, lambda: datasets.load_mnist(data_dir, "test", False), split == "auto")


def logreg(data_dir: str | None = None, split: str = "auto", limit: int | None = None,
           download: bool = False) -> Problem:
    """Multinomial logistic regression on MNIST, 784 → 10 (paper §4.1).

    Args:
        data_dir: the MNIST folder (None: the default folders, see :mod:`hdfunc.studies.data`).
        split: "train", "test" or "auto" (train if present, else test).
        limit: use only the first ``limit`` examples (None: all).
        download: download missing files with torchvision.

    Returns:
        The problem.

    Raises:
        hdfunc.studies.data.DatasetError: the MNIST files are missing or unreadable.
        ValueError: a bad ``split`` or ``limit``.
    """
    return _mnist_problem("logreg", [784, 10], "logistic regression", {}, data_dir, split, limit,
                          download)


def mnist_mlp(hidden: int = 1000, data_dir: str | None = None, split: str = "auto",
              limit: int | None = None, download: bool = False) -> Problem:
    """An MLP on MNIST, 784-hidden-hidden-10 with ReLU (paper §4.2).

    Args:
        hidden: the width of both hidden layers.
        data_dir: the MNIST folder (None: the default folders, see :mod:`hdfunc.studies.data`).
        split: "train", "test" or "auto" (train if present, else test).
        limit: use only the first ``limit`` examples (None: all).
        download: download missing files with torchvision.

    Returns:
        The problem.

    Raises:
        hdfunc.studies.data.DatasetError: the MNIST files are missing or unreadable.
        ValueError: a bad ``hidden``, ``split`` or ``limit``.
    """
    _positive("hidden", hidden)
    return _mnist_problem("mlp", [784, hidden, hidden, 10], f"MLP 784-{hidden}-{hidden}-10 (ReLU)",
                          {"hidden": hidden}, data_dir, split, limit, download)


def cifar_vgg(config: str = "vgg16", width_divisor: int = 1, data_dir: str | None = None,
              split: str = "train", limit: int | None = None, download: bool = False) -> Problem:
    """A VGG-style CNN (:func:`vgg`) on CIFAR-10 (paper §4.3).

    Args:
        config: "vgg16" or "vgg11".
        width_divisor: every channel width is divided by it.
        data_dir: the CIFAR-10 folder (None: the default folders).
        split: "train" or "test".
        limit: use only the first ``limit`` examples (None: all).
        download: download missing files with torchvision.

    Returns:
        The problem.

    Raises:
        hdfunc.studies.data.DatasetError: the CIFAR-10 batches are missing or unreadable.
        ValueError: a bad ``config``, ``width_divisor``, ``split`` or ``limit``.
    """
    vgg(config, width_divisor)  # validates the options before loading data
    dataset = _limited(datasets.load_cifar10(data_dir, split, download), limit)
    return _with_test_split(
        Problem("vgg", lambda: vgg(config, width_divisor), _cross_entropy, dataset.inputs,
                dataset.labels, f"{config} (widths /{width_divisor}) on {dataset.description}",
                {"config": config, "width_divisor": width_divisor, "data_dir": data_dir,
                 "split": split, "limit": limit}),
        dataset, lambda: datasets.load_cifar10(data_dir, "test", False), split == "train")


def quadratic(dim: int = 20, n_samples: int = 2048, condition: float = 100.0, noise: float = 0.1,
              data_seed: int = 0) -> Problem:
    """Least squares ½ mean (xᵀw + b - y)² on synthetic features whose scales spread over
    √condition (so the Hessian's condition number is about ``condition``).

    Args:
        dim: the number of features.
        n_samples: the number of examples.
        condition: the condition number of the Hessian, about (>= 1).
        noise: the standard deviation of the noise on the targets.
        data_seed: the seed of the data (not of the models).

    Returns:
        The problem (a linear model; no data files needed).

    Raises:
        ValueError: a size that is not a positive integer, or ``condition`` < 1.
    """
    _positive("dim", dim)
    _positive("n_samples", n_samples)
    if not condition >= 1:
        raise ValueError(f"condition must be >= 1, got {condition}")
    g = torch.Generator().manual_seed(data_seed)
    scales = torch.logspace(0, -0.5 * math.log10(condition), dim)
    x = torch.randn(n_samples, dim, generator=g) * scales
    w_true = torch.randn(dim, generator=g)
    y = x @ w_true + noise * torch.randn(n_samples, generator=g)
    return Problem("quadratic", lambda: nn.Linear(dim, 1), _half_squared_error, x, y,
                   f"synthetic least squares, {n_samples}×{dim}, condition ≈ {condition:g}",
                   {"dim": dim, "n_samples": n_samples, "condition": condition, "noise": noise,
                    "data_seed": data_seed})


def classification(dim: int = 20, classes: int = 5, n_samples: int = 2048, hidden: int = 0,
                   separation: float = 1.0, data_seed: int = 0) -> Problem:
    """Synthetic classification: Gaussian clusters (unit variance) around class means drawn with
    scale ``separation``; a linear model (``hidden=0``) or an MLP with one hidden ReLU layer.

    Args:
        dim: the number of features.
        classes: the number of classes (>= 2).
        n_samples: the number of examples.
        hidden: the width of the hidden layer (0: a linear model).
        separation: the scale of the class means.
        data_seed: the seed of the data (not of the models).

    Returns:
        The problem (no data files needed).

    Raises:
        ValueError: a size out of its range.
    """
    _positive("dim", dim)
    _positive("n_samples", n_samples)
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0, got {hidden}")
    g = torch.Generator().manual_seed(data_seed)
    means = separation * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n_samples,), generator=g)
    x = means[y] + torch.randn(n_samples, dim, generator=g)
    sizes = [dim, hidden, classes] if hidden else [dim, classes]
    return Problem("classification", lambda: mlp(sizes), _cross_entropy, x, y,
                   f"synthetic {classes}-class Gaussian clusters, {n_samples}×{dim}, "
                   f"model {'-'.join(map(str, sizes))}",
                   {"dim": dim, "classes": classes, "n_samples": n_samples, "hidden": hidden,
                    "separation": separation, "data_seed": data_seed})


def _with_test_split(problem: Problem, dataset: datasets.Dataset,
                     load_test: Callable[[], datasets.Dataset], allowed: bool) -> Problem:
    """Attach the standard test split as the validation set when the model trains on the
    training split (as the paper does: train on MNIST's 60k, validate on its 10k)."""
    if not allowed or not dataset.name.endswith("-train"):
        return problem
    try:
        test = load_test()
    except datasets.DatasetError:
        return problem
    problem.val_inputs, problem.val_targets = test.inputs, test.labels
    problem.val_description = test.description
    return problem


def hold_out(problem: Problem, fraction: float, data_seed: int = 0) -> Problem:
    """A copy of ``problem`` whose training set loses a random ``fraction`` of its examples
    (drawn from a fixed permutation of seed ``data_seed``, the same for every run), which become
    its validation set (replacing any standard one).

    Args:
        problem: the problem.
        fraction: the share of examples held out, in (0, 1).
        data_seed: the seed of the split.

    Returns:
        The new problem.

    Raises:
        ValueError: ``fraction`` out of range, or a split that leaves either side empty.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    n = problem.num_examples
    held = int(round(fraction * n))
    if held < 1 or held >= n:
        raise ValueError(f"validation_fraction {fraction} of {n} examples leaves an empty split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))
    train, val = order[:n - held].sort().values, order[n - held:].sort().values
    return Problem(problem.name, problem.build_model, problem.loss_fn, problem.inputs[train],
                   problem.targets[train],
                   f"{problem.description}; {n - held} for training, {held} held out",
                   dict(problem.options), problem.inputs[val], problem.targets[val],
                   f"{held} examples ({fraction:g}) held out of the training data "
                   f"(fixed split, data seed {data_seed})")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _limited(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    if limit is None:
        return dataset
    _positive("limit", limit)
    return datasets.Dataset(dataset.inputs[:limit], dataset.labels[:limit], dataset.name,
                            f"{dataset.description} (first {min(limit, len(dataset))})")


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "logreg": logreg,
    "mlp": mnist_mlp,
    "vgg": cifar_vgg,
    "quadratic": quadratic,
    "classification": classification,
}


def make_problem(name: str, **options: Any) -> Problem:
    """Build problem ``name`` (one of :data:`PROBLEMS`) with its keyword ``options``.

    Args:
        name: "logreg", "mlp", "vgg", "quadratic" or "classification".
        **options: the keyword arguments of that problem's constructor.

    Returns:
        The problem.

    Raises:
        ValueError: an unknown problem or option (the message lists the allowed ones), or a bad
            option value.
        hdfunc.studies.data.DatasetError: the problem's data are missing.
    """
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}")
    import inspect
    allowed = list(inspect.signature(PROBLEMS[name]).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for problem {name!r}; allowed: {allowed}")
    return PROBLEMS[name](**options)
