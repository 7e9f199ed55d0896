"""Study results on disk and in memory.

An output folder holds

* ``steps.csv``     tidy per-step table: optimizer, lr0, beta, seed, step, epoch, loss, lr
                    (loss: minibatch loss at θ_{t-1}; lr: the rate γ_t that step t applied)
* ``summary.json``  the configuration, one record per finished run (final loss over the whole
                    training set, per-epoch metrics: mean minibatch loss, mean α, validation
                    loss and accuracy; iterations to a target loss; divergence), the bookkeeping
                    of finished chunks and, once the study is complete, its statistics
* ``checkpoints/``  mid-chunk checkpoints of the chunk in progress (deleted when it finishes)
* ``plots/``        PNG figures (see :mod:`hdfunc.studies.plots`)
* ``performance.json`` per chunk: its path (``vmap``: a functional rule, all runs in one vmapped
                    step; ``loop``: a ``torch.optim.Optimizer``, run after run), run-steps, wall
                    seconds and optimizer-state bytes per run (timings, not results: written
                    plainly after each chunk's results, not checksummed, not compared on resume;
                    one torn by a kill reads as empty)

Writes are durable and verifiable (:mod:`hdfunc.studies.storage`): a finished chunk's rows are
appended to the CSV and fsynced, then ``summary.json`` is replaced atomically, recording where the
chunk's rows end and their SHA-256 (the summary carries a checksum of itself; checkpoints carry
one of their payload). Resuming (``resume=True``) keeps the longest prefix of finished chunks whose
rows are intact, cuts anything after it, discards damaged checkpoints and retrains the rest, so it
ends byte-identical to an uninterrupted study; what it cannot recover (a damaged ``summary.json``,
a checkpoint of other runs) it refuses before training, changing no file.
A run whose loss becomes non-finite is recorded as diverged (its losses as nan/inf).
"""

from __future__ import annotations

import csv
import io
import json
import itertools
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, TextIO

import numpy as np

import hdfunc
from hdfunc.studies.config import METRICS, RunKey, StudyConfig
from hdfunc.studies.stats import finite_or_none
from hdfunc.studies.storage import (CheckpointDamagedError, StudyDamagedError, StudyError,
                                    intact_chunks, load_checkpoint, output_error,
                                    prepare_output_folder, read_prefix, read_summary, sha256,
                                    temporary_path, write_bytes_atomic, write_summary)

if TYPE_CHECKING:
    from hdfunc.studies.engine import Chunk

CSV_COLUMNS = ["optimizer", "lr0", "beta", "seed", "step", "epoch", "loss", "lr"]
CSV_HEADER = (",".join(CSV_COLUMNS) + "\n").encode()
#: the columns of studies of format 1 and 2 (no epoch column; epochs of ⌊N/B⌋ full minibatches)
OLD_CSV_COLUMNS = ["optimizer", "lr0", "beta", "seed", "step", "loss", "lr"]
OLD_CSV_HEADER = (",".join(OLD_CSV_COLUMNS) + "\n").encode()
#: 2: checksummed summary with per-chunk CSV records; 3: epochs of ⌈N/B⌉ steps by default
#: (drop_last), an epoch column, per-epoch and validation metrics per run
FORMAT_VERSION = 3


def csv_header(format_version: int) -> bytes:
    """The header line of ``steps.csv`` in a study of format ``format_version``."""
    return CSV_HEADER if format_version >= 3 else OLD_CSV_HEADER


@dataclass
class RunSummary:
    """The outcome of one run. Non-finite numbers are stored as ``None`` (JSON has no nan).

    Args:
        optimizer: the optimizer's label.
        lr0: α_0.
        beta: β (0 for a base optimizer).
        seed: the seed.
        final_loss: the loss over the whole training set at the end (or the last minibatch's if
            ``eval_final`` is off).
        last_batch_loss: the loss of the last minibatch.
        final_lr: the rate the last step applied.
        diverged: whether a loss became non-finite.
        diverged_step: the first step with a non-finite loss.
        epochs: the number of epochs (the last may be partial when ``steps`` is given).
        epoch_loss: the mean minibatch training loss of the last epoch.
        val_loss: the validation loss after the last step (None: no validation set).
        val_accuracy: the validation accuracy after the last step (None: none, or a regression).
        best_val_loss: the lowest validation loss after any epoch.
        iterations_to_target: the first step at which the minibatch loss averaged over the last
            ``target_window`` steps is <= ``target_loss`` (None: never, or no target set).
        epoch_metrics: per epoch e = 1..E: ``step`` (its last step), ``train_loss`` (mean
            minibatch loss), ``lr`` (mean applied rate), ``val_loss``, ``val_accuracy``.
    """

    optimizer: str
    lr0: float
    beta: float
    seed: int
    final_loss: float | None  # whole training set (or last minibatch if eval_final is off)
    last_batch_loss: float | None
    final_lr: float | None
    diverged: bool
    diverged_step: int | None  # first step with a non-finite loss
    epochs: int = 0
    epoch_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    best_val_loss: float | None = None
    iterations_to_target: int | None = None
    epoch_metrics: dict = field(default_factory=dict)

    @property
    def key(self) -> RunKey:
        """The run's :class:`RunKey` (optimizer, α_0, β, seed)."""
        return RunKey(self.optimizer, self.lr0, self.beta, self.seed)

    @property
    def final(self) -> float:
        """The final loss, +inf for a diverged run (so it ranks last)."""
        return math.inf if self.final_loss is None or self.diverged else self.final_loss

    def metric(self, name: str) -> float:
        """The run's value of metric ``name`` (:data:`hdfunc.studies.config.METRICS`); a diverged
        run, or a missing value (target never reached), counts as the worst: +inf, or -inf for a
        metric where higher is better (accuracy)."""
        if name == "final_loss":
            return self.final
        worst = -math.inf if METRICS[name] else math.inf
        value = getattr(self, name)
        if value is None or (self.diverged and name != "iterations_to_target"):
            return worst
        return float(value)


def iterations_to_target(losses: np.ndarray, target: float, window: int) -> int | None:
    """The first step t (1-based) at which the mean of the minibatch losses of steps
    max(1, t - window + 1)..t is <= ``target``; None if never (a non-finite loss never counts).

    Args:
        losses: the minibatch losses of steps 1..T.
        target: the loss to reach.
        window: the steps averaged (a trailing moving average).

    Returns:
        The step, or None.
    """
    x = np.where(np.isfinite(losses), np.asarray(losses, dtype=np.float64), np.nan)
    total = np.concatenate([[0.0], np.cumsum(x)])
    t = np.arange(1, len(x) + 1)
    low = np.maximum(0, t - window)
    with np.errstate(invalid="ignore"):
        mean = (total[t] - total[low]) / (t - low)
        hits = np.flatnonzero(mean <= target)
    return int(hits[0]) + 1 if hits.size else None


def epoch_means(values: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """The mean of ``values`` (steps 1..T) over each epoch's steps (the last epoch may be partial).

    Args:
        values: one number per step.
        steps_per_epoch: the steps of a full epoch.

    Returns:
        One mean per epoch (nan where a value is not finite).
    """
    values = np.asarray(values, dtype=np.float64)
    return np.array([values[e:e + steps_per_epoch].mean()
                     for e in range(0, len(values), steps_per_epoch)])


def _numbers(values: Iterable[float]) -> list[float | None]:
    return [finite_or_none(v) for v in values]


def summarize(result: Any, config: StudyConfig | None = None) -> list[RunSummary]:
    """One :class:`RunSummary` per run of a :class:`~hdfunc.studies.engine.ChunkResult`.

    Args:
        result: a finished chunk's ``ChunkResult``.
        config: the study (for ``target_loss`` and ``target_window``).

    Returns:
        The summaries, in the chunk's order of runs.
    """
    out = []
    total = result.losses.shape[1]
    per_epoch = result.steps_per_epoch or total
    last_steps = [min(e + per_epoch, total) for e in range(0, total, per_epoch)]
    target = None if config is None else config.target_loss
    for i, key in enumerate(result.keys):
        losses = result.losses[i]
        bad = np.flatnonzero(~np.isfinite(losses))
        final = float(result.final_loss[i])
        diverged = bool(bad.size) or not math.isfinite(final)
        epoch_loss = epoch_means(losses, per_epoch)
        metrics = {"step": last_steps, "train_loss": _numbers(epoch_loss),
                   "lr": _numbers(epoch_means(result.rates[i], per_epoch))}
        val_loss = val_accuracy = best = None
        if result.val_loss is not None:
            metrics["val_loss"] = _numbers(result.val_loss[i])
            val_loss = metrics["val_loss"][-1]
            finite = [v for v in metrics["val_loss"] if v is not None]
            best = min(finite) if finite and not diverged else None
        if result.val_accuracy is not None:
            metrics["val_accuracy"] = _numbers(result.val_accuracy[i])
            val_accuracy = metrics["val_accuracy"][-1]
        reached = (iterations_to_target(losses, target, config.target_window)
                   if target is not None else None)
        out.append(RunSummary(key.optimizer, key.lr0, key.beta, key.seed, finite_or_none(final),
                              finite_or_none(losses[-1]), finite_or_none(result.rates[i, -1]),
                              diverged, int(bad[0]) + 1 if bad.size else None,
                              len(last_steps), finite_or_none(epoch_loss[-1]), val_loss,
                              val_accuracy, best, reached, metrics))
    return out


def logged_steps(total: int, log_every: int) -> np.ndarray:
    """1-based steps written to the CSV: every ``log_every``-th, plus the first and the last.

    Args:
        total: the number of steps of a run.
        log_every: the logging interval.

    Returns:
        The sorted step numbers (int64).
    """
    steps = set(range(log_every, total + 1, log_every)) | {1, total}
    return np.array(sorted(steps), dtype=np.int64)


def csv_text(result: Any, log_every: int) -> str:
    """The CSV rows of a chunk, run by run, step by step (floats written exactly).

    Args:
        result: a finished chunk's ``ChunkResult``.
        log_every: the logging interval (:func:`logged_steps`).

    Returns:
        The rows (no header), each ending in a newline.
    """
    steps = logged_steps(result.losses.shape[1], log_every)
    epochs = ((steps - 1) // (result.steps_per_epoch or result.losses.shape[1]) + 1).tolist()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for i, key in enumerate(result.keys):
        losses = result.losses[i, steps - 1].tolist()
        rates = result.rates[i, steps - 1].tolist()
        head = [key.optimizer, repr(float(key.lr0)), repr(float(key.beta)), key.seed]
        writer.writerows(head + [s, e, repr(loss), repr(rate)]
                         for s, e, loss, rate in zip(steps.tolist(), epochs, losses, rates))
    return buffer.getvalue()


# ----------------------------------------------------------------------------- results object


@dataclass
class StudyResults:
    """A finished (or partly finished) study: run summaries plus loss/rate curves per run.

    Args:
        config: the study's configuration.
        problem: the problem's description.
        runs: one summary per finished run, in the canonical order.
        steps: the logged step numbers.
        curves: run -> (losses, rates) at the logged steps.
        statistics: the output of :func:`hdfunc.studies.stats.study_statistics`.
        out_dir: the study's folder (None for a study kept in memory).
        performance: per chunk id, its path, runs, run-steps, seconds and optimizer-state bytes
            per run (:func:`performance_table` aggregates them per optimizer).
    """

    config: StudyConfig
    problem: str
    runs: list[RunSummary]
    steps: np.ndarray  # the logged step numbers
    curves: dict[RunKey, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    statistics: dict | None = None
    out_dir: Path | None = None
    performance: dict = field(default_factory=dict)

    def run(self, optimizer: str, lr0: float, beta: float, seed: int) -> RunSummary:
        """The summary of one run.

        Args:
            optimizer: the optimizer's label.
            lr0: α_0.
            beta: β (0 for a base optimizer).
            seed: the seed.

        Returns:
            The run's summary.

        Raises:
            KeyError: the study has no such run.
        """
        for r in self.runs:
            if r.key == (optimizer, lr0, beta, seed):
                return r
        raise KeyError(f"no run {(optimizer, lr0, beta, seed)} in this study")

    def final_losses(self, optimizer: str, lr0: float, beta: float | None = None) -> dict[int, float]:
        """{seed: final loss (+inf if diverged)} of one optimizer at α_0 (and β).

        Args:
            optimizer: the optimizer's label.
            lr0: α_0.
            beta: β (None: any).

        Returns:
            Seed -> final loss.
        """
        return {r.seed: r.final for r in self.runs if r.optimizer == optimizer and r.lr0 == lr0
                and (beta is None or r.beta == beta)}

    def metric_values(self, metric: str, optimizer: str, lr0: float,
                      beta: float | None = None) -> dict[int, float]:
        """{seed: value of ``metric``} of one optimizer at α_0 (and β); worst values for diverged
        runs (:meth:`RunSummary.metric`).

        Args:
            metric: a name of :data:`hdfunc.studies.config.METRICS`.
            optimizer: the optimizer's label.
            lr0: α_0.
            beta: β (None: any).

        Returns:
            Seed -> value.
        """
        return {r.seed: r.metric(metric) for r in self.runs if r.optimizer == optimizer
                and r.lr0 == lr0 and (beta is None or r.beta == beta)}

    def available_metrics(self) -> list[str]:
        """The metrics this study measured: final and epoch loss always, validation metrics when
        it had a validation set, iterations to the target when ``target_loss`` is set."""
        names = ["final_loss", "epoch_loss"]
        if any("val_loss" in r.epoch_metrics for r in self.runs):
            names += ["val_loss", "best_val_loss"]
        if any("val_accuracy" in r.epoch_metrics for r in self.runs):
            names.append("val_accuracy")
        if self.config.target_loss is not None:
            names.append("iterations_to_target")
        return names

    def summary_table(self, metric: str | None = None) -> str:
        """The statistics as a text table (:func:`hdfunc.studies.stats.format_table`).

        Args:
            metric: the metric tabulated (default: the study's ``metric``).

        Returns:
            The table.
        """
        from hdfunc.studies.stats import format_performance, format_table
        table = format_table(self.statistics or {}, metric)
        speed = format_performance(performance_table(self.performance))
        return table + ("\n\n" + speed if speed else "")


def performance_table(performance: dict) -> list[dict]:
    """Per optimizer: its path, run-steps timed, seconds, milliseconds per run-step, run-steps
    per second and optimizer-state bytes per run, from the chunk records of ``performance.json``
    (chunks resumed from a checkpoint are left out where the optimizer has others).

    Args:
        performance: chunk id -> record (``StudyResults.performance``).

    Returns:
        One row per optimizer, in the order of the chunks.
    """
    groups: dict[str, list] = {}
    for record in performance.values():
        groups.setdefault(record["optimizer"], []).append(record)
    rows = []
    for optimizer, records in groups.items():
        whole = [r for r in records if not r.get("resumed")] or records
        run_steps = sum(r["run_steps"] for r in whole)
        seconds = sum(r["seconds"] for r in whole)
        rows.append({"optimizer": optimizer, "path": records[0]["path"], "run_steps": run_steps,
                     "seconds": seconds,
                     "ms_per_run_step": 1000 * seconds / run_steps if run_steps else None,
                     "run_steps_per_second": run_steps / seconds if seconds > 0 else None,
                     "state_bytes": max(r["state_bytes"] for r in records)})
    return rows


def performance_record(chunk_id: str, result: Any) -> dict | None:
    """The ``performance.json`` record of a finished chunk (None if its trainer timed nothing).

    Args:
        chunk_id: the chunk.
        result: its ``ChunkResult`` with ``performance`` (the optimizer: its runs' label).

    Returns:
        The record, or None.
    """
    performance = getattr(result, "performance", None)
    if performance is None:
        return None
    return {"optimizer": result.keys[0].optimizer, **performance}


def print_summary(results: StudyResults, file: TextIO | None = None) -> None:
    """Print a compact table: median final loss [95% CI] per optimizer and α_0, and the paired
    HD-vs-base tests.

    Args:
        results: the study.
        file: where to print (default stdout).
    """
    print(results.summary_table(), file=file or sys.stdout)


def _sort_runs(config: StudyConfig, runs: Iterable[RunSummary]) -> list[RunSummary]:
    order = {key: i for i, key in enumerate(config.runs())}
    return sorted(runs, key=lambda r: order.get(r.key, len(order)))


def _finish(config: StudyConfig, problem: str, runs: list[RunSummary], steps: np.ndarray,
            curves: dict, out_dir: Path | None, performance: dict | None = None) -> StudyResults:
    from hdfunc.studies.stats import study_statistics
    results = StudyResults(config, problem, _sort_runs(config, runs), steps, curves, None, out_dir,
                           dict(performance or {}))
    results.statistics = study_statistics(results)
    return results


class MemoryCollector:
    """Keeps a study's results in memory (``run_study`` without an output folder).

    Args:
        config: the study's configuration.
        problem: the study's problem (its description is kept).
    """

    def __init__(self, config: StudyConfig, problem: Any):
        self.config, self.problem = config, problem.description
        self.runs: list[RunSummary] = []
        self.curves: dict = {}
        self.steps = np.zeros(0, dtype=np.int64)
        self.performance: dict = {}

    def is_done(self, chunk_id: str) -> bool:
        """Whether a chunk is finished: never, in memory.

        Args:
            chunk_id: the chunk.

        Returns:
            False.
        """
        return False

    def checkpoint_path(self, chunk_id: str) -> None:
        """Where a chunk's checkpoint goes: nowhere, in memory.

        Args:
            chunk_id: the chunk.

        Returns:
            None.
        """
        return None

    def add(self, chunk_id: str, result: Any) -> None:
        """Keep a finished chunk's summaries and curves.

        Args:
            chunk_id: the chunk.
            result: its ``ChunkResult``.
        """
        self.runs += summarize(result, self.config)
        record = performance_record(chunk_id, result)
        if record is not None:
            self.performance[chunk_id] = record
        self.steps = logged_steps(result.losses.shape[1], self.config.log_every)
        for i, key in enumerate(result.keys):
            self.curves[key] = (result.losses[i, self.steps - 1].astype(np.float64),
                                result.rates[i, self.steps - 1].astype(np.float64))

    def finish(self, plots: bool = False) -> StudyResults:
        """The study's results with their statistics.

        Args:
            plots: ignored (a study in memory has no folder for figures).

        Returns:
            The results.
        """
        return _finish(self.config, self.problem, self.runs, self.steps, self.curves, None,
                       self.performance)


# ----------------------------------------------------------------------------- files


class StudyRecoveryWarning(UserWarning):
    """Resuming repaired a study folder (dropped damaged rows or checkpoints to retrain them)."""


def new_summary(config: StudyConfig, problem: str, num_steps: int, chunk_size: int | None,
                csv_bytes: int, runs: list[RunSummary]) -> dict:
    """The contents of a study's ``summary.json`` before its statistics are computed.
    ``chunks``: per finished chunk, in order, its id, number of runs, where its rows end in
    ``steps.csv`` and their SHA-256.

    Args:
        config: the study's configuration.
        problem: the problem's description.
        num_steps: the steps of each run.
        chunk_size: the runs per chunk (None for a merged study).
        csv_bytes: the bytes of ``steps.csv`` the summary vouches for.
        runs: the finished runs.

    Returns:
        The summary (without its checksum: :func:`hdfunc.studies.storage.write_summary` adds it).
    """
    return {"format": FORMAT_VERSION, "hdfunc_version": hdfunc.__version__,
            "config": config.to_dict(), "problem": problem, "num_steps": num_steps,
            "chunk_size": chunk_size, "complete": False, "completed_chunks": [], "chunks": [],
            "csv_bytes": csv_bytes, "runs": [asdict(r) for r in runs], "statistics": None}


def resume_command(out: Path) -> str:
    """The command that resumes the study in ``out``, for messages.

    Args:
        out: the study's folder.

    Returns:
        The command, in backquotes.
    """
    return f"`hdfunc study --resume --out {out}` with the same settings"


@contextmanager
def writing_into(out: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing the study into a one-line :class:`StudyOutputError`.

    Args:
        out: the study's folder.

    Yields:
        Nothing: the body runs inside.

    Raises:
        StudyOutputError: the body raised an ``OSError``.
    """
    try:
        yield
    except OSError as error:
        raise output_error(out, error) from None


@dataclass
class Recovery:
    """What resuming changes in a study folder before training, decided without writing.

    Args:
        kept_chunks: the finished chunks whose rows are intact.
        csv_end: the bytes of ``steps.csv`` that stay.
        rewrite_csv: the header itself is damaged: start ``steps.csv`` again.
        discard: stale or damaged checkpoints, temporary files.
        notes: what was repaired, for the user.
    """

    kept_chunks: int  # finished chunks whose rows are intact
    csv_end: int  # bytes of steps.csv that stay
    rewrite_csv: bool  # the header itself is damaged: start steps.csv again
    discard: list[Path]  # stale or damaged checkpoints, temporary files
    notes: list[str]  # what was repaired, for the user


class StudyWriter:
    """Writes a study's results to ``out_dir`` durably and resumes one (module docstring).

    Args:
        out_dir: the study's folder.
        config: the study's configuration.
        problem: the study's problem.
        resume: continue the study already in ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` holds a study and ``resume`` is False.
        StudyDamagedError: the folder's files are damaged or do not match.
        StudyError: the folder cannot be resumed (another format, a merged study).
        ValueError: the folder holds a different study.
    """

    def __init__(self, out_dir: str | Path, config: StudyConfig, problem: Any, *, resume: bool):
        self.out = Path(out_dir)
        self.config = config
        self.problem = problem.description
        self.num_steps = config.num_steps(problem.num_examples)
        self.summary_path = self.out / "summary.json"
        self.csv_path = self.out / "steps.csv"
        self.chunk_size: int | None = None
        self.summary: dict | None = None
        with writing_into(self.out):  # e.g. a folder that cannot be read
            existing = self.summary_path.is_file()
            orphan_rows = not existing and not CSV_HEADER.startswith(
                read_prefix(self.csv_path, len(CSV_HEADER) + 1))
        if orphan_rows:
            raise StudyDamagedError(f"{self.csv_path} holds rows but {self.summary_path} is missing, "
                                    f"so they cannot be verified or continued; move {self.out} "
                                    f"aside (or delete steps.csv) and run the study again")
        if existing:
            if not resume:
                raise FileExistsError(f"{self.out} already holds a study (summary.json); pass "
                                      f"--resume (resume=True) to continue it, or choose another "
                                      f"output folder")
            self.summary = self._load_existing()
            self.chunk_size = self.summary["chunk_size"]

    @property
    def advice(self) -> str:
        """What to do about a damaged ``summary.json`` (the end of a refusal)."""
        return (f"restore it from a copy, or move {self.out} aside and run the study again; "
                f"nothing was changed")

    def _load_existing(self) -> dict:
        summary = read_summary(self.summary_path, f"cannot resume: {self.advice}")
        if summary["format"] != FORMAT_VERSION:
            raise StudyError(
                f"cannot resume {self.out}: its {self.summary_path.name} has format "
                f"{summary['format']}, this hdfunc writes format {FORMAT_VERSION} and resumes only "
                f"that; finish it with the hdfunc that started it, or run the study again")
        if "merged_from" in summary:
            raise StudyError(f"cannot resume {self.out}: it was merged from shards; resume "
                                    f"the shards (the same torchrun command with --resume)")
        try:
            stored = StudyConfig.from_dict(summary["config"]).identity()
        except (KeyError, TypeError, ValueError) as error:
            raise StudyDamagedError(f"{self.summary_path} holds no valid study configuration "
                                    f"({error}); {self.advice}") from None
        given = self.config.identity()
        if stored != given:
            differences = {k: (v, given.get(k)) for k, v in stored.items() if given.get(k) != v}
            raise ValueError(f"cannot resume {self.out}: it holds a different study "
                             f"(setting: (stored, given)) {differences}")
        return summary

    # ------------------------------------------------------------------ starting and resuming

    def start(self, chunk_size: int, chunks: Sequence[Chunk]) -> None:
        """Create the study's files, or (resuming) check those there against ``chunks`` (the
        study's plan) and repair what can be retrained.
        Either happens before any training; a refusal raises :class:`StudyError` and leaves every
        file as it was.

        Args:
            chunk_size: the runs per chunk.
            chunks: the study's chunks, in order.

        Raises:
            StudyError: resuming is refused (nothing is changed).
        """
        if self.summary is None:
            prepare_output_folder(self.out)
            with writing_into(self.out):
                write_bytes_atomic(self.csv_path, CSV_HEADER)
                self.summary = new_summary(self.config, self.problem, self.num_steps, chunk_size,
                                           len(CSV_HEADER), [])
                write_summary(self.summary_path, self.summary)
            return
        recovery = self._plan_recovery(chunks)
        prepare_output_folder(self.out)
        with writing_into(self.out):
            self._recover(recovery)
        for note in recovery.notes:
            warnings.warn(note, StudyRecoveryWarning, stacklevel=3)

    def _plan_recovery(self, chunks: Sequence[Chunk]) -> Recovery:
        summary = self.summary
        keys_of = {chunk.id: tuple(chunk.keys) for chunk in chunks}
        try:
            records = summary["chunks"]
            ids = [record["id"] for record in records]
            recorded_keys = [RunSummary(**run).key for run in summary["runs"]]
            planned_keys = [key for i in ids for key in keys_of.get(i, ())]
            consistent = (ids == [chunk.id for chunk in chunks][:len(ids)]
                          and summary["completed_chunks"] == ids
                          and all(record["runs"] == len(keys_of[record["id"]]) for record in records)
                          and recorded_keys == planned_keys)
        except (KeyError, TypeError) as error:
            raise StudyDamagedError(f"{self.summary_path} lacks {error}; {self.advice}") from None
        if not consistent:
            raise StudyDamagedError(f"{self.summary_path} does not match the chunks of this study; "
                                    f"{self.advice}")
        end = records[-1]["csv_end"] if records else len(CSV_HEADER)
        intact = intact_chunks(read_prefix(self.csv_path, end), CSV_HEADER, records)
        kept = max(intact, 0)
        notes = []
        if kept < len(records):
            part = "its header is" if intact < 0 else f"the rows of chunk {records[kept]['id']} are"
            notes.append(f"{self.csv_path}: {part} missing or damaged; retraining chunks "
                         f"{records[kept]['id']}..{records[-1]['id']} (the rows before stay)")
        done = set(ids[:kept])
        discard = [temporary_path(p) for p in (self.summary_path, self.csv_path)
                   if temporary_path(p).exists()]
        folder = self.out / "checkpoints"
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = re.fullmatch(r"chunk-(\w+)\.pt(\.tmp)?", path.name)
            if match is None or match[1] not in keys_of:
                continue  # not ours: never read, left alone
            if match[2] or match[1] in done:
                discard.append(path)  # a torn save, or the checkpoint of a finished chunk
                continue
            try:
                saved = load_checkpoint(path)
            except CheckpointDamagedError:
                discard.append(path)
                notes.append(f"{path} is damaged; chunk {match[1]} restarts from its first step")
                continue
            if (tuple(saved.get("keys", ())) != keys_of[match[1]] or saved.get("total") != self.num_steps
                    or not 0 < saved.get("step", -1) < self.num_steps):
                raise StudyDamagedError(f"cannot resume: {path} belongs to other runs; delete it "
                                        f"to retrain chunk {match[1]} from its first step "
                                        f"(nothing was changed)")
        return Recovery(kept, records[kept - 1]["csv_end"] if kept else len(CSV_HEADER),
                        intact < 0, discard, notes)

    def _recover(self, recovery: Recovery) -> None:
        """Apply ``recovery``: the summary first, so a kill in between leaves a longer
        ``steps.csv`` (a tail cut on the next resume), never a shorter one."""
        summary = self.summary
        kept = summary["chunks"][:recovery.kept_chunks]
        if len(kept) < len(summary["chunks"]):
            summary.update(chunks=kept, completed_chunks=[c["id"] for c in kept],
                           runs=summary["runs"][:sum(c["runs"] for c in kept)],
                           complete=False, statistics=None)
        summary["csv_bytes"] = recovery.csv_end
        summary["config"] = self.config.to_dict()  # runtime settings may change
        write_summary(self.summary_path, summary)
        if recovery.rewrite_csv or not self.csv_path.is_file():
            write_bytes_atomic(self.csv_path, CSV_HEADER)
        elif self.csv_path.stat().st_size > recovery.csv_end:  # only ever shortened
            os.truncate(self.csv_path, recovery.csv_end)
            with open(self.csv_path, "rb+") as f:
                os.fsync(f.fileno())
        for path in recovery.discard:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ chunks

    def is_done(self, chunk_id: str) -> bool:
        """Whether a chunk is finished (recorded in ``summary.json``).

        Args:
            chunk_id: the chunk.

        Returns:
            True if its rows are recorded.
        """
        return chunk_id in self.summary["completed_chunks"]

    def checkpoint_path(self, chunk_id: str) -> Path:
        """Where a chunk's mid-chunk checkpoint goes.

        Args:
            chunk_id: the chunk.

        Returns:
            ``out/checkpoints/chunk-<id>.pt``.
        """
        return self.out / "checkpoints" / f"chunk-{chunk_id}.pt"

    def add(self, chunk_id: str, result: Any) -> None:
        """Append a finished chunk's rows (fsynced), then record them in the summary.

        Args:
            chunk_id: the chunk.
            result: its ``ChunkResult``.

        Raises:
            StudyDamagedError: ``steps.csv`` changed while the study ran.
        """
        rows = csv_text(result, self.config.log_every).encode()
        start = self.summary["csv_bytes"]
        with writing_into(self.out):
            with open(self.csv_path, "ab") as f:
                if f.tell() != start:
                    raise StudyDamagedError(f"{self.csv_path} changed while the study ran ({f.tell()} "
                                            f"bytes, expected {start}); continue with "
                                            f"{resume_command(self.out)}")
                f.write(rows)
                f.flush()
                os.fsync(f.fileno())
            self.summary["chunks"].append({"id": chunk_id, "runs": len(result.keys),
                                           "csv_end": start + len(rows), "sha256": sha256(rows)})
            self.summary["csv_bytes"] = start + len(rows)
            self.summary["runs"] += [asdict(r) for r in summarize(result, self.config)]
            self.summary["completed_chunks"].append(chunk_id)
            self.summary["complete"] = False
            write_summary(self.summary_path, self.summary)
            self.checkpoint_path(chunk_id).unlink(missing_ok=True)
            record = performance_record(chunk_id, result)
            if record is not None:
                # timings, not results: written after them, plainly (no fsync, no rename), so a
                # kill mid-write can cost the timings (read back as none), never a result
                performance = read_performance(self.out)
                performance[chunk_id] = record
                (self.out / PERFORMANCE_FILE).write_text(json.dumps(performance, indent=1) + "\n")

    def finish(self, plots: bool = True) -> StudyResults:
        """Compute the statistics and draw the figures (:func:`finalize`).

        Args:
            plots: draw the figures.

        Returns:
            The results.
        """
        return finalize(self.out, plots=plots)


PERFORMANCE_FILE = "performance.json"


def read_performance(out: Path) -> dict:
    """The chunk records of ``out/performance.json`` ({} when missing or unreadable: timings are
    informative, never part of the results).

    Args:
        out: the study's folder.

    Returns:
        Chunk id -> record.
    """
    try:
        data = json.loads((Path(out) / PERFORMANCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def finalize(out_dir: str | Path, *, plots: bool = True) -> StudyResults:
    """Compute statistics (into summary.json, marked complete) and draw the plots.

    Args:
        out_dir: the study's folder.
        plots: draw the figures into ``out_dir/plots``.

    Returns:
        The results.
    """
    out = Path(out_dir)
    results = load_results(out)
    summary = read_summary(out / "summary.json", "run the study again")
    summary["statistics"] = results.statistics
    summary["complete"] = True
    with writing_into(out):
        write_summary(out / "summary.json", summary)
        checkpoints = out / "checkpoints"
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # no empty folder left behind
    if plots:
        from hdfunc.studies.plots import plot_study
        plot_study(results, out / "plots")
    return results


def csv_rows(lines: Iterable[str], source: Path) -> Iterator[list[str]]:
    """The data rows of study CSV text (``source`` names it in errors).

    Args:
        lines: the CSV text, line by line, header first.
        source: the file, for error messages.

    Yields:
        The fields of each data row.

    Raises:
        StudyDamagedError: the header is not a study CSV's.
    """
    reader = csv.reader(lines)
    header = next(reader, None)
    if header not in (CSV_COLUMNS, OLD_CSV_COLUMNS):
        raise StudyDamagedError(f"{source} is not a study CSV (header {header})")
    yield from reader


def verified_csv_text(out: Path, summary: dict) -> str:
    """The rows of ``out/steps.csv`` that ``summary`` records, checked against its chunk records
    (format 2) or its length (format 1); :class:`StudyDamagedError` saying what to do if not.

    Args:
        out: the study's folder.
        summary: its verified summary.

    Returns:
        The CSV text, header included.

    Raises:
        StudyDamagedError: rows are missing, damaged or not UTF-8.
    """
    csv_path, summary_path = out / "steps.csv", out / "summary.json"
    if "merged_from" in summary:
        fix = "merge the shards again (the same torchrun command with --resume)"
    else:
        fix = f"retrain the missing rows with {resume_command(out)}"
    data = read_prefix(csv_path, summary["csv_bytes"])
    if summary["format"] >= 2:
        chunks = summary["chunks"]
        intact = intact_chunks(data, csv_header(summary["format"]), chunks)
        if intact < len(chunks):
            if intact < 0:
                part = "the header is"
            else:
                start = (chunks[intact - 1]["csv_end"] if intact
                         else len(csv_header(summary["format"])))
                part = (f"the rows of chunk {chunks[intact]['id']} (bytes {start}-"
                        f"{chunks[intact]['csv_end']}) are")
            raise StudyDamagedError(f"{csv_path}: {part} missing or damaged (they do not match "
                                    f"{summary_path.name}); {fix}")
    elif len(data) < summary["csv_bytes"]:
        raise StudyDamagedError(f"{csv_path} is shorter than {summary_path.name} records "
                                f"({len(data)} < {summary['csv_bytes']} bytes); {fix}")
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        raise StudyDamagedError(f"{csv_path} is damaged (not UTF-8 text at byte {error.start}); "
                                f"{fix}") from None


def read_rows(csv_path: Path) -> Iterator[list[str]]:
    """The data rows of a study CSV file.

    Args:
        csv_path: the file.

    Yields:
        The fields of each data row.
    """
    with open(csv_path, newline="") as f:
        yield from csv_rows(f, csv_path)


def row_key(row: list[str]) -> RunKey:
    """The run of a CSV row.

    Args:
        row: the fields of a data row.

    Returns:
        Its :class:`RunKey`.
    """
    return RunKey(row[0], float(row[1]), float(row[2]), int(row[3]))


def parsed_rows(text: str, source: Path) -> Iterator[tuple[RunKey, int, float, float]]:
    """(run, step, loss, lr) of each CSV row; :class:`StudyDamagedError` naming the line if a row
    cannot be read.

    Args:
        text: the CSV text, header included.
        source: the file, for error messages.

    Yields:
        ``(run, step, loss, lr)`` per row.

    Raises:
        StudyDamagedError: a row cannot be read.
    """
    rows = csv_rows(io.StringIO(text), source)
    width = len(CSV_COLUMNS) if text.startswith(CSV_HEADER.decode()) else len(OLD_CSV_COLUMNS)
    for line in itertools.count(2):
        try:
            row = next(rows, None)
            if row is None:
                return
            if len(row) != width:
                raise ValueError(f"{len(row)} fields, expected {width}")
            parsed = row_key(row), int(row[4]), float(row[-2]), float(row[-1])
        except StudyDamagedError:
            raise
        except (ValueError, csv.Error) as error:
            raise StudyDamagedError(f"{source} line {line} cannot be read ({error}); the file is "
                                    f"damaged: run the study again") from None
        yield parsed


def read_study_summary(out: Path) -> dict:
    """The verified ``summary.json`` of the study in ``out`` (format 1 or 2).

    Args:
        out: the study's folder.

    Returns:
        The summary.

    Raises:
        FileNotFoundError: ``out`` holds no ``summary.json``.
        StudyError: a newer format than this hdfunc reads.
        StudyDamagedError: the summary is damaged or incomplete.
    """
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no study in {out} (summary.json missing)")
    advice = "restore it from a copy, or run the study again"
    summary = read_summary(summary_path, advice)
    if summary["format"] > FORMAT_VERSION:
        raise StudyError(f"{summary_path} has format {summary['format']}, newer than this "
                         f"hdfunc reads ({FORMAT_VERSION}); update hdfunc")
    required = ("config", "runs", "csv_bytes") + (("chunks",) if summary["format"] >= 2 else ())
    missing = [key for key in required if key not in summary]
    if missing:
        raise StudyDamagedError(f"{summary_path} lacks {', '.join(missing)}; {advice}")
    return summary


def load_results(out_dir: str | Path) -> StudyResults:
    """Read a study folder (summary.json + steps.csv) back into :class:`StudyResults`; a damaged
    folder raises :class:`~hdfunc.studies.storage.StudyDamagedError` naming the file, what is
    wrong and what to do.

    Args:
        out_dir: the study's folder.

    Returns:
        The results, with statistics recomputed.

    Raises:
        FileNotFoundError: ``out_dir`` holds no study.
        StudyDamagedError: a file is damaged.
    """
    out = Path(out_dir)
    summary = read_study_summary(out)
    try:
        stored = dict(summary["config"])
        if summary["format"] < 3:  # epochs of ⌊N/B⌋ full minibatches before format 3
            stored.setdefault("drop_last", True)
        config = StudyConfig.from_dict(stored)
        runs = [RunSummary(**r) for r in summary["runs"]]
    except (KeyError, TypeError, ValueError) as error:
        raise StudyDamagedError(f"{out / 'summary.json'} holds no valid study ({error}); restore "
                                f"it from a copy, or run the study again") from None
    done = {r.key for r in runs}
    columns: dict[RunKey, list] = {}
    for key, *values in parsed_rows(verified_csv_text(out, summary), out / "steps.csv"):
        columns.setdefault(key, []).append(values)
    curves, steps = {}, np.zeros(0, dtype=np.int64)
    for key, rows in columns.items():
        if key in done:
            array = np.array(rows, dtype=np.float64)
            steps = array[:, 0].astype(np.int64)
            curves[key] = (array[:, 1], array[:, 2])
    return _finish(config, summary.get("problem", ""), runs, steps, curves, out,
                   read_performance(out))


def merge_studies(out_dir: str | Path, parts: list[str | Path], config: StudyConfig, *,
                  plots: bool = True) -> StudyResults:
    """Merge complete study folders ``parts`` (e.g. one per rank, each a slice of the seeds) into
    ``out_dir``, rows and runs in the canonical order of ``config``.

    Args:
        out_dir: the merged study's folder.
        parts: the complete study folders to merge.
        config: the whole study (all seeds).
        plots: draw the merged study's figures.

    Returns:
        The merged results.

    Raises:
        ValueError: a part is not complete, or the parts lack runs of ``config``.
        StudyDamagedError: a part's files are damaged.
    """
    out = Path(out_dir)
    prepare_output_folder(out)
    runs, lines, problem, num_steps = [], {}, "", None
    for part in map(Path, parts):
        summary = read_study_summary(part)
        if not summary.get("complete"):
            raise ValueError(f"cannot merge {part}: its study is not complete")
        runs += [RunSummary(**r) for r in summary["runs"]]
        problem, num_steps = summary["problem"], summary["num_steps"]
        for row in csv_rows(io.StringIO(verified_csv_text(part, summary)), part / "steps.csv"):
            lines.setdefault(row_key(row), []).append(row)
    runs = _sort_runs(config, runs)
    missing = set(config.runs()) - {r.key for r in runs}
    if missing:
        raise ValueError(f"merged parts lack {len(missing)} run(s), e.g. {sorted(missing)[0]}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for r in runs:
        writer.writerows(lines.get(r.key, []))
    rows = buffer.getvalue().encode()
    summary = new_summary(config, problem, num_steps, None, len(CSV_HEADER) + len(rows), runs)
    summary["chunks"] = [{"id": "merged", "runs": len(runs), "csv_end": summary["csv_bytes"],
                          "sha256": sha256(rows)}]
    summary["merged_from"] = [str(p) for p in parts]
    with writing_into(out):
        write_bytes_atomic(out / "steps.csv", CSV_HEADER + rows)
        write_summary(out / "summary.json", summary)
    return finalize(out, plots=plots)
