"""Study results on disk and in memory.

An output folder holds

* ``steps.csv``     tidy per-step table: optimizer, lr0, beta, seed, step, loss, lr
                    (loss: minibatch loss at θ_{t-1}; lr: the rate γ_t that step t applied)
* ``summary.json``  the configuration, one record per finished run (final loss over the whole
                    training set, divergence), the bookkeeping of finished chunks and, once the
                    study is complete, its statistics
* ``checkpoints/``  mid-chunk checkpoints of the chunk in progress (deleted when it finishes)
* ``plots/``        PNG figures (see :mod:`hdfunc.studies.plots`)

Writes are incremental and atomic: a finished chunk's rows are appended to the CSV and flushed,
then ``summary.json`` is replaced atomically with the CSV's new length. A study killed at any
moment resumes (``resume=True``) from the last summary: the CSV is cut back to the recorded
length, finished chunks are skipped and the chunk in progress restarts from its checkpoint.
A run whose loss becomes non-finite is recorded as diverged (its losses as nan/inf).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import numpy as np

import hdfunc
from hdfunc.studies.config import RunKey, StudyConfig
from hdfunc.studies.stats import finite_or_none

CSV_COLUMNS = ["optimizer", "lr0", "beta", "seed", "step", "loss", "lr"]
FORMAT_VERSION = 1


@dataclass
class RunSummary:
    """The outcome of one run. Non-finite numbers are stored as ``None`` (JSON has no nan)."""

    optimizer: str
    lr0: float
    beta: float
    seed: int
    final_loss: float | None  # whole training set (or last minibatch if eval_final is off)
    last_batch_loss: float | None
    final_lr: float | None
    diverged: bool
    diverged_step: int | None  # first step with a non-finite loss

    @property
    def key(self) -> RunKey:
        return RunKey(self.optimizer, self.lr0, self.beta, self.seed)

    @property
    def final(self) -> float:
        """The final loss, +inf for a diverged run (so it ranks last)."""
        return math.inf if self.final_loss is None or self.diverged else self.final_loss


def summarize(result: Any) -> list[RunSummary]:
    """One :class:`RunSummary` per run of a :class:`~hdfunc.studies.engine.ChunkResult`."""
    out = []
    for i, key in enumerate(result.keys):
        losses = result.losses[i]
        bad = np.flatnonzero(~np.isfinite(losses))
        final = float(result.final_loss[i])
        diverged = bool(bad.size) or not math.isfinite(final)
        out.append(RunSummary(key.optimizer, key.lr0, key.beta, key.seed, finite_or_none(final),
                              finite_or_none(losses[-1]), finite_or_none(result.rates[i, -1]),
                              diverged, int(bad[0]) + 1 if bad.size else None))
    return out


def logged_steps(total: int, log_every: int) -> np.ndarray:
    """1-based steps written to the CSV: every ``log_every``-th, plus the first and the last."""
    steps = set(range(log_every, total + 1, log_every)) | {1, total}
    return np.array(sorted(steps), dtype=np.int64)


def csv_text(result: Any, log_every: int) -> str:
    """The CSV rows of a chunk, run by run, step by step (floats written exactly)."""
    steps = logged_steps(result.losses.shape[1], log_every)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for i, key in enumerate(result.keys):
        losses = result.losses[i, steps - 1].tolist()
        rates = result.rates[i, steps - 1].tolist()
        head = [key.optimizer, repr(float(key.lr0)), repr(float(key.beta)), key.seed]
        writer.writerows(head + [s, repr(loss), repr(rate)]
                         for s, loss, rate in zip(steps.tolist(), losses, rates))
    return buffer.getvalue()


# ----------------------------------------------------------------------------- results object


@dataclass
class StudyResults:
    """A finished (or partly finished) study: run summaries plus loss/rate curves per run."""

    config: StudyConfig
    problem: str
    runs: list[RunSummary]
    steps: np.ndarray  # the logged step numbers
    curves: dict[RunKey, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    statistics: dict | None = None
    out_dir: Path | None = None

    def run(self, optimizer: str, lr0: float, beta: float, seed: int) -> RunSummary:
        for r in self.runs:
            if r.key == (optimizer, lr0, beta, seed):
                return r
        raise KeyError(f"no run {(optimizer, lr0, beta, seed)} in this study")

    def final_losses(self, optimizer: str, lr0: float, beta: float | None = None) -> dict[int, float]:
        """{seed: final loss (+inf if diverged)} of one optimizer at α_0 (and β)."""
        return {r.seed: r.final for r in self.runs if r.optimizer == optimizer and r.lr0 == lr0
                and (beta is None or r.beta == beta)}

    def summary_table(self) -> str:
        from hdfunc.studies.stats import format_table
        return format_table(self.statistics or {})


def print_summary(results: StudyResults, file: TextIO | None = None) -> None:
    """Print a compact table: median final loss [95% CI] per optimizer and α_0, and the paired
    HD-vs-base tests."""
    print(results.summary_table(), file=file or sys.stdout)


def _sort_runs(config: StudyConfig, runs: Iterable[RunSummary]) -> list[RunSummary]:
    order = {key: i for i, key in enumerate(config.runs())}
    return sorted(runs, key=lambda r: order.get(r.key, len(order)))


def _finish(config: StudyConfig, problem: str, runs: list[RunSummary], steps: np.ndarray,
            curves: dict, out_dir: Path | None) -> StudyResults:
    from hdfunc.studies.stats import study_statistics
    results = StudyResults(config, problem, _sort_runs(config, runs), steps, curves, None, out_dir)
    results.statistics = study_statistics(results)
    return results


class MemoryCollector:
    """Keeps a study's results in memory (``run_study`` without an output folder)."""

    def __init__(self, config: StudyConfig, problem: Any):
        self.config, self.problem = config, problem.description
        self.runs: list[RunSummary] = []
        self.curves: dict = {}
        self.steps = np.zeros(0, dtype=np.int64)

    def is_done(self, chunk_id: str) -> bool:
        return False

    def checkpoint_path(self, chunk_id: str) -> None:
        return None

    def add(self, chunk_id: str, result: Any) -> None:
        self.runs += summarize(result)
        self.steps = logged_steps(result.losses.shape[1], self.config.log_every)
        for i, key in enumerate(result.keys):
            self.curves[key] = (result.losses[i, self.steps - 1].astype(np.float64),
                                result.rates[i, self.steps - 1].astype(np.float64))

    def finish(self, plots: bool = False) -> StudyResults:
        return _finish(self.config, self.problem, self.runs, self.steps, self.curves, None)


# ----------------------------------------------------------------------------- files


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_summary(config: StudyConfig, problem: str, num_steps: int, chunk_size: int | None,
                csv_bytes: int, runs: list[RunSummary]) -> dict:
    """The contents of a study's ``summary.json`` before its statistics are computed."""
    return {"format": FORMAT_VERSION, "hdfunc_version": hdfunc.__version__,
            "config": config.to_dict(), "problem": problem, "num_steps": num_steps,
            "chunk_size": chunk_size, "complete": False, "completed_chunks": [],
            "csv_bytes": csv_bytes, "runs": [asdict(r) for r in runs], "statistics": None}


class StudyWriter:
    """Writes a study's results to ``out_dir`` incrementally and atomically (module docstring)."""

    def __init__(self, out_dir: str | Path, config: StudyConfig, problem: Any, *, resume: bool):
        self.out = Path(out_dir)
        self.config = config
        self.problem = problem.description
        self.num_steps = config.num_steps(problem.num_examples)
        self.summary_path = self.out / "summary.json"
        self.csv_path = self.out / "steps.csv"
        self.chunk_size: int | None = None
        self.summary: dict | None = None
        if self.summary_path.is_file():
            if not resume:
                raise FileExistsError(f"{self.out} already holds a study (summary.json); pass "
                                      f"--resume (resume=True) to continue it, or choose another "
                                      f"output folder")
            self.summary = self._load_existing()
            self.chunk_size = self.summary["chunk_size"]

    def _load_existing(self) -> dict:
        try:
            summary = json.loads(self.summary_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {self.summary_path}: {error}") from error
        stored, given = StudyConfig.from_dict(summary["config"]).identity(), self.config.identity()
        if stored != given:
            differences = {k: (v, given[k]) for k, v in stored.items() if given[k] != v}
            raise ValueError(f"cannot resume {self.out}: it holds a different study "
                             f"(setting: (stored, given)) {differences}")
        return summary

    def start(self, chunk_size: int) -> None:
        if self.summary is None:
            self.out.mkdir(parents=True, exist_ok=True)
            header = ",".join(CSV_COLUMNS) + "\n"
            write_text_atomic(self.csv_path, header)
            self.summary = new_summary(self.config, self.problem, self.num_steps, chunk_size,
                                       len(header.encode()), [])
            write_json_atomic(self.summary_path, self.summary)
        else:  # cut off rows of a chunk that did not finish
            with open(self.csv_path, "r+b") as f:
                f.truncate(self.summary["csv_bytes"])
            self.summary["config"] = self.config.to_dict()  # runtime settings may change
        self.chunk_size = self.summary["chunk_size"]

    def is_done(self, chunk_id: str) -> bool:
        return chunk_id in self.summary["completed_chunks"]

    def checkpoint_path(self, chunk_id: str) -> Path:
        return self.out / "checkpoints" / f"chunk-{chunk_id}.pt"

    def add(self, chunk_id: str, result: Any) -> None:
        with open(self.csv_path, "a") as f:
            f.write(csv_text(result, self.config.log_every))
            f.flush()
            os.fsync(f.fileno())
        self.summary["csv_bytes"] = self.csv_path.stat().st_size
        self.summary["runs"] += [asdict(r) for r in summarize(result)]
        self.summary["completed_chunks"].append(chunk_id)
        self.summary["complete"] = False
        write_json_atomic(self.summary_path, self.summary)
        checkpoint = self.checkpoint_path(chunk_id)
        if checkpoint.exists():
            checkpoint.unlink()

    def finish(self, plots: bool = True) -> StudyResults:
        return finalize(self.out, plots=plots)


def finalize(out_dir: str | Path, *, plots: bool = True) -> StudyResults:
    """Compute statistics (into summary.json, marked complete) and draw the plots."""
    out = Path(out_dir)
    results = load_results(out)
    summary = json.loads((out / "summary.json").read_text())
    summary["statistics"] = results.statistics
    summary["complete"] = True
    write_json_atomic(out / "summary.json", summary)
    if plots:
        from hdfunc.studies.plots import plot_study
        plot_study(results, out / "plots")
    return results


def csv_rows(lines: Iterable[str], source: Path) -> Iterator[list[str]]:
    """The data rows of study CSV text (``source`` names it in errors)."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header != CSV_COLUMNS:
        raise ValueError(f"{source} is not a study CSV (header {header})")
    yield from reader


def read_rows(csv_path: Path) -> Iterator[list[str]]:
    with open(csv_path, newline="") as f:
        yield from csv_rows(f, csv_path)


def row_key(row: list[str]) -> RunKey:
    return RunKey(row[0], float(row[1]), float(row[2]), int(row[3]))


def load_results(out_dir: str | Path) -> StudyResults:
    """Read a study folder (summary.json + steps.csv) back into :class:`StudyResults`."""
    out = Path(out_dir)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no study in {out} (summary.json missing)")
    summary = json.loads(summary_path.read_text())
    config = StudyConfig.from_dict(summary["config"])
    runs = [RunSummary(**r) for r in summary["runs"]]
    done = {r.key for r in runs}
    columns: dict[RunKey, list] = {}
    with open(out / "steps.csv", "rb") as f:  # only the recorded bytes count
        text = f.read(summary["csv_bytes"]).decode()
    for row in csv_rows(io.StringIO(text), out / "steps.csv"):
        columns.setdefault(row_key(row), []).append((int(row[4]), float(row[5]), float(row[6])))
    curves, steps = {}, np.zeros(0, dtype=np.int64)
    for key, rows in columns.items():
        if key in done:
            array = np.array(rows, dtype=np.float64)
            steps = array[:, 0].astype(np.int64)
            curves[key] = (array[:, 1], array[:, 2])
    return _finish(config, summary.get("problem", ""), runs, steps, curves, out)


def merge_studies(out_dir: str | Path, parts: list[str | Path], config: StudyConfig, *,
                  plots: bool = True) -> StudyResults:
    """Merge complete study folders ``parts`` (e.g. one per rank, each a slice of the seeds) into
    ``out_dir``, rows and runs in the canonical order of ``config``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, lines, problem, num_steps = [], {}, "", None
    for part in parts:
        summary = json.loads((Path(part) / "summary.json").read_text())
        if not summary.get("complete"):
            raise ValueError(f"cannot merge {part}: its study is not complete")
        runs += [RunSummary(**r) for r in summary["runs"]]
        problem, num_steps = summary["problem"], summary["num_steps"]
        for row in read_rows(Path(part) / "steps.csv"):
            lines.setdefault(row_key(row), []).append(row)
    runs = _sort_runs(config, runs)
    missing = set(config.runs()) - {r.key for r in runs}
    if missing:
        raise ValueError(f"merged parts lack {len(missing)} run(s), e.g. {sorted(missing)[0]}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in runs:
        writer.writerows(lines.get(r.key, []))
    text = buffer.getvalue()
    write_text_atomic(out / "steps.csv", text)
    summary = new_summary(config, problem, num_steps, None, len(text.encode()), runs)
    summary["merged_from"] = [str(p) for p in parts]
    write_json_atomic(out / "summary.json", summary)
    return finalize(out, plots=plots)
