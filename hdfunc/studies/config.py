"""Study configuration: what to train, with which optimizers, rates and seeds.

A study is the product  optimizers × α_0 values × β values × seeds; each element is one *run*
(one independent training trajectory). Base optimizers have no β: their runs carry ``beta = 0``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import hdfunc
from hdfunc.studies.torch_optimizers import TORCH_OPTIMIZERS

#: The paper's β for each HD rule (β = 1e-3 for the SGD family, 1e-7 for Adam; §4), and for the
#: :mod:`hdfunc.optim` class of each (``optim_adam_hd``: the loop path's twin of ``adam_hd``).
PAPER_BETA = {name: info.paper_hypergrad_lr for name, info in hdfunc.REGISTRY.items()
              if info.paper_hypergrad_lr is not None}
PAPER_BETA.update({name: PAPER_BETA[info.rule] for name, info in TORCH_OPTIMIZERS.items()
                   if info.hd})
#: The base optimizer of each HD optimizer (its fixed-rate twin, the partner of its paired tests).
BASE_OF = {name: info.base for name, info in hdfunc.REGISTRY.items() if info.is_hd}
BASE_OF.update({name: BASE_OF[info.rule] for name, info in TORCH_OPTIMIZERS.items() if info.hd})
#: Options of the study that do not change its numbers (free to change on --resume).
RUNTIME_FIELDS = ("device", "compile", "checkpoint_every", "checkpoint_seconds", "chunk_size",
                  "threads", "metric")
#: Per-run numbers that statistics can be computed over (``metric``), and whether higher is better.
METRICS = {
    "final_loss": False,  # mean loss over the whole training set after the last step
    "epoch_loss": False,  # mean minibatch training loss of the last epoch (the paper's)
    "val_loss": False,  # validation loss after the last epoch
    "val_accuracy": True,  # validation accuracy after the last epoch
    "best_val_loss": False,  # the lowest validation loss over the epochs
    "iterations_to_target": False,  # steps until the smoothed minibatch loss <= target_loss
}


class RunKey(NamedTuple):
    """One run of a study: optimizer label, α_0, β (0 for base optimizers) and seed.

    Attributes:
        optimizer: the optimizer's label.
        lr0: α_0.
        beta: β (0 for a base optimizer).
        seed: the run's seed.
    """

    optimizer: str
    lr0: float
    beta: float
    seed: int


@dataclass(frozen=True)
class OptimizerSpec:
    """A rule of :data:`hdfunc.RULES` plus extra keyword options (e.g. HD variants), shown as
    ``label``. Written ``"sgd_hd"`` or ``"sgd_hd:mode=multiplicative:lr_granularity=tensor"``
    on the command line, or ``{name = "sgd_hd", mode = "multiplicative"}`` in a study file.

    Attributes:
        name: the rule's name, a key of :data:`hdfunc.RULES`.
        options: the extra keyword options, as sorted (key, value) pairs.
        label: the optimizer's name in the study's tables and plots.
    """

    name: str
    options: tuple = ()  # sorted (key, value) pairs
    label: str = ""

    @property
    def is_hd(self) -> bool:
        """Whether it is an HD optimizer, one with a base optimizer in :data:`BASE_OF`."""
        return self.name in BASE_OF

    @property
    def is_torch(self) -> bool:
        """Whether it is a ``torch.optim.Optimizer`` (:data:`~hdfunc.studies.torch_optimizers.
        TORCH_OPTIMIZERS`: trained on the loop path) rather than a functional rule (vmapped)."""
        return self.name in TORCH_OPTIMIZERS

    @property
    def lr0_arg(self) -> str:
        """The hyperparameter the study's ``lr0`` sets: ``lr`` (α_0), or ``d0`` / ``reps_rel``
        for the peers that expose another initial scale."""
        return TORCH_OPTIMIZERS[self.name].lr0_arg if self.is_torch else "lr"

    @property
    def base_name(self) -> str:
        """The name of its base optimizer (:data:`BASE_OF`), or its own name when it is not HD."""
        return BASE_OF.get(self.name, self.name)

    def kwargs(self) -> dict:
        """The extra keyword options.

        Returns:
            ``options`` as a dict.
        """
        return dict(self.options)

    def to_json(self) -> dict:
        """The optimizer as a JSON-friendly dict.

        Returns:
            A dict with ``name``, ``label`` and each extra option.
        """
        return {"name": self.name, "label": self.label, **self.kwargs()}


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.startswith("(") and text.endswith(")"):
        return tuple(_parse_value(x.strip()) for x in text[1:-1].split(",") if x.strip())
    return text


def log_grid(text: str) -> list[float]:
    """``"low:high:n"`` → n values log-spaced from ``low`` to ``high`` (both included), e.g.
    ``"1e-6:1e-1:6"`` → [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1].

    Args:
        text: the grid, written ``"low:high:n"``.

    Returns:
        The n values, from ``low`` to ``high``.

    Raises:
        ValueError: ``text`` is not ``low:high:n``, or low or high is not positive or n < 1.
    """
    parts = text.replace(" ", "").split(":")
    try:
        low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError) as error:
        raise ValueError(f"a log-spaced grid is written low:high:n, e.g. 1e-6:1e-1:6; got {text!r}") from error
    if not (low > 0 and high > 0 and count >= 1):
        raise ValueError(f"log-spaced grid {text!r}: low and high must be positive and n >= 1")
    if count == 1:
        return [low]
    step = (math.log10(high) - math.log10(low)) / (count - 1)
    return [float(f"{10 ** (math.log10(low) + i * step):.12g}") for i in range(count)]


def parse_optimizer(spec: str | dict | OptimizerSpec) -> OptimizerSpec:
    """An :class:`OptimizerSpec` from ``"name[:key=value...]"`` or a dict with ``name``: a rule
    of :data:`hdfunc.RULES` (vmapped) or a ``torch.optim.Optimizer`` of
    :data:`~hdfunc.studies.torch_optimizers.TORCH_OPTIMIZERS` (run in a loop over seeds).

    Args:
        spec: ``"name[:key=value...]"``, a dict with ``name`` (and options), or an
            :class:`OptimizerSpec` (returned as it is).

    Returns:
        The :class:`OptimizerSpec`.

    Raises:
        ValueError: an unknown rule, a malformed option, a missing ``name``, or the
            hyperparameter the study's ``lr0`` sets (``lr``, ``d0``, ``reps_rel``) or
            ``hypergrad_lr`` given as an option.
        TypeError: ``spec`` is not a string, a dict or an OptimizerSpec.
    """
    if isinstance(spec, OptimizerSpec):
        return spec
    if isinstance(spec, str):
        name, *items = [part.strip() for part in spec.split(":")]
        options = {}
        for item in items:
            if "=" not in item:
                raise ValueError(f"optimizer option {item!r} in {spec!r} must be key=value")
            key, value = item.split("=", 1)
            options[key.strip()] = _parse_value(value.strip())
        label = spec.strip()
    elif isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"an optimizer given as a table needs a 'name', got {spec}")
        options = {k: v for k, v in spec.items() if k not in ("name", "label")}
        name = spec["name"]
        label = spec.get("label") or ":".join([name] + [f"{k}={v}" for k, v in sorted(options.items())])
    else:
        raise TypeError(f"an optimizer must be a string or a table, got {type(spec).__name__}")
    if name not in hdfunc.RULES and name not in TORCH_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(hdfunc.RULES)} "
                         f"(vmapped rules) or {sorted(TORCH_OPTIMIZERS)} (torch.optim optimizers)")
    lr0_arg = TORCH_OPTIMIZERS[name].lr0_arg if name in TORCH_OPTIMIZERS else "lr"
    for key in (lr0_arg, "hypergrad_lr"):
        if key in options:
            raise ValueError(f"optimizer {label!r}: set {key} through the study's lr0/beta, "
                             f"not as an optimizer option")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return OptimizerSpec(name, tuple(sorted(options.items())), label)


@dataclass
class StudyConfig:
    """Everything that defines a study. Defaults are the paper's settings (batch 128, L2 weight
    decay 1e-4, μ = 0.9, α_0 = 1e-3, β = 1e-3 for SGD-HD/SGDN-HD and 1e-7 for Adam-HD) on the
    built-in synthetic classification problem.

    Args:
        problem: the problem's name, a key of :data:`hdfunc.studies.PROBLEMS`.
        problem_options: the problem's options (``data_dir``, ``hidden``, ``limit``, ...).
        optimizers: the optimizers: names or ``"name:key=value..."`` strings, or dicts with
            ``name``.
        lr0: the initial learning rates α_0, or a log-spaced grid ``"low:high:n"`` (for a peer:
            the value its :attr:`OptimizerSpec.lr0_arg` names, e.g. Prodigy's d_0).
        lr0_by_optimizer: per optimizer label (or name), its own grid replacing ``lr0``.
        beta: β for every HD optimizer (a list), per optimizer label (a dict), or None for the
            paper's value of each HD rule.
        seeds: a count n (seeds 0..n-1) or a list of seeds.
        steps: the steps of each run (give this or ``epochs``).
        epochs: the epochs of each run, an alternative to ``steps``.
        batch_size: the minibatch size.
        drop_last: epochs of ⌊N / batch_size⌋ full minibatches instead of ⌈N / batch_size⌉.
        validation_fraction: the share of the training examples held out for validation (0:
            none; None: the problem's standard held-out split, if any).
        target_loss: the loss whose iterations to target are measured (None: not measured).
        target_window: the steps over which the minibatch loss is averaged for ``target_loss``.
        metric: the metric of the printed table and the paired tests, one of :data:`METRICS`.
        weight_decay: the L2 weight decay of the rules that take it.
        momentum: μ of the rules that take it.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        dtype: ``"float32"`` or ``"float64"``.
        chunk_size: the runs trained at once (None: as many as fit in memory).
        compile: ``torch.compile`` the batched step.
        threads: torch's intra-op CPU threads while the study runs (None: torch's setting).
        eval_final: compute the final loss over the whole training set (else: last minibatch).
        log_every: the steps between rows of the CSV (the first and last step always).
        checkpoint_every: the steps between mid-chunk checkpoints (0: every
            ``checkpoint_seconds``).
        checkpoint_seconds: the seconds between mid-chunk checkpoints.
        name: the study's name, shown in the plots.

    Raises:
        TypeError: ``problem`` is not a name or ``problem_options`` not a dict.
        ValueError: a setting is out of range or inconsistent (e.g. both ``steps`` and
            ``epochs``).
    """

    problem: str = "classification"
    problem_options: dict = field(default_factory=dict)
    optimizers: list = field(default_factory=lambda: ["sgd", "sgd_hd", "adam", "adam_hd"])
    lr0: list = field(default_factory=lambda: [1e-3])  # or "low:high:n" (log-spaced)
    #: per optimizer label (or name): its own grid of the value ``lr0`` sets (α_0, or d_0 of
    #: Prodigy / D-Adaptation, reps_rel of DoG), a list or ``"low:high:n"``, replacing ``lr0``
    lr0_by_optimizer: dict = field(default_factory=dict)
    #: β values for every HD optimizer (a list), per optimizer label (a dict of lists), or None
    #: for the paper's value of each HD rule (:data:`PAPER_BETA`).
    beta: Any = None
    seeds: Any = 8  # an int n (seeds 0..n-1) or a list of ints
    steps: int | None = None
    epochs: float | None = None  # alternative to steps: epochs × steps_per_epoch(N)
    batch_size: int = 128
    #: False (torch DataLoader's default): an epoch is ⌈N / batch_size⌉ steps, the last one on
    #: the remaining examples; True: ⌊N / batch_size⌋ full minibatches, the remainder unused.
    drop_last: bool = False
    #: None: validate on the problem's standard held-out split if it has one (MNIST's 10k test
    #: images when training on its 60k training images); a fraction in (0, 1): hold out that share
    #: of the training examples (a fixed split); 0: no validation.
    validation_fraction: float | None = None
    #: iterations_to_target: the first step at which the minibatch loss, averaged over the last
    #: ``target_window`` steps, is <= target_loss (None: not measured).
    target_loss: float | None = None
    target_window: int = 50
    #: the metric of the printed table and the paired tests (all are in summary.json): one of
    #: :data:`METRICS`.
    metric: str = "final_loss"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    device: str = "cpu"
    dtype: str = "float32"
    chunk_size: int | None = None  # runs trained at once; None: as many as fit in memory
    compile: bool = False  # torch.compile the batched step
    threads: int | None = None  # torch intra-op CPU threads while the study runs; None: torch's
    eval_final: bool = True  # final loss over the whole training set (else: last minibatch)
    log_every: int = 1  # steps between rows of the CSV (the first and last step always)
    checkpoint_every: int = 0  # steps between mid-chunk checkpoints; 0: every checkpoint_seconds
    checkpoint_seconds: float = 60.0
    name: str = "study"

    def __post_init__(self) -> None:
        self.validate()

    # --------------------------------------------------------------------- derived values

    @property
    def optimizer_specs(self) -> list[OptimizerSpec]:
        """The :class:`OptimizerSpec` of each entry of ``optimizers`` (parsed on every access)."""
        return [parse_optimizer(o) for o in self.optimizers]

    @property
    def seed_list(self) -> list[int]:
        """The seeds: 0..n-1 for a count n, else the listed seeds."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def lr0_for(self, spec: OptimizerSpec) -> list[float]:
        """The grid of ``spec``: ``lr0_by_optimizer[label]`` (or ``[name]``), else ``lr0``.

        Args:
            spec: the optimizer.

        Returns:
            Its α_0 (or d_0, reps_rel) values.
        """
        grid = self.lr0_by_optimizer.get(spec.label, self.lr0_by_optimizer.get(spec.name))
        return [float(x) for x in (self.lr0 if grid is None else grid)]

    def all_lr0(self) -> list[float]:
        """Every value of any optimizer's grid, sorted.

        Returns:
            The sorted distinct values.
        """
        return sorted({x for spec in self.optimizer_specs for x in self.lr0_for(spec)})

    def betas_for(self, spec: OptimizerSpec) -> list[float]:
        """The β values of ``spec``: [0.0] for a base optimizer; for an HD one the paper's β
        (``beta`` None), ``beta[label]`` (or ``[name]``, else the paper's β) when ``beta`` is a
        dict, or else every value of ``beta``.

        Args:
            spec: the optimizer.

        Returns:
            Its β values.
        """
        if not spec.is_hd:
            return [0.0]
        if self.beta is None:
            return [PAPER_BETA[spec.name]]
        if isinstance(self.beta, dict):
            value = self.beta.get(spec.label, self.beta.get(spec.name, PAPER_BETA[spec.name]))
            return [float(b) for b in (value if isinstance(value, (list, tuple)) else [value])]
        return [float(b) for b in self.beta]

    def runs(self) -> list[RunKey]:
        """All runs in canonical order: optimizer, α_0, β, seed (as listed in the config).

        Returns:
            The :class:`RunKey` of every run.
        """
        return [RunKey(spec.label, float(lr0), beta, seed)
                for spec in self.optimizer_specs for lr0 in self.lr0_for(spec)
                for beta in self.betas_for(spec) for seed in self.seed_list]

    def steps_per_epoch(self, num_examples: int) -> int:
        """⌈N / batch_size⌉ (``drop_last`` False, a smaller last minibatch) or ⌊N / batch_size⌋.

        Args:
            num_examples: N, the number of training examples.

        Returns:
            The steps of one epoch.

        Raises:
            ValueError: ``drop_last`` is set and ``batch_size`` exceeds N.
        """
        if num_examples < (self.batch_size if self.drop_last else 1):
            raise ValueError(f"batch_size {self.batch_size} is larger than the dataset "
                             f"({num_examples} examples) and drop_last is set")
        if self.drop_last:
            return num_examples // self.batch_size
        return -(-num_examples // self.batch_size)

    def num_steps(self, num_examples: int) -> int:
        """The steps of each run: ``steps``, or ``epochs`` × :meth:`steps_per_epoch` (rounded
        up; exact for whole epochs).

        Args:
            num_examples: N, the number of training examples.

        Returns:
            The number of steps of each run.
        """
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(round(self.epochs * self.steps_per_epoch(num_examples), 9)))

    def identity(self) -> dict:
        """The fields that determine the study's numbers (compared on --resume).

        Returns:
            :meth:`to_dict` without the runtime fields (device, threads, chunk size, ...).
        """
        data = self.to_dict()
        for key in RUNTIME_FIELDS:
            data.pop(key)
        return data

    # --------------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict:
        """The settings as a plain dict: optimizers as strings or dicts, the α_0 grids as lists
        of floats.

        Returns:
            A dict with one entry per field, which :meth:`from_dict` reads back.
        """
        data = asdict(self)
        data["optimizers"] = [o if isinstance(o, str) else dict(o) for o in self.optimizers]
        data["lr0"] = [float(x) for x in self.lr0]
        data["lr0_by_optimizer"] = {k: [float(x) for x in v]
                                    for k, v in self.lr0_by_optimizer.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        """A study from a dict of settings (as :meth:`to_dict` returns).

        Args:
            data: the settings, by field name.

        Returns:
            The validated :class:`StudyConfig`.

        Raises:
            ValueError: an unknown setting, or an invalid one (see :meth:`validate`).
            TypeError: ``problem`` is not a name or ``problem_options`` not a dict.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown study setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "StudyConfig":
        """A study read from a TOML file (settings at the top level or in a ``[study]`` table).

        Args:
            path: the study file.
            **overrides: settings that replace the file's.

        Returns:
            The :class:`StudyConfig`; a relative ``problem_options.data_dir`` is resolved
            against the file's folder (not the working directory).

        Raises:
            FileNotFoundError: no such file.
            ValueError: invalid TOML or unknown settings.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"study file {path} not found") from error
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"study file {path} is not valid TOML: {error}") from error
        if isinstance(data.get("study"), dict):  # settings may also sit in a [study] table
            data = {**data.pop("study"), **data}
        options = data.get("problem_options")
        if isinstance(options, dict) and isinstance(options.get("data_dir"), str):
            # a study file's relative data folder is taken from the file's folder, wherever the
            # file is read from (the command line and the Python API alike)
            from hdfunc.studies.data import resolve_data_dir
            data["problem_options"] = {**options, "data_dir": str(resolve_data_dir(
                options["data_dir"], relative_to=path.parent))}
        return cls.from_dict({**data, **overrides})

    # --------------------------------------------------------------------- validation

    def validate(self) -> None:
        """Check every setting, normalising some in place: a single optimizer, α_0 or β becomes
        a list, a ``"low:high:n"`` grid its values, and a list of seeds a list (run on creation).

        Raises:
            TypeError: ``problem`` is not a name or ``problem_options`` not a dict.
            ValueError: a setting is out of range or inconsistent (e.g. both or neither of
                ``steps`` and ``epochs``, repeated optimizer labels or seeds, an unknown metric).
        """
        if not isinstance(self.problem, str):
            raise TypeError(f"problem must be a name, got {self.problem!r}")
        if not isinstance(self.problem_options, dict):
            raise TypeError("problem_options must be a table/dict")
        if isinstance(self.optimizers, (str, dict)):
            self.optimizers = [self.optimizers]
        if not self.optimizers:
            raise ValueError("optimizers must name at least one optimizer")
        specs = [parse_optimizer(o) for o in self.optimizers]
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"optimizer labels must be distinct, got {labels}")
        if isinstance(self.lr0, str):
            self.lr0 = log_grid(self.lr0)
        if isinstance(self.lr0, (int, float)):
            self.lr0 = [self.lr0]
        if not self.lr0 or any(not isinstance(x, (int, float)) or not x > 0 or not math.isfinite(x)
                               for x in self.lr0):
            raise ValueError(f"lr0 must be a non-empty list of positive finite numbers, got {self.lr0}")
        if not isinstance(self.lr0_by_optimizer, dict):
            raise ValueError("lr0_by_optimizer must be a table: optimizer label -> grid")
        known = {s.label for s in specs} | {s.name for s in specs}
        grids = {}
        for key, grid in self.lr0_by_optimizer.items():
            if key not in known:
                raise ValueError(f"lr0_by_optimizer names {key!r}, which is not an optimizer of "
                                 f"this study ({sorted(known)})")
            grid = log_grid(grid) if isinstance(grid, str) else (
                [grid] if isinstance(grid, (int, float)) else list(grid))
            if not grid or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0
                               or not math.isfinite(x) for x in grid):
                raise ValueError(f"lr0_by_optimizer[{key!r}] must be positive finite numbers, "
                                 f"got {grid}")
            grids[key] = [float(x) for x in grid]
        self.lr0_by_optimizer = grids
        if self.beta is not None:
            if isinstance(self.beta, str):
                self.beta = log_grid(self.beta)
            if isinstance(self.beta, (int, float)):
                self.beta = [self.beta]
            values = (self.beta.values() if isinstance(self.beta, dict) else [self.beta])
            for value in values:
                items = value if isinstance(value, (list, tuple)) else [value]
                if not items or any(not isinstance(b, (int, float)) or b < 0 for b in items):
                    raise ValueError(f"beta values must be non-negative numbers, got {self.beta}")
        seeds = self.seeds
        if isinstance(seeds, bool) or not (isinstance(seeds, int) and seeds > 0 or
                                           isinstance(seeds, (list, tuple)) and seeds and
                                           all(isinstance(s, int) and s >= 0 for s in seeds)):
            raise ValueError(f"seeds must be a positive count or a list of non-negative ints, got {seeds!r}")
        if isinstance(seeds, (list, tuple)):
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds must be distinct, got {seeds}")
            self.seeds = list(seeds)
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        for name in ("batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {self.chunk_size!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not self.weight_decay >= 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay must be >= 0 and momentum in [0, 1)")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be a non-negative integer")
        if not isinstance(self.drop_last, bool):
            raise ValueError(f"drop_last must be true or false, got {self.drop_last!r}")
        if self.validation_fraction is not None and (
                not isinstance(self.validation_fraction, (int, float)) or isinstance(
                    self.validation_fraction, bool) or not 0 <= self.validation_fraction < 1):
            raise ValueError(f"validation_fraction must be in [0, 1) or None, got "
                             f"{self.validation_fraction!r}")
        if self.target_loss is not None and (isinstance(self.target_loss, bool) or not isinstance(
                self.target_loss, (int, float)) or not math.isfinite(self.target_loss)):
            raise ValueError(f"target_loss must be a finite number or None, got {self.target_loss!r}")
        if not isinstance(self.target_window, int) or isinstance(self.target_window, bool) \
                or self.target_window < 1:
            raise ValueError(f"target_window must be a positive integer, got {self.target_window!r}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {list(METRICS)}")


def demo_config(**changes: Any) -> StudyConfig:
    """A study that needs no data and finishes in seconds on a CPU: 8 seeds × SGD, SGD-HD, Adam,
    Adam-HD at the paper's α_0 = 1e-3 on synthetic 5-class classification, 100 iterations.

    Args:
        **changes: settings that replace the demo's.

    Returns:
        The :class:`StudyConfig`.
    """
    settings = dict(name="demo", problem="classification", problem_options={"n_samples": 1024},
                    optimizers=["sgd", "sgd_hd", "adam", "adam_hd"], lr0=[1e-3], seeds=8,
                    steps=100, threads=1)  # one thread: fastest for a problem this small
    settings.update(changes)
    return StudyConfig(**settings)
