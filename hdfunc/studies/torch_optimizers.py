"""Any ``torch.optim.Optimizer`` in a study: torch's own optimizers, :mod:`hdfunc.optim`'s classes
and the peers users pick instead of HD (Prodigy, D-Adaptation, Schedule-Free, DoG).

Such an optimizer is not a functional rule, so it cannot be vmapped over runs: its runs train one
after another (:class:`LoopTrainer`, the *loop path*) next to the vmapped functional rules
(:class:`~hdfunc.studies.engine.BatchedTrainer`, the *vmap path*) in the same study. Everything
that makes runs comparable is shared with the vmap path, so paired tests stay paired:

* the initialisation: :meth:`~hdfunc.studies.problems.Problem.init_model` of the run's seed;
* the minibatches: :func:`~hdfunc.studies.engine.minibatch_indices` of the run's seed (the order
  the vmap path gathers, epoch by epoch);
* the loss (``problem.loss_fn``), the evaluation (the vmap path's own
  :meth:`~hdfunc.studies.engine.BatchedTrainer.evaluate`, on the run's parameters), the
  :class:`~hdfunc.studies.engine.ChunkResult` and so the CSV, summary, statistics and plots;
* resuming: mid-run checkpoints (the model's and the optimizer's ``state_dict``).

Each optimizer is an entry of :data:`TORCH_OPTIMIZERS`, named in a study like a rule
(``--optimizers adam_hd,prodigy,schedulefree_adamw,dadapt_adam,dog``). The study's ``lr0`` grid
sets the hyperparameter each method exposes as its initial scale (:attr:`TorchOptimizerInfo.
lr0_arg`): ``lr`` for torch's optimizers, the HD classes and Schedule-Free, ``d0`` for Prodigy and
D-Adaptation, ``reps_rel`` for DoG. Their other options are the package's documented defaults
unless the study file sets them (``{name = "prodigy", d_coef = 0.5}``); the study's
``weight_decay`` is passed to every optimizer that takes one (the same objective for all).

The peers are optional (``pip install 'hdfunc[peers]'``) and imported only when a study names
them; a missing one raises :class:`MissingPeerError` saying which extra to install.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from hdfunc.registry import REGISTRY

#: the extra that installs the peers
PEERS_EXTRA = "peers"


class MissingPeerError(ImportError):
    """An optimizer's package is not installed (the message says which extra to install)."""


def _group_rate(optimizer: torch.optim.Optimizer) -> float:
    """``param_groups[0]["lr"]``: torch's fixed rate, or γ_t, the rate an HD class applied."""
    return float(optimizer.param_groups[0]["lr"])


def _d_times_lr(optimizer: torch.optim.Optimizer) -> float:
    """d·lr of Prodigy / D-Adaptation (read before the step: the d that step uses)."""
    group = optimizer.param_groups[0]
    return float(group["d"]) * float(group["lr"])


def _scheduled_lr(optimizer: torch.optim.Optimizer) -> float:
    """Schedule-Free's rate of the last step (lr with its warm-up)."""
    return float(optimizer.param_groups[0]["scheduled_lr"])


def _dog_eta(optimizer: torch.optim.Optimizer) -> float:
    """DoG's step size η_t (LDoG: averaged over all parameters' entries)."""
    etas = [torch.as_tensor(eta, dtype=torch.float64).reshape(-1)
            for group in optimizer.param_groups for eta in group["eta"]]
    return float(torch.cat(etas).mean())


@dataclass(frozen=True)
class TorchOptimizerInfo:
    """One ``torch.optim.Optimizer`` a study can run on the loop path.

    Attributes:
        name: its name in a study (``"prodigy"``).
        title: the name people use (``"Prodigy"``).
        module: the module that holds its class (imported only when a study names it).
        attribute: the class (or factory) in ``module``.
        package: the pip package that provides ``module`` (None: torch or hdfunc itself).
        lr0_arg: the constructor argument the study's ``lr0`` grid sets (``lr``, ``d0``,
            ``reps_rel``).
        lr0_default: that argument's documented default.
        defaults: the documented defaults of the other options a study may set (for the docs and
            the tests; the class's own defaults apply).
        study_hyperparams: the study's hyperparameters passed on (``weight_decay``, ``momentum``).
        fixed: options that make the class this optimizer (``nesterov=True``, ...).
        rule: the functional rule this optimizer equals step for step, if any (``"adam"`` for
            torch.optim.Adam, ``"adam_hd"`` for hdfunc.optim.AdamHD).
        hd: whether it takes a hypergradient rate β (``hypergrad_lr``, from the study's beta).
        rate: the rate a step applied, read from the optimizer (logged as the CSV's ``lr``).
        rate_before_step: read ``rate`` before the step (the d that step uses) instead of after.
        eval_mode: the optimizer has ``train()``/``eval()`` modes (Schedule-Free): losses are
            evaluated after ``optimizer.eval()``, training resumes after ``optimizer.train()``.
    """

    name: str
    title: str
    module: str
    attribute: str
    package: Optional[str] = None
    lr0_arg: str = "lr"
    lr0_default: Optional[float] = None
    defaults: dict = field(default_factory=dict)
    study_hyperparams: tuple[str, ...] = ("weight_decay",)
    fixed: dict = field(default_factory=dict)
    rule: Optional[str] = None
    hd: bool = False
    rate: Callable[[torch.optim.Optimizer], float] = _group_rate
    rate_before_step: bool = False
    eval_mode: bool = False

    @property
    def is_peer(self) -> bool:
        """Whether it comes from an optional package (``hdfunc[peers]``)."""
        return self.package is not None

    def available(self) -> bool:
        """Whether its module can be imported (without importing it)."""
        return importlib.util.find_spec(self.module.split(".")[0]) is not None

    def require(self) -> None:
        """Raise :class:`MissingPeerError` (one line: which extra to install) if its package is
        missing."""
        if not self.available():
            raise MissingPeerError(
                f"optimizer {self.name!r} ({self.title}) needs the package {self.package}: "
                f"pip install 'hdfunc[{PEERS_EXTRA}]' (or pip install {self.package})")

    def optimizer_class(self) -> Callable[..., torch.optim.Optimizer]:
        """The class (imported now).

        Returns:
            The optimizer class or factory.

        Raises:
            MissingPeerError: its package is not installed.
        """
        self.require()
        return getattr(importlib.import_module(self.module), self.attribute)

    def make(self, params: Iterable, lr0: float, beta: float, options: dict) -> torch.optim.Optimizer:
        """The optimizer over ``params`` with ``lr0_arg = lr0`` (and ``hypergrad_lr = beta`` for
        an HD class) and ``options``.

        Args:
            params: the parameters.
            lr0: the value of :attr:`lr0_arg`.
            beta: β (HD classes only).
            options: the other options (study hyperparameters and the study file's).

        Returns:
            The optimizer.

        Raises:
            TypeError: an option the class does not take.
        """
        kwargs = {**self.fixed, **options, self.lr0_arg: lr0}
        if self.hd:
            kwargs["hypergrad_lr"] = beta
        try:
            return self.optimizer_class()(params, **kwargs)
        except TypeError as error:
            raise TypeError(f"optimizer {self.name!r}: {error}") from error


def _catalogue() -> dict[str, TorchOptimizerInfo]:
    entries = []
    twins = {"sgd": ("SGD", {}), "sgdm": ("SGD", {"momentum": 0.9}),
             "sgdn": ("SGD", {"nesterov": True}), "adam": ("Adam", {}), "adamw": ("AdamW", {})}
    for rule, (cls, fixed) in twins.items():
        info = REGISTRY[rule]
        entries.append(TorchOptimizerInfo(
            f"torch_{rule}", f"torch.optim.{cls}" + (" (Nesterov)" if rule == "sgdn" else
                                                     " (momentum)" if rule == "sgdm" else ""),
            "torch.optim", cls, study_hyperparams=info.study_hyperparams, fixed=fixed, rule=rule))
    for name, info in REGISTRY.items():
        if info.optimizer is None or info.adapts != ("lr",):
            continue
        entries.append(TorchOptimizerInfo(
            f"optim_{name}", f"hdfunc.optim.{info.optimizer}", "hdfunc.optim", info.optimizer,
            study_hyperparams=info.study_hyperparams, fixed=dict(info.optimizer_options),
            rule=name, hd=True))
    entries += [
        TorchOptimizerInfo("prodigy", "Prodigy", "prodigyopt", "Prodigy", package="prodigyopt",
                           lr0_arg="d0", lr0_default=1e-6,
                           defaults={"lr": 1.0, "betas": (0.9, 0.999), "beta3": None, "eps": 1e-8,
                                     "decouple": True, "use_bias_correction": False,
                                     "safeguard_warmup": False, "d_coef": 1.0},
                           rate=_d_times_lr, rate_before_step=True),
        TorchOptimizerInfo("dadapt_adam", "D-Adapt Adam", "dadaptation", "DAdaptAdam",
                           package="dadaptation", lr0_arg="d0", lr0_default=1e-6,
                           defaults={"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8,
                                     "decouple": False, "use_bias_correction": False},
                           rate=_d_times_lr, rate_before_step=True),
        TorchOptimizerInfo("dadapt_sgd", "D-Adapt SGD", "dadaptation", "DAdaptSGD",
                           package="dadaptation", lr0_arg="d0", lr0_default=1e-6,
                           defaults={"lr": 1.0, "momentum": 0.0},
                           rate=_d_times_lr, rate_before_step=True),
        TorchOptimizerInfo("schedulefree_adamw", "Schedule-Free AdamW", "schedulefree",
                           "AdamWScheduleFree", package="schedulefree", lr0_arg="lr",
                           lr0_default=0.0025,
                           defaults={"betas": (0.9, 0.999), "eps": 1e-8, "warmup_steps": 0,
                                     "r": 0.0, "weight_lr_power": 2.0},
                           rate=_scheduled_lr, eval_mode=True),
        TorchOptimizerInfo("schedulefree_sgd", "Schedule-Free SGD", "schedulefree",
                           "SGDScheduleFree", package="schedulefree", lr0_arg="lr", lr0_default=1.0,
                           defaults={"momentum": 0.9, "warmup_steps": 0, "r": 0.0,
                                     "weight_lr_power": 2.0},
                           rate=_scheduled_lr, eval_mode=True),
        TorchOptimizerInfo("dog", "DoG", "dog", "DoG", package="dog-optimizer", lr0_arg="reps_rel",
                           lr0_default=1e-6, defaults={"lr": 1.0, "eps": 1e-8, "init_eta": None},
                           rate=_dog_eta),
        TorchOptimizerInfo("ldog", "LDoG", "dog", "LDoG", package="dog-optimizer",
                           lr0_arg="reps_rel", lr0_default=1e-6,
                           defaults={"lr": 1.0, "eps": 1e-8, "init_eta": None}, rate=_dog_eta),
    ]
    return {entry.name: entry for entry in entries}


#: Every optimizer a study runs on the loop path, by name: ``torch_<rule>`` (torch.optim's twin
#: of a base rule), ``optim_<rule>`` (the :mod:`hdfunc.optim` class of an HD rule) and the peers.
TORCH_OPTIMIZERS: dict[str, TorchOptimizerInfo] = _catalogue()
#: The peers (optional packages), by name.
PEERS: dict[str, TorchOptimizerInfo] = {k: v for k, v in TORCH_OPTIMIZERS.items() if v.is_peer}


def torch_optimizer_info(name: str) -> TorchOptimizerInfo:
    """The :data:`TORCH_OPTIMIZERS` entry ``name``.

    Args:
        name: its name (``"prodigy"``).

    Returns:
        The entry.

    Raises:
        ValueError: an unknown name.
    """
    try:
        return TORCH_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown torch optimizer {name!r}; choose one of "
                         f"{', '.join(TORCH_OPTIMIZERS)}") from None


def require_optimizers(specs: Iterable[Any]) -> None:
    """Check that the package of every torch optimizer among ``specs`` is installed (nothing is
    imported).

    Args:
        specs: the study's optimizers (``OptimizerSpec``).

    Raises:
        MissingPeerError: the first missing one, naming the extra to install.
    """
    for spec in specs:
        if spec.name in TORCH_OPTIMIZERS:
            TORCH_OPTIMIZERS[spec.name].require()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of the tensors an optimizer keeps: its per-parameter state and any tensors in
    its param groups (DoG keeps its running sums there), not the parameters themselves.

    Args:
        optimizer: the optimizer.

    Returns:
        The bytes.
    """
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    seen: set[int] = set()
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if id(value) not in seen and id(value) not in params:
                seen.add(id(value))
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)

    for state in optimizer.state.values():
        add(state)
    for group in optimizer.param_groups:
        add({k: v for k, v in group.items() if k != "params"})
    return total


def rule_state_bytes(rule: Any, params: dict) -> int:
    """The bytes of a functional rule's state for one run (``rule.init(params)``'s leaves).

    Args:
        rule: the rule.
        params: one run's parameters.

    Returns:
        The bytes.
    """
    from hdfunc.tree import tree_leaves
    return sum(x.numel() * x.element_size() for x in tree_leaves(rule.init(params))
               if isinstance(x, torch.Tensor))


def is_loop(spec: Any) -> bool:
    """Whether the optimizer of ``spec`` runs on the loop path (a :data:`TORCH_OPTIMIZERS`
    entry) rather than the vmap path (a functional rule)."""
    return spec.name in TORCH_OPTIMIZERS


def make_trainer(problem: Any, spec: Any, config: Any, device: Any = "cpu") -> Any:
    """The trainer of ``spec``'s runs: :class:`LoopTrainer` for a torch optimizer,
    :class:`~hdfunc.studies.engine.BatchedTrainer` for a functional rule.

    Args:
        problem: the study's problem.
        spec: the optimizer.
        config: the study.
        device: the device.

    Returns:
        The trainer.
    """
    if is_loop(spec):
        return LoopTrainer(problem, spec, config, device)
    from hdfunc.studies.engine import BatchedTrainer
    return BatchedTrainer(problem, spec, config, device)


def note_performance(result: Any, trainer: Any, seconds: float, resumed: bool) -> None:
    """Attach the throughput and optimizer-state memory of a chunk to its result (the vmap
    path; :class:`LoopTrainer` attaches its own): ``result.performance``.

    Args:
        result: the chunk's ``ChunkResult``.
        trainer: the trainer that produced it.
        seconds: the wall time of ``trainer.run``.
        resumed: the chunk continued from a checkpoint (its time covers only part of it).
    """
    if getattr(result, "performance", None) is not None:
        if resumed:
            result.performance["resumed"] = True
        return
    runs, total = result.losses.shape
    params = {k: torch.zeros(v.shape, dtype=trainer.dtype) for k, v in
              trainer.problem.template().named_parameters()}
    result.performance = {"path": "vmap", "runs": runs, "run_steps": runs * total,
                          "seconds": seconds, "state_bytes": rule_state_bytes(trainer.rule, params),
                          "resumed": resumed}


# ----------------------------------------------------------------------------- the loop path


class LoopTrainer:
    """Trains the runs of one ``torch.optim.Optimizer`` one after another, each from its seed's
    initialisation on its seed's minibatches (module docstring), with the interface of
    :class:`~hdfunc.studies.engine.BatchedTrainer` (``run(keys) -> ChunkResult``).

    Args:
        problem: the problem to train on.
        spec: the optimizer (a :data:`TORCH_OPTIMIZERS` entry, with its options).
        config: the study.
        device: the device to train on (``"auto"``: CUDA when available).

    Raises:
        MissingPeerError: the optimizer's package is not installed.
        ValueError: an unknown optimizer or device.
    """

    def __init__(self, problem: Any, spec: Any, config: Any, device: torch.device | str = "cpu"):
        from hdfunc.studies.engine import resolve_device
        self.info = torch_optimizer_info(spec.name)
        self.info.require()
        self.problem, self.spec, self.config = problem, spec, config
        self.device = resolve_device(device)
        self.dtype = getattr(torch, config.dtype)
        self.inputs, self.targets = self._to(problem.inputs), self._to(problem.targets)
        if problem.num_validation:
            self.val_inputs = self._to(problem.val_inputs)
            self.val_targets = self._to(problem.val_targets)
        else:
            self.val_inputs = self.val_targets = None
        self.template = problem.template()
        self.steps_per_epoch = config.steps_per_epoch(problem.num_examples)
        self.num_steps = config.num_steps(problem.num_examples)
        self.options = {key: getattr(config, key) for key in self.info.study_hyperparams}
        self.options.update(spec.kwargs())

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.dtype) if x.is_floating_point() else x).to(self.device)

    # the vmap path's own evaluation and checkpoint schedule (one source of truth)
    def evaluate(self, params: dict, inputs: torch.Tensor, targets: torch.Tensor,
                 max_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`BatchedTrainer.evaluate <hdfunc.studies.engine.BatchedTrainer.evaluate>`."""
        from hdfunc.studies.engine import BatchedTrainer
        return BatchedTrainer.evaluate(self, params, inputs, targets, max_elements)

    def _due(self, done: int, last_save: float) -> bool:
        from hdfunc.studies.engine import BatchedTrainer
        return BatchedTrainer._due(self, done, last_save)

    def build(self, key: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model of ``key.seed`` (on the study's device and dtype) and its optimizer with
        ``lr0_arg = key.lr0`` (and β = ``key.beta`` for an HD class).

        Args:
            key: the run.

        Returns:
            The pair (model, optimizer).
        """
        model = self.problem.init_model(key.seed).to(device=self.device, dtype=self.dtype)
        with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints a note per optimizer
            optimizer = self.info.make(model.parameters(), key.lr0, key.beta, dict(self.options))
        return model, optimizer

    def _evaluate(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Loss and accuracy of one run (shape (1,)) at the parameters to evaluate: for a
        Schedule-Free optimizer those of ``optimizer.eval()`` (and ``train()`` after)."""
        if self.info.eval_mode:
            optimizer.eval()
        try:
            with torch.no_grad():
                params = {k: v.detach().unsqueeze(0) for k, v in model.named_parameters()}
                return self.evaluate(params, inputs, targets)
        finally:
            if self.info.eval_mode:
                optimizer.train()

    def run(self, keys: tuple, *, checkpoint: str | Path | None = None, progress: Any = None,
            steps: int | None = None) -> Any:
        """Train the runs ``keys`` one after another for the study's number of steps (or
        ``steps``), resuming from and saving to ``checkpoint`` (mid-run: the finished runs'
        numbers, the current run's model and optimizer ``state_dict``).

        Args:
            keys: the runs, all of this trainer's optimizer.
            checkpoint: a ``.pt`` file to resume from and save to, or None.
            progress: a tqdm bar advanced by the steps, or None.
            steps: the number of steps (None: the study's).

        Returns:
            The chunk's :class:`~hdfunc.studies.engine.ChunkResult`, with ``performance``: the
            path ("loop"), run-steps, seconds and the optimizer state's bytes per run.

        Raises:
            ValueError: ``checkpoint`` belongs to other runs.
        """
        from hdfunc.studies.engine import ChunkResult, minibatch_indices
        from hdfunc.studies.storage import load_checkpoint, save_checkpoint

        total = self.num_steps if steps is None else steps
        runs, per_epoch = len(keys), self.steps_per_epoch
        num_epochs = -(-total // per_epoch)
        validate = self.val_inputs is not None
        losses = torch.full((runs, total), math.nan, dtype=self.dtype)
        rates = torch.full((runs, total), math.nan, dtype=torch.float64)
        final = torch.full((runs,), math.nan, dtype=torch.float64)
        val_loss = torch.full((runs, num_epochs), math.nan, dtype=torch.float64)
        val_acc = torch.full((runs, num_epochs), math.nan, dtype=torch.float64)
        first_run, saved = 0, None
        if checkpoint is not None and Path(checkpoint).is_file():
            saved = load_checkpoint(Path(checkpoint), map_location=self.device)
            if (tuple(saved["keys"]) != tuple(keys) or saved["total"] != total
                    or saved.get("path") != "loop"):
                raise ValueError(f"checkpoint {checkpoint} belongs to other runs; delete it")
            first_run = saved["run"]
            for mine, theirs in ((losses, "losses"), (rates, "rates"), (final, "final"),
                                 (val_loss, "val_loss"), (val_acc, "val_accuracy")):
                mine.copy_(saved[theirs])
        if progress is not None:
            progress.reset(total=runs * total)
            progress.update(first_run * total + (saved["step"] if saved else 0))
        batch_size, num_examples = self.config.batch_size, self.problem.num_examples
        state_bytes, trained, last_save = 0, 0, time.monotonic()
        started = time.perf_counter()

        def save(i: int, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
            save_checkpoint(Path(checkpoint), {
                "path": "loop", "keys": list(keys), "total": total, "run": i, "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "losses": losses, "rates": rates, "final": final, "val_loss": val_loss,
                "val_accuracy": val_acc})

        for i in range(first_run, runs):
            key = keys[i]
            model, optimizer = self.build(key)
            start = 0
            if saved is not None and i == first_run:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                start = saved["step"]
            if self.info.eval_mode:
                optimizer.train()
            done = saved_at = start
            consistent = True  # the model and optimizer hold the state after step `done`
            try:
                for epoch in range(start // per_epoch, num_epochs):
                    first = epoch * per_epoch
                    count = min(per_epoch, total - first)
                    batches = minibatch_indices(key.seed, first, count, num_examples, batch_size,
                                                self.config.drop_last)
                    for position in range(max(0, start - first), count):
                        t = first + position
                        index = batches[position].to(self.device)
                        x = torch.index_select(self.inputs, 0, index)
                        y = torch.index_select(self.targets, 0, index)
                        consistent = False
                        optimizer.zero_grad(set_to_none=True)
                        loss = self.problem.loss_fn(model(x), y)
                        loss.backward()
                        if self.info.rate_before_step:
                            rate = self.info.rate(optimizer)
                        optimizer.step()
                        if not self.info.rate_before_step:
                            rate = self.info.rate(optimizer)
                        losses[i, t] = loss.detach()
                        rates[i, t] = rate
                        if validate and (position == per_epoch - 1 or t == total - 1):
                            v_loss, v_acc = self._evaluate(model, optimizer, self.val_inputs,
                                                           self.val_targets)
                            val_loss[i, epoch] = v_loss[0]
                            if v_acc is not None:
                                val_acc[i, epoch] = v_acc[0]
                        done = t + 1  # the step and its bookkeeping are complete
                        consistent = True
                        trained += 1
                        if progress is not None:
                            progress.update(1)
                        if checkpoint is not None and done < total and self._due(done, last_save):
                            save(i, done, model, optimizer)
                            saved_at, last_save = done, time.monotonic()
            except KeyboardInterrupt:  # keep the steps trained so far, if the state is whole
                if checkpoint is not None and consistent and saved_at < done < total:
                    save(i, done, model, optimizer)
                raise
            with torch.no_grad():
                if self.config.eval_final:
                    final[i] = self._evaluate(model, optimizer, self.inputs, self.targets)[0][0]
                else:
                    final[i] = losses[i, -1].double()
            state_bytes = optimizer_state_bytes(optimizer)
        seconds = time.perf_counter() - started
        classify = self.problem.classifies
        result = ChunkResult(tuple(keys), losses.numpy(), rates.numpy(), final.numpy(), per_epoch,
                             val_loss.numpy() if validate else None,
                             val_acc.numpy() if validate and classify else None)
        result.performance = {"path": "loop", "runs": runs, "run_steps": trained,
                              "seconds": seconds, "state_bytes": state_bytes,
                              "resumed": saved is not None}
        return result
