"""The batched study engine: S independent runs trained at once with ``torch.func.vmap``.

Each run has its own parameters (its seed's initialisation), its own optimizer state (built by
``rule.init`` with its own α_0 and β: the core reads both from the state) and its own minibatch
order (drawn from its seed). All of that is made outside vmap, on the CPU, from the seed alone, so
seed k trains the same trajectory whether it runs alone or batched with others. Parameters and
states are stacked leaf-wise, and one vmapped step

    g, loss = grad(loss)(θ, batch);  u, state = rule.update(g, state, θ);  θ = θ + u

advances every run. Runs of one optimizer are split into chunks that fit the device's memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

import hdfunc
from hdfunc.studies.config import OptimizerSpec, RunKey, StudyConfig
from hdfunc.studies.problems import Problem, make_problem, vmap_loss
from hdfunc.studies.storage import check_output_folder, load_checkpoint, save_checkpoint
from hdfunc.tree import tree_leaves, tree_stack

DATA_ORDER_STREAM = 1  # the seed sequence entropy tag of the minibatch order


# ----------------------------------------------------------------------------- per-seed randomness


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The order of the examples in epoch ``epoch`` of run seed ``seed`` (CPU, reproducible).

    Args:
        seed: the run's seed.
        epoch: the epoch, from 0.
        num_examples: N, the number of training examples.

    Returns:
        A permutation of 0..N-1 (an int64 CPU tensor).
    """
    state = np.random.SeedSequence([seed, DATA_ORDER_STREAM, epoch]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randperm(num_examples, generator=generator)


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """Steps of one epoch: ⌈N / B⌉ (the last minibatch smaller, as torch's DataLoader) or, with
    ``drop_last``, ⌊N / B⌋ full minibatches.

    Args:
        num_examples: N, the number of training examples.
        batch_size: B, the minibatch size.
        drop_last: drop the last, incomplete minibatch.

    Returns:
        The steps of one epoch.

    Raises:
        ValueError: N or B is not positive, or ``drop_last`` is set and B > N.
    """
    if batch_size < 1 or num_examples < 1:
        raise ValueError("batch_size and the number of examples must be positive")
    if drop_last:
        if num_examples < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset "
                             f"({num_examples} examples) and drop_last is set")
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def minibatch_indices(seed: int, first_step: int, num_steps: int, num_examples: int,
                      batch_size: int, drop_last: bool = False) -> list[torch.Tensor]:
    """Example indices of steps ``first_step .. first_step + num_steps - 1`` (0-based) of seed
    ``seed``, one 1-d tensor per step. Each epoch is a fresh permutation of the N examples cut into
    consecutive minibatches of ``batch_size``: ⌈N/B⌉ of them, the last one smaller (torch
    DataLoader's ``drop_last=False``), or ⌊N/B⌋ with ``drop_last`` (the remainder unused).

    Args:
        seed: the run's seed.
        first_step: the first step, from 0.
        num_steps: the number of steps.
        num_examples: N, the number of training examples.
        batch_size: B, the minibatch size.
        drop_last: drop the last, incomplete minibatch of each epoch.

    Returns:
        One 1-d int64 tensor of example indices per step.

    Raises:
        ValueError: N or B is not positive, or ``drop_last`` is set and B > N.
    """
    per_epoch = steps_per_epoch(num_examples, batch_size, drop_last)
    rows, permutations = [], {}
    for step in range(first_step, first_step + num_steps):
        epoch, position = divmod(step, per_epoch)
        if epoch not in permutations:
            permutations[epoch] = epoch_permutation(seed, epoch, num_examples)
        rows.append(permutations[epoch][position * batch_size:(position + 1) * batch_size])
    return rows


# ----------------------------------------------------------------------------- rules and trees


def make_rule(spec: OptimizerSpec, lr0: float, beta: float, config: StudyConfig) -> hdfunc.Rule:
    """The core rule of ``spec`` with α_0 = ``lr0`` (and β = ``beta`` for an HD rule), the
    study's hyperparameters the rule takes (``RuleInfo.study_hyperparams``: weight decay, and
    momentum for SGDN); the spec's own options take precedence.

    Args:
        spec: the optimizer.
        lr0: α_0.
        beta: β (ignored for a base rule).
        config: the study, for its hyperparameters.

    Returns:
        The rule.

    Raises:
        TypeError: the spec's options are not accepted by the rule.
    """
    info = hdfunc.rule_info(spec.name)
    kwargs: dict[str, Any] = {key: getattr(config, key) for key in info.study_hyperparams}
    kwargs.update(spec.kwargs())
    factory = info.factory
    try:
        return factory(lr0, beta, **kwargs) if spec.is_hd else factory(lr0, **kwargs)
    except TypeError as error:
        raise TypeError(f"optimizer {spec.label!r}: {error}") from error


def template_rule(spec: OptimizerSpec, config: StudyConfig) -> hdfunc.Rule:
    """A rule of ``spec`` built with placeholder α_0 and β: its update function and state layout
    serve every run of ``spec``, whose own α_0 and β live in its state (the core reads them
    from there).

    Args:
        spec: the optimizer.
        config: the study, for its hyperparameters.

    Returns:
        The rule.
    """
    return make_rule(spec, 1e-3, 1e-3 if spec.is_hd else 0.0, config)


def applied_rate(state: Any) -> torch.Tensor:
    """The learning rate the last step applied (γ_t; α_t unless transitioning), as one number:
    per-tensor / per-element rates are averaged over all their entries.

    Args:
        state: a rule's state (of one run).

    Returns:
        γ_t as a 0-d tensor.
    """
    leaves = tree_leaves(hdfunc.get_applied_lr(state))
    if len(leaves) == 1 and leaves[0].dim() == 0:
        return leaves[0]
    return torch.cat([leaf.reshape(-1) for leaf in leaves]).mean()


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``; ``"auto"`` is CUDA when available, else the CPU.

    Args:
        device: a device, its name, or ``"auto"``.

    Returns:
        The :class:`torch.device`.

    Raises:
        ValueError: an unknown device, or CUDA requested where it is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r} (cpu, cuda, cuda:N or auto)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available in this torch build")
    return device


def activation_elements(problem: Problem) -> int:
    """Numbers produced by the model's layers for one example (measured on the meta device).

    Args:
        problem: the study's problem.

    Returns:
        The number of activations for one example (at least 1).
    """
    template = problem.template()
    total = 0

    def count(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel()

    handles = [m.register_forward_hook(count) for m in template.modules() if not list(m.children())]
    try:
        template(torch.empty((1,) + tuple(problem.inputs.shape[1:]), device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return max(total, 1)


def available_memory(device: torch.device) -> int:
    """Bytes a study may use: 70 % of the free GPU memory, or half the available host memory.

    Args:
        device: the device the study runs on.

    Returns:
        The memory budget in bytes.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.7 * free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return 4 << 30


def bytes_per_run(problem: Problem, rule: hdfunc.Rule, batch_size: int, element_size: int) -> int:
    """A rough upper estimate of one run's memory: params, grads, updates and the optimizer state,
    plus the minibatch's activations kept for the backward pass.

    Args:
        problem: the study's problem.
        rule: the run's rule.
        batch_size: the minibatch size.
        element_size: the bytes of one element of the study's dtype.

    Returns:
        The estimate in bytes.
    """
    meta = {k: torch.empty_like(v, device="meta") for k, v in problem.template().named_parameters()}
    num_params = sum(v.numel() for v in meta.values())
    num_state = sum(x.numel() for x in tree_leaves(rule.init(meta)))
    example = int(np.prod(problem.inputs.shape[1:]))
    activations = batch_size * (3 * activation_elements(problem) + example)
    return element_size * (4 * num_params + num_state + activations)


# ----------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Chunk:
    """Runs of one optimizer trained together.

    Attributes:
        id: the chunk's number, as a zero-padded string.
        spec: the optimizer of its runs.
        keys: its runs.
    """

    id: str
    spec: OptimizerSpec
    keys: tuple[RunKey, ...]


def plan_chunks(config: StudyConfig, chunk_size: int | Callable[[OptimizerSpec], int]) -> list[Chunk]:
    """Split each optimizer's runs (in canonical order) into consecutive chunks.

    Args:
        config: the study.
        chunk_size: the most runs in a chunk, or a callable giving it for each optimizer.

    Returns:
        The chunks, numbered in order.
    """
    chunks, runs = [], config.runs()
    for spec in config.optimizer_specs:
        keys = [k for k in runs if k.optimizer == spec.label]
        size = chunk_size(spec) if callable(chunk_size) else chunk_size
        for start in range(0, len(keys), size):
            chunks.append(Chunk(f"{len(chunks):04d}", spec, tuple(keys[start:start + size])))
    return chunks


@dataclass
class ChunkResult:
    """Per-step minibatch loss (loss at θ_{t-1}, step t = 1..T) and applied rate γ_t of each run
    of a chunk, shape (S, T), the final loss (whole training set, or last minibatch), and, when
    the problem has a validation set, the validation loss and accuracy after each epoch (the
    last entry: after the last step), shape (S, E).

    Attributes:
        keys: the runs (S of them).
        losses: the minibatch loss of each step, shape (S, T).
        rates: the applied rate γ_t of each step, shape (S, T).
        final_loss: the final loss, shape (S,).
        steps_per_epoch: the steps of one epoch.
        val_loss: the validation loss after each epoch, shape (S, E), or None.
        val_accuracy: the validation accuracy after each epoch, shape (S, E), or None.
    """

    keys: tuple[RunKey, ...]
    losses: np.ndarray
    rates: np.ndarray
    final_loss: np.ndarray
    steps_per_epoch: int = 0
    val_loss: np.ndarray | None = None
    val_accuracy: np.ndarray | None = None


class BatchedTrainer:
    """Trains the runs of one optimizer on one problem, S at a time, with one vmapped step.

    Args:
        problem: the problem to train on.
        spec: the optimizer of the runs.
        config: the study.
        device: the device to train on (``"auto"``: CUDA when available).

    Raises:
        ValueError: an unknown or unavailable device, or a batch larger than the dataset with
            ``drop_last``.
    """

    def __init__(self, problem: Problem, spec: OptimizerSpec, config: StudyConfig,
                 device: torch.device | str = "cpu"):
        self.problem, self.spec, self.config = problem, spec, config
        self.device = resolve_device(device)
        self.dtype = getattr(torch, config.dtype)
        inputs = problem.inputs
        self.inputs = (inputs.to(self.dtype) if inputs.is_floating_point() else inputs).to(self.device)
        targets = problem.targets
        self.targets = (targets.to(self.dtype) if targets.is_floating_point() else targets).to(self.device)
        if problem.num_validation:
            vx, vy = problem.val_inputs, problem.val_targets
            self.val_inputs = (vx.to(self.dtype) if vx.is_floating_point() else vx).to(self.device)
            self.val_targets = (vy.to(self.dtype) if vy.is_floating_point() else vy).to(self.device)
        else:
            self.val_inputs = self.val_targets = None
        self.template = problem.template()
        self.steps_per_epoch = config.steps_per_epoch(problem.num_examples)
        self.num_steps = config.num_steps(problem.num_examples)
        self.rule = template_rule(spec, config)
        self._step = self._make_step()

    # ------------------------------------------------------------------ the batched functions

    def loss(self, params: dict, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The problem's loss of one run on one minibatch: the model called functionally with
        ``params``, then the problem's ``loss_fn`` in its vmap formulation
        (:func:`~hdfunc.studies.problems.vmap_loss`: the same numbers in fewer vmapped
        operations). Written for one run; the step vmaps it over the S runs.

        Args:
            params: the run's params (name -> tensor).
            inputs: the minibatch's inputs, one example per row.
            targets: the minibatch's targets.

        Returns:
            The mean loss of the minibatch (0-d).
        """
        outputs = functional_call(self.template, params, (inputs,))
        return vmap_loss(self.problem.loss_fn)(outputs, targets)

    def _make_step(self) -> Callable:
        rule = self.rule

        def step(params: dict, state: Any, inputs: torch.Tensor, targets: torch.Tensor):
            grads, loss = grad_and_value(self.loss)(params, inputs, targets)
            updates, state = rule.update(grads, state, params)
            return hdfunc.apply_updates(params, updates), state, loss, applied_rate(state)

        batched = vmap(step)
        return torch.compile(batched) if self.config.compile else batched

    def initial(self, keys: tuple[RunKey, ...]) -> tuple[dict, Any]:
        """Stacked initial params (each run: its seed's model, stacked with
        ``torch.func.stack_module_state``) and states (each run: ``rule.init`` with its α_0, β).

        Args:
            keys: the runs.

        Returns:
            The pair (stacked params, stacked states), with a leading dimension of size S.
        """
        models: dict[int, torch.nn.Module] = {}
        for key in keys:
            if key.seed not in models:
                models[key.seed] = self.problem.init_model(key.seed)
        stacked, _ = stack_module_state([models[key.seed] for key in keys])
        params = {k: v.detach().to(self.device, self.dtype) for k, v in stacked.items()}
        states = [make_rule(self.spec, key.lr0, key.beta, self.config).init(
                  {k: v[i] for k, v in params.items()}) for i, key in enumerate(keys)]
        return params, tree_stack(states)

    def full_loss(self, params: dict, max_elements: int = 1 << 25) -> torch.Tensor:
        """Mean loss over the whole training set of each run (shape (S,)), in data batches.

        Args:
            params: the stacked params of the runs.
            max_elements: the most input elements of one data batch (times S).

        Returns:
            The losses, shape (S,).
        """
        return self.evaluate(params, self.inputs, self.targets, max_elements)[0]

    def evaluate(self, params: dict, inputs: torch.Tensor, targets: torch.Tensor,
                 max_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean loss (float64, shape (S,)) of each run over ``inputs``/``targets``, and its
        accuracy (share of argmax predictions equal to the class; None for a regression), in data
        batches (the mean weights each example equally).

        Args:
            params: the stacked params of the runs.
            inputs: the examples' inputs.
            targets: the examples' targets.
            max_elements: the most input elements of one data batch (times S).

        Returns:
            The pair (losses, accuracies), each of shape (S,); accuracies None for a regression.
        """
        runs = tree_leaves(params)[0].shape[0]
        count = int(targets.shape[0])
        per_example = activation_elements(self.problem)
        batch = max(1, min(count, max_elements // max(1, runs * per_example)))
        classify = self.problem.classifies

        def outputs_loss(p: dict, x: torch.Tensor, y: torch.Tensor):
            out = functional_call(self.template, p, (x,))
            loss = vmap_loss(self.problem.loss_fn)(out, y)
            correct = (out.argmax(-1) == y).sum() if classify else loss.new_zeros(())
            return loss, correct

        batched = vmap(outputs_loss, in_dims=(0, None, None))
        total = torch.zeros(runs, dtype=torch.float64, device=self.device)
        hits = torch.zeros(runs, dtype=torch.float64, device=self.device)
        for start in range(0, count, batch):
            x, y = inputs[start:start + batch], targets[start:start + batch]
            loss, correct = batched(params, x, y)
            total += loss.double() * x.shape[0]
            hits += correct.double()
        return total / count, (hits / count if classify else None)

    # ------------------------------------------------------------------ training

    def run(self, keys: tuple[RunKey, ...], *, checkpoint: str | Path | None = None,
            progress: Any = None, steps: int | None = None) -> ChunkResult:
        """Train the runs ``keys`` for the study's number of steps (or ``steps``), resuming from
        and saving to ``checkpoint`` (a ``.pt`` file) when given. ``progress``: a tqdm bar.

        Each step gathers all runs' minibatches with one index tensor (S × B indices into the
        dataset, one ``index_select``); the last minibatch of an epoch is smaller unless
        ``drop_last``. After each epoch (and after the last step) the validation set, if any, is
        evaluated.

        Args:
            keys: the runs, all of this trainer's optimizer.
            checkpoint: a ``.pt`` file to resume from and save to, or None.
            progress: a tqdm bar advanced by the steps, or None.
            steps: the number of steps (None: the study's).

        Returns:
            The chunk's :class:`ChunkResult`.

        Raises:
            ValueError: ``checkpoint`` belongs to other runs.
        """
        total = self.num_steps if steps is None else steps
        runs = len(keys)
        per_epoch = self.steps_per_epoch
        num_epochs = -(-total // per_epoch)
        validate = self.val_inputs is not None
        start, params, state = 0, None, None
        losses = torch.empty(runs, total, dtype=self.dtype, device=self.device)
        rates = torch.empty(runs, total, dtype=torch.float64, device=self.device)
        val_loss = torch.full((runs, num_epochs), math.nan, dtype=torch.float64, device=self.device)
        val_acc = torch.full((runs, num_epochs), math.nan, dtype=torch.float64, device=self.device)
        if checkpoint is not None and Path(checkpoint).is_file():
            saved = load_checkpoint(Path(checkpoint), map_location=self.device)
            if tuple(saved["keys"]) != tuple(keys) or saved["total"] != total:
                raise ValueError(f"checkpoint {checkpoint} belongs to other runs; delete it")
            start, params, state = saved["step"], saved["params"], saved["state"]
            losses[:, :start], rates[:, :start] = saved["losses"], saved["rates"]
            if validate:
                val_loss.copy_(saved["val_loss"])
                val_acc.copy_(saved["val_accuracy"])
        else:
            params, state = self.initial(keys)
        if progress is not None:
            progress.reset(total=total)
            progress.update(start)
        seeds = [k.seed for k in keys]
        batch_size, num_examples = self.config.batch_size, self.problem.num_examples
        example_shape = tuple(self.inputs.shape[1:])
        target_shape = tuple(self.targets.shape[1:])
        last_save = time.monotonic()
        # (steps done, params, state) as one value, replaced in a single assignment after the
        # step's loss and rate are stored: whenever an interrupt lands, it is consistent
        snapshot = (start, params, state)
        saved_at = start
        order_epoch, order = -1, None
        # the gathered minibatches go into buffers allocated once: a fresh S·B-example tensor per
        # step costs more in page faults than the gather itself (2.5x on a CPU at S = 64, MNIST)
        x_buffer = torch.empty((runs * batch_size,) + example_shape, dtype=self.inputs.dtype,
                               device=self.device)
        y_buffer = torch.empty((runs * batch_size,) + target_shape, dtype=self.targets.dtype,
                               device=self.device)
        with torch.no_grad():
            try:
                for t in range(start, total):
                    epoch, position = divmod(t, per_epoch)
                    if epoch != order_epoch:  # every run's permutation of this epoch: (S, N)
                        order = torch.stack([epoch_permutation(s, epoch, num_examples)
                                             for s in seeds]).to(self.device)
                        order_epoch = epoch
                    index = order[:, position * batch_size:(position + 1) * batch_size]
                    size = index.shape[1]
                    flat = index.reshape(-1)  # one gather for all runs' minibatches
                    x = torch.index_select(self.inputs, 0, flat, out=x_buffer[:flat.numel()])
                    y = torch.index_select(self.targets, 0, flat, out=y_buffer[:flat.numel()])
                    x = x.view(runs, size, *example_shape)
                    y = y.view(runs, size, *target_shape)
                    new_params, new_state, loss, rate = self._step(snapshot[1], snapshot[2], x, y)
                    losses[:, t] = loss
                    rates[:, t] = rate
                    if validate and (position == per_epoch - 1 or t == total - 1):
                        v_loss, v_acc = self.evaluate(new_params, self.val_inputs, self.val_targets)
                        val_loss[:, epoch] = v_loss
                        if v_acc is not None:
                            val_acc[:, epoch] = v_acc
                    snapshot = (t + 1, new_params, new_state)
                    if progress is not None:
                        progress.update(1)
                    done = t + 1
                    if checkpoint is not None and done < total and self._due(done, last_save):
                        self._save(checkpoint, keys, total, *snapshot, losses, rates, val_loss,
                                   val_acc)
                        saved_at, last_save = done, time.monotonic()
            except KeyboardInterrupt:  # Ctrl-C / SIGINT: keep the steps trained so far
                if checkpoint is not None and saved_at < snapshot[0] < total:
                    self._save(checkpoint, keys, total, *snapshot, losses, rates, val_loss, val_acc)
                raise
            params = snapshot[1]
            if self.config.eval_final:
                final = self.full_loss(params)
            else:
                final = losses[:, -1].double()
        classify = self.problem.classifies
        return ChunkResult(tuple(keys), losses.cpu().numpy(), rates.cpu().numpy(),
                           final.cpu().numpy(), per_epoch,
                           val_loss.cpu().numpy() if validate else None,
                           val_acc.cpu().numpy() if validate and classify else None)

    def _due(self, done: int, last_save: float) -> bool:
        if self.config.checkpoint_every:
            return done % self.config.checkpoint_every == 0
        return time.monotonic() - last_save >= self.config.checkpoint_seconds

    @staticmethod
    def _save(path: str | Path, keys: tuple, total: int, step: int, params: dict, state: Any,
              losses: torch.Tensor, rates: torch.Tensor, val_loss: torch.Tensor,
              val_accuracy: torch.Tensor) -> None:
        save_checkpoint(Path(path), {"keys": list(keys), "total": total, "step": step,
                                     "params": params, "state": state,
                                     "losses": losses[:, :step].clone(),
                                     "rates": rates[:, :step].clone(),
                                     "val_loss": val_loss.clone(),
                                     "val_accuracy": val_accuracy.clone()})


# ----------------------------------------------------------------------------- whole studies


# On a CPU, a chunk's stacked parameters stay under this size: past it every parameter-sized
# intermediate of the vmapped step is a fresh allocation of hundreds of MB (page faults, no cache
# reuse). The paper's MLP (1.8 M parameters, float32), 10 steps of Adam at 1 thread: 57-59 ms per
# run-step at chunks of 1, 4 and 8 runs (≤ 58 MB), 82 ms at 16 (115 MB), 104 ms at 32 (230 MB);
# the training is bit-identical at every chunk size (docs/benchmarks-studies.md, "Chunk size on a
# CPU"; evaluations, batched by chunk, agree to float rounding).
CPU_CHUNK_PARAMETER_BYTES = 64 << 20


def choose_chunk_size(config: StudyConfig, problem: Problem, device: torch.device) -> int:
    """The most runs of any optimizer that fit the device's memory (at least 1); on a CPU, also
    at most as many as keep the chunk's stacked parameters under
    :data:`CPU_CHUNK_PARAMETER_BYTES`.

    Args:
        config: the study (its ``chunk_size``, if set, is returned as it is).
        problem: the study's problem.
        device: the device the study runs on.

    Returns:
        The number of runs trained at once.
    """
    if config.chunk_size is not None:
        return config.chunk_size
    element = torch.tensor([], dtype=getattr(torch, config.dtype)).element_size()
    # torch.optim optimizers (the loop path) train one run at a time: not sized here
    largest = max((bytes_per_run(problem, template_rule(spec, config), config.batch_size, element)
                   for spec in config.optimizer_specs if not spec.is_torch), default=1)
    runs_per_optimizer = len(config.seed_list) * max(
        len(config.lr0_for(s)) * len(config.betas_for(s)) for s in config.optimizer_specs)
    chunk = max(1, min(runs_per_optimizer, available_memory(device) // largest))
    if device.type == "cpu":
        chunk = min(chunk, max(1, CPU_CHUNK_PARAMETER_BYTES // (problem.num_parameters() * element)))
    return chunk


def study_problem(config: StudyConfig, problem: Problem | None = None) -> Problem:
    """The problem of ``config`` (or ``problem``) with its validation set as configured:
    ``validation_fraction`` None keeps the problem's standard one (if any), 0 removes it, a
    fraction holds out that share of the training examples (:func:`problems.hold_out`).

    Args:
        config: the study.
        problem: a problem to use instead of the one ``config`` names, or None.

    Returns:
        The problem.
    """
    import dataclasses

    from hdfunc.studies.problems import hold_out
    problem = problem or make_problem(config.problem, **config.problem_options)
    fraction = config.validation_fraction
    if fraction is None:
        return problem
    if fraction == 0:
        return dataclasses.replace(problem, val_inputs=None, val_targets=None, val_description="")
    return hold_out(problem, float(fraction))


def run_study(config: StudyConfig, out_dir: str | Path | None = None, *, resume: bool = False,
              progress: bool = True, plots: bool = True, problem: Problem | None = None):
    """Run a whole study; returns :class:`hdfunc.studies.results.StudyResults`.

    With ``out_dir`` the per-step CSV and the summary JSON are written there chunk by chunk
    (durably and verifiably), with mid-chunk checkpoints, statistics and plots; ``resume=True``
    continues a study that was interrupted (or damaged) there: it keeps every finished chunk whose
    rows are intact, retrains the rest and ends identical to an uninterrupted study, or refuses
    before training (:class:`~hdfunc.studies.storage.StudyError`, no file changed). Without
    ``out_dir`` everything stays in memory.

    Args:
        config: the study.
        out_dir: the folder of the study's files, or None (results in memory only).
        resume: continue the study already in ``out_dir``.
        progress: show progress bars.
        plots: write the plots (with ``out_dir``).
        problem: a problem to use instead of the one ``config`` names, or None.

    Returns:
        results (hdfunc.studies.results.StudyResults): The study's results.

    Raises:
        TypeError: ``config`` is not a :class:`StudyConfig`.
        hdfunc.studies.storage.StudyError: ``resume`` with files that do not match ``config``.
    """
    from hdfunc.studies.results import MemoryCollector, StudyWriter
    from hdfunc.studies.torch_optimizers import make_trainer, note_performance

    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
    if out_dir is not None:
        check_output_folder(Path(out_dir))  # before loading any data
    problem = study_problem(config, problem)
    device = resolve_device(config.device)
    if out_dir is not None:
        sink = StudyWriter(out_dir, config, problem, resume=resume)
        chunk_size = sink.chunk_size or choose_chunk_size(config, problem, device)
        chunks = plan_chunks(config, chunk_size)
        sink.start(chunk_size, chunks)  # creates, or checks and repairs, before any training
    else:
        sink = MemoryCollector(config, problem)
        chunks = plan_chunks(config, choose_chunk_size(config, problem, device))
    todo = [c for c in chunks if not sink.is_done(c.id)]
    bar = outer = None
    if progress:
        from hdfunc._progress import progress_bar
        outer = progress_bar(total=len(chunks), initial=len(chunks) - len(todo), desc="chunks", unit="chunk")
        bar = progress_bar(total=1, desc="steps", unit="step", leave=False)
    trainers: dict[str, BatchedTrainer] = {}
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        for chunk in todo:
            if chunk.spec.label not in trainers:
                trainers.clear()  # one optimizer at a time keeps memory down
                trainers[chunk.spec.label] = make_trainer(problem, chunk.spec, config, device)
            if bar is not None:
                bar.set_description(f"{chunk.spec.label} ({len(chunk.keys)} runs)")
            checkpoint = sink.checkpoint_path(chunk.id)
            resumed, started = checkpoint is not None and checkpoint.is_file(), time.perf_counter()
            result = trainers[chunk.spec.label].run(chunk.keys, checkpoint=checkpoint,
                                                    progress=bar)
            note_performance(result, trainers[chunk.spec.label], time.perf_counter() - started,
                             resumed)
            sink.add(chunk.id, result)
            if outer is not None:
                outer.update(1)
    finally:
        torch.set_num_threads(threads)
        for b in (bar, outer):
            if b is not None:
                b.close()
    return sink.finish(plots=plots)
