"""Durable study files: atomic replacement, a checksummed ``summary.json``, verified CSV chunks
and checksummed checkpoints, and the one-line errors that name a damaged or unusable file.

Every file of a study is either replaced atomically (written to ``NAME.tmp``, fsynced, renamed
over ``NAME``, the folder fsynced) or only appended to (``steps.csv``: a finished chunk's rows,
fsynced before ``summary.json`` records them). ``summary.json`` carries the SHA-256 of its own
contents and, per finished chunk, where its rows end in ``steps.csv`` and their SHA-256; a
checkpoint ends with the SHA-256 of its payload. So a reader can tell exactly which bytes are
vouched for, whatever instant a process was killed at and whatever happened to a file since.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

CHECKPOINT_MAGIC = b"hdfunc-ckpt-v1\n\0"  # 16 bytes, then the payload's SHA-256 (32 bytes)
CHECKPOINT_TRAILER = len(CHECKPOINT_MAGIC) + 32
TEMPORARY_SUFFIX = ".tmp"


class StudyError(ValueError):
    """A study cannot be run, resumed or read; the message is one line naming the file, what is
    wrong and what to do."""


class StudyDamagedError(StudyError):
    """A study file is damaged or inconsistent (truncated, garbled, from another study)."""


class StudyOutputError(StudyError):
    """The output folder cannot be created or written."""


class CheckpointDamagedError(StudyDamagedError):
    """A checkpoint's payload does not match its checksum (truncated or garbled)."""


# ----------------------------------------------------------------------------- atomic files


def fsync_directory(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (best effort where unsupported).

    Args:
        folder: the folder whose entries to fsync.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place.

    Args:
        path: the file.

    Returns:
        ``path`` with ``.tmp`` appended to its name.
    """
    return path.with_name(path.name + TEMPORARY_SUFFIX)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a reader (or a crash) sees the old or the new file.

    Args:
        path: the file.
        data: its new contents.
    """
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def sha256(data: bytes) -> str:
    """The SHA-256 of ``data``.

    Args:
        data: the bytes.

    Returns:
        The digest in hex.
    """
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- summary.json


def summary_checksum(summary: dict) -> str:
    """SHA-256 of the canonical JSON of ``summary`` without its ``checksum`` entry.

    Args:
        summary: the contents of a ``summary.json``.

    Returns:
        The digest in hex.
    """
    content = {k: v for k, v in summary.items() if k != "checksum"}
    return sha256(json.dumps(content, sort_keys=True, separators=(",", ":"),
                             allow_nan=False).encode())


def write_summary(path: Path, summary: dict) -> None:
    """Store ``summary`` (with its checksum) atomically.

    Args:
        path: the ``summary.json`` file.
        summary: its contents; its ``checksum`` entry is set.
    """
    summary["checksum"] = summary_checksum(summary)
    write_bytes_atomic(path, json.dumps(summary, indent=1, allow_nan=False).encode())


def read_summary(path: Path, advice: str) -> dict:
    """The verified contents of a ``summary.json``; :class:`StudyDamagedError` (ending with
    ``advice``, what to do) when it is unreadable, truncated or garbled.

    Args:
        path: the ``summary.json`` file.
        advice: what to do, at the end of the error message.

    Returns:
        The summary.

    Raises:
        StudyDamagedError: the file is unreadable, not JSON, has no format number or does not
            match its checksum.
    """
    def damaged(what: str) -> StudyDamagedError:
        return StudyDamagedError(f"{path} {what}; {advice}")

    try:
        raw = path.read_bytes()
    except OSError as error:
        raise damaged(f"cannot be read ({error.strerror})") from None
    try:
        summary = json.loads(raw.decode())
    except UnicodeDecodeError:
        raise damaged("is damaged (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise damaged(f"is damaged or truncated (not valid JSON: {error.msg} at byte "
                      f"{error.pos} of {len(raw)})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("format"), int):
        raise damaged("is damaged (no format number)")
    if ((summary["format"] >= 2 or "checksum" in summary)
            and summary.get("checksum") != summary_checksum(summary)):
        raise damaged("is damaged (its contents do not match its checksum)")
    return summary


# ----------------------------------------------------------------------------- steps.csv chunks


def read_prefix(path: Path, size: int) -> bytes:
    """Up to ``size`` bytes from the start of ``path`` (fewer if it is shorter; none if absent).

    Args:
        path: the file.
        size: the most bytes read.

    Returns:
        The bytes.
    """
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except (FileNotFoundError, NotADirectoryError):
        return b""


def intact_chunks(data: bytes, header: bytes, chunks: list[dict]) -> int:
    """How many of ``chunks`` (summary records, in order) have their rows intact in ``data``,
    the start of ``steps.csv``: the header, then each chunk's bytes up to its ``csv_end``
    with the recorded SHA-256.

    Args:
        data: the start of ``steps.csv``.
        header: the CSV header line, as bytes.
        chunks: the summary's chunk records, each with ``csv_end`` and ``sha256``.

    Returns:
        The number of intact chunks, counted from the first; -1 if the header differs.
    """
    if data[:len(header)] != header:
        return -1
    start = len(header)
    for index, chunk in enumerate(chunks):
        end = chunk["csv_end"]
        if end > len(data) or sha256(data[start:end]) != chunk["sha256"]:
            return index
        start = end
    return len(chunks)


# ----------------------------------------------------------------------------- checkpoints


class _HashingWriter:
    """A write-only file that also hashes what passes through it."""

    def __init__(self, file: BinaryIO):
        self.file, self.hash = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save(payload)`` followed by its SHA-256, replaced atomically.

    Args:
        path: the checkpoint file (its folder is made if missing).
        payload: what to save.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(payload, writer)
        f.write(CHECKPOINT_MAGIC + writer.hash.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint`; :class:`CheckpointDamagedError` when it
    is truncated or garbled.

    Args:
        path: the checkpoint file.
        map_location: as ``torch.load``'s.

    Returns:
        The payload.

    Raises:
        CheckpointDamagedError: the checksum does not match, or torch cannot read the payload.
    """
    data = Path(path).read_bytes()
    payload, trailer = data[:-CHECKPOINT_TRAILER], data[-CHECKPOINT_TRAILER:]
    if (len(data) < CHECKPOINT_TRAILER or trailer[:len(CHECKPOINT_MAGIC)] != CHECKPOINT_MAGIC
            or hashlib.sha256(payload).digest() != trailer[len(CHECKPOINT_MAGIC):]):
        raise CheckpointDamagedError(f"{path} is damaged or truncated (its checksum does not "
                                     f"match); delete it to restart that chunk from its first step")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as error:  # a payload with a valid checksum that torch cannot read
        raise CheckpointDamagedError(f"{path} cannot be read ({error}); delete it to restart that "
                                     f"chunk from its first step") from None


# ----------------------------------------------------------------------------- output folders


def check_output_folder(out: Path) -> None:
    """Fail early, creating nothing, when ``out`` cannot become a writable folder: a file on its
    path, or a nearest existing folder that cannot be written (:class:`StudyOutputError`).

    Args:
        out: the output folder (it need not exist).

    Raises:
        StudyOutputError: ``out`` cannot become a writable folder.
    """
    try:
        existing = next((p for p in [out, *out.parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise StudyOutputError(f"cannot use {out} as the output folder: {existing} is a file, "
                                   f"not a folder; choose another --out")
    except OSError as error:  # e.g. a folder on the way that cannot be searched
        raise output_error(out, error) from None
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise output_error(out, PermissionError(errno.EACCES, "permission denied", str(existing)))


def prepare_output_folder(out: Path) -> None:
    """Check ``out`` (:func:`check_output_folder`) and create it with its parents;
    :class:`StudyOutputError` (one line, naming the path and the reason) otherwise.

    Args:
        out: the output folder.

    Raises:
        StudyOutputError: ``out`` cannot be created or written.
    """
    check_output_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(out, error) from None


def output_error(out: Path, error: OSError) -> StudyOutputError:
    """A one-line :class:`StudyOutputError` for ``error`` raised while writing into ``out``.

    Args:
        out: the output folder.
        error: the error writing into it raised.

    Returns:
        The error to raise, naming ``out``, the reason and what to do.
    """
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
               errno.ENOTDIR: "a part of the path is a file, not a folder"}
    reason = reasons.get(error.errno, error.strerror or str(error))
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(out) else ""
    return StudyOutputError(f"cannot write the study to {out}: {reason}{where}; choose another "
                            f"--out or fix the folder, then run again (with --resume if the study "
                            f"had started)")
