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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

import hdfunc
from hdfunc.studies.config import OptimizerSpec, RunKey, StudyConfig
from hdfunc.studies.problems import Problem, make_problem
from hdfunc.studies.storage import check_output_folder, load_checkpoint, save_checkpoint
from hdfunc.tree import tree_leaves, tree_stack

DATA_ORDER_STREAM = 1  # the seed sequence entropy tag of the minibatch order


# ----------------------------------------------------------------------------- per-seed randomness


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The order of the examples in epoch ``epoch`` of run seed ``seed`` (CPU, reproducible)."""
    state = np.random.SeedSequence([seed, DATA_ORDER_STREAM, epoch]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randperm(num_examples, generator=generator)


def minibatch_indices(seed: int, first_step: int, num_steps: int, num_examples: int,
                      batch_size: int) -> torch.Tensor:
    """Example indices of steps ``first_step .. first_step + num_steps - 1`` (0-based) of seed
    ``seed``: shape (num_steps, batch_size). Each epoch is a fresh permutation cut into
    ⌊N / batch_size⌋ full minibatches (the remainder is dropped, so all minibatches batch)."""
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_examples} examples)")
    rows, permutations = [], {}
    for step in range(first_step, first_step + num_steps):
        epoch, position = divmod(step, per_epoch)
        if epoch not in permutations:
            permutations[epoch] = epoch_permutation(seed, epoch, num_examples)
        rows.append(permutations[epoch][position * batch_size:(position + 1) * batch_size])
    return torch.stack(rows)


# ----------------------------------------------------------------------------- rules and trees


def make_rule(spec: OptimizerSpec, lr0: float, beta: float, config: StudyConfig) -> hdfunc.Rule:
    """The core rule of ``spec`` with α_0 = ``lr0`` (and β = ``beta`` for an HD rule), the
    study's weight decay and (for SGDN) momentum; the spec's own options take precedence."""
    kwargs: dict[str, Any] = {"weight_decay": config.weight_decay}
    if spec.base_name == "sgdn":
        kwargs["momentum"] = config.momentum
    kwargs.update(spec.kwargs())
    factory = hdfunc.RULES[spec.name]
    try:
        return factory(lr0, beta, **kwargs) if spec.is_hd else factory(lr0, **kwargs)
    except TypeError as error:
        raise TypeError(f"optimizer {spec.label!r}: {error}") from error


def template_rule(spec: OptimizerSpec, config: StudyConfig) -> hdfunc.Rule:
    """A rule of ``spec`` built with placeholder α_0 and β: its update function and state layout
    serve every run of ``spec``, whose own α_0 and β live in its state (the core reads them
    from there)."""
    return make_rule(spec, 1e-3, 1e-3 if spec.is_hd else 0.0, config)


def applied_rate(state: Any) -> torch.Tensor:
    """The learning rate the last step applied (γ_t; α_t unless transitioning), as one number:
    per-tensor / per-element rates are averaged over all their entries."""
    leaves = tree_leaves(hdfunc.get_applied_lr(state))
    if len(leaves) == 1 and leaves[0].dim() == 0:
        return leaves[0]
    return torch.cat([leaf.reshape(-1) for leaf in leaves]).mean()


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``; ``"auto"`` is CUDA when available, else the CPU."""
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
    """Numbers produced by the model's layers for one example (measured on the meta device)."""
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
    """Bytes a study may use: 70 % of the free GPU memory, or half the available host memory."""
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
    plus the minibatch's activations kept for the backward pass."""
    meta = {k: torch.empty_like(v, device="meta") for k, v in problem.template().named_parameters()}
    num_params = sum(v.numel() for v in meta.values())
    num_state = sum(x.numel() for x in tree_leaves(rule.init(meta)))
    example = int(np.prod(problem.inputs.shape[1:]))
    activations = batch_size * (3 * activation_elements(problem) + example)
    return element_size * (4 * num_params + num_state + activations)


# ----------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Chunk:
    """Runs of one optimizer trained together."""

    id: str
    spec: OptimizerSpec
    keys: tuple[RunKey, ...]


def plan_chunks(config: StudyConfig, chunk_size: int | Callable[[OptimizerSpec], int]) -> list[Chunk]:
    """Split each optimizer's runs (in canonical order) into consecutive chunks."""
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
    of a chunk, shape (S, T), and the final loss (whole training set, or last minibatch)."""

    keys: tuple[RunKey, ...]
    losses: np.ndarray
    rates: np.ndarray
    final_loss: np.ndarray


class BatchedTrainer:
    """Trains the runs of one optimizer on one problem, S at a time, with one vmapped step."""

    def __init__(self, problem: Problem, spec: OptimizerSpec, config: StudyConfig,
                 device: torch.device | str = "cpu"):
        self.problem, self.spec, self.config = problem, spec, config
        self.device = resolve_device(device)
        self.dtype = getattr(torch, config.dtype)
        inputs = problem.inputs
        self.inputs = (inputs.to(self.dtype) if inputs.is_floating_point() else inputs).to(self.device)
        targets = problem.targets
        self.targets = (targets.to(self.dtype) if targets.is_floating_point() else targets).to(self.device)
        self.template = problem.template()
        self.num_steps = config.num_steps(problem.num_examples)
        self.rule = template_rule(spec, config)
        self._step = self._make_step()

    # ------------------------------------------------------------------ the batched functions

    def loss(self, params: dict, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.problem.loss_fn(functional_call(self.template, params, (inputs,)), targets)

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
        ``torch.func.stack_module_state``) and states (each run: ``rule.init`` with its α_0, β)."""
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
        """Mean loss over the whole training set of each run (shape (S,)), in data batches."""
        runs = tree_leaves(params)[0].shape[0]
        per_example = activation_elements(self.problem)
        batch = max(1, min(self.problem.num_examples, max_elements // max(1, runs * per_example)))
        batched = vmap(self.loss, in_dims=(0, None, None))
        total = torch.zeros(runs, dtype=torch.float64, device=self.device)
        for start in range(0, self.problem.num_examples, batch):
            x = self.inputs[start:start + batch]
            total += batched(params, x, self.targets[start:start + batch]).double() * x.shape[0]
        return total / self.problem.num_examples

    # ------------------------------------------------------------------ training

    def run(self, keys: tuple[RunKey, ...], *, checkpoint: str | Path | None = None,
            progress: Any = None, steps: int | None = None) -> ChunkResult:
        """Train the runs ``keys`` for the study's number of steps (or ``steps``), resuming from
        and saving to ``checkpoint`` (a ``.pt`` file) when given. ``progress``: a tqdm bar."""
        total = self.num_steps if steps is None else steps
        runs = len(keys)
        start, params, state = 0, None, None
        losses = torch.empty(runs, total, dtype=self.dtype, device=self.device)
        rates = torch.empty(runs, total, dtype=torch.float64, device=self.device)
        if checkpoint is not None and Path(checkpoint).is_file():
            saved = load_checkpoint(Path(checkpoint), map_location=self.device)
            if tuple(saved["keys"]) != tuple(keys) or saved["total"] != total:
                raise ValueError(f"checkpoint {checkpoint} belongs to other runs; delete it")
            start, params, state = saved["step"], saved["params"], saved["state"]
            losses[:, :start], rates[:, :start] = saved["losses"], saved["rates"]
        else:
            params, state = self.initial(keys)
        if progress is not None:
            progress.reset(total=total)
            progress.update(start)
        seeds = [k.seed for k in keys]
        block = max(1, min(total, (1 << 22) // max(1, runs * self.config.batch_size)))
        last_save = time.monotonic()
        # (steps done, params, state) as one value, replaced in a single assignment after the
        # step's loss and rate are stored: whenever an interrupt lands, it is consistent
        snapshot = (start, params, state)
        saved_at = start
        with torch.no_grad():
            try:
                for block_start in range(start, total, block):
                    count = min(block, total - block_start)
                    indices = torch.stack([
                        minibatch_indices(s, block_start, count, self.problem.num_examples,
                                          self.config.batch_size) for s in seeds],
                        dim=1).to(self.device)
                    for offset in range(count):
                        t = block_start + offset
                        batch = indices[offset]  # (S, B)
                        new_params, new_state, loss, rate = self._step(
                            snapshot[1], snapshot[2], self.inputs[batch], self.targets[batch])
                        losses[:, t] = loss
                        rates[:, t] = rate
                        snapshot = (t + 1, new_params, new_state)
                        if progress is not None:
                            progress.update(1)
                        done = t + 1
                        if checkpoint is not None and done < total and self._due(done, last_save):
                            self._save(checkpoint, keys, total, *snapshot, losses, rates)
                            saved_at, last_save = done, time.monotonic()
            except KeyboardInterrupt:  # Ctrl-C / SIGINT: keep the steps trained so far
                if checkpoint is not None and saved_at < snapshot[0] < total:
                    self._save(checkpoint, keys, total, *snapshot, losses, rates)
                raise
            params = snapshot[1]
            if self.config.eval_final:
                final = self.full_loss(params)
            else:
                final = losses[:, -1].double()
        return ChunkResult(tuple(keys), losses.cpu().numpy(), rates.cpu().numpy(),
                           final.cpu().numpy())

    def _due(self, done: int, last_save: float) -> bool:
        if self.config.checkpoint_every:
            return done % self.config.checkpoint_every == 0
        return time.monotonic() - last_save >= self.config.checkpoint_seconds

    @staticmethod
    def _save(path: str | Path, keys: tuple, total: int, step: int, params: dict, state: Any,
              losses: torch.Tensor, rates: torch.Tensor) -> None:
        save_checkpoint(Path(path), {"keys": list(keys), "total": total, "step": step,
                                     "params": params, "state": state,
                                     "losses": losses[:, :step].clone(),
                                     "rates": rates[:, :step].clone()})


# ----------------------------------------------------------------------------- whole studies


def choose_chunk_size(config: StudyConfig, problem: Problem, device: torch.device) -> int:
    """The most runs of any optimizer that fit the device's memory (at least 1)."""
    if config.chunk_size is not None:
        return config.chunk_size
    element = torch.tensor([], dtype=getattr(torch, config.dtype)).element_size()
    largest = max(bytes_per_run(problem, template_rule(spec, config), config.batch_size, element)
                  for spec in config.optimizer_specs)
    runs_per_optimizer = len(config.lr0) * len(config.seed_list) * max(
        len(config.betas_for(s)) for s in config.optimizer_specs)
    return max(1, min(runs_per_optimizer, available_memory(device) // largest))


def run_study(config: StudyConfig, out_dir: str | Path | None = None, *, resume: bool = False,
              progress: bool = True, plots: bool = True, problem: Problem | None = None):
    """Run a whole study; returns :class:`hdfunc.studies.results.StudyResults`.

    With ``out_dir`` the per-step CSV and the summary JSON are written there chunk by chunk
    (durably and verifiably), with mid-chunk checkpoints, statistics and plots; ``resume=True``
    continues a study that was interrupted (or damaged) there: it keeps every finished chunk whose
    rows are intact, retrains the rest and ends identical to an uninterrupted study, or refuses
    before training (:class:`~hdfunc.studies.storage.StudyError`, no file changed). Without
    ``out_dir`` everything stays in memory.
    """
    from hdfunc.studies.results import MemoryCollector, StudyWriter

    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
    if out_dir is not None:
        check_output_folder(Path(out_dir))  # before loading any data
    problem = problem or make_problem(config.problem, **config.problem_options)
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
                trainers[chunk.spec.label] = BatchedTrainer(problem, chunk.spec, config, device)
            if bar is not None:
                bar.set_description(f"{chunk.spec.label} ({len(chunk.keys)} runs)")
            result = trainers[chunk.spec.label].run(chunk.keys, checkpoint=sink.checkpoint_path(chunk.id),
                                                    progress=bar)
            sink.add(chunk.id, result)
            if outer is not None:
                outer.update(1)
    finally:
        torch.set_num_threads(threads)
        for b in (bar, outer):
            if b is not None:
                b.close()
    return sink.finish(plots=plots)
