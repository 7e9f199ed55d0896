"""Datasets for studies: MNIST (IDX files, plain or .gz) and CIFAR-10 (python batches).

Both are returned as in-memory tensors ``(inputs, labels)`` normalised as in the paper's reference
code (torchvision ``ToTensor`` then ``Normalize`` with the usual per-channel mean and std), so a
whole study indexes minibatches out of one tensor on its device.

Where the data are looked for, first match wins (docs/studies.md, "Data"):

1. an explicit ``data_dir`` (argument, ``--data-dir``, ``-P data_dir=...``), relative to the
   working directory; in a study file (``hdfunc study --config``), relative to that file's folder;
2. the environment variable ``HDFUNC_MNIST_DIR`` (``HDFUNC_CIFAR10_DIR``), relative to the
   working directory;
3. ``data/mnist`` (``data/cifar10``) in the working directory, then ``../shared/data/mnist``
   (``../shared/data/cifar10``) beside it (this workspace's layout, where the 10k MNIST *test*
   images are).

Never relative to where hdfunc is installed.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetError(FileNotFoundError):
    """A dataset is missing or unreadable; the message says where the files were looked for."""


@dataclass(frozen=True)
class Dataset:
    """An in-memory labelled dataset; ``description`` says which files it came from.

    Args:
        inputs: float32 inputs, one example per row: ``(N, ...)``.
        labels: int64 labels, ``(N,)``.
        name: e.g. ``"mnist-train"``.
        description: one line: the split, the size and the files.
    """

    inputs: torch.Tensor  # float32, (N, ...)
    labels: torch.Tensor  # int64, (N,)
    name: str
    description: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def resolve_data_dir(path: str | Path, relative_to: str | Path | None = None) -> Path:
    """``path`` with ``~`` expanded; a relative one is taken from ``relative_to`` (e.g. a study
    file's folder) or, when that is None, left relative to the working directory.

    Args:
        path: the folder as given.
        relative_to: the folder a relative ``path`` is taken from (None: the working directory).

    Returns:
        The folder (not checked to exist).
    """
    folder = Path(path).expanduser()
    if relative_to is not None and not folder.is_absolute():
        folder = Path(relative_to) / folder
    return folder


def default_data_dirs(name: str) -> list[Path]:
    """The folders tried, in order, when no ``data_dir`` is given for dataset ``name``
    ("mnist" or "cifar10"): ``$HDFUNC_<NAME>_DIR`` if set (and then only it), else
    ``data/<name>`` and ``../shared/data/<name>`` from the working directory.

    Args:
        name: "mnist" or "cifar10".

    Returns:
        The candidate folders, in order.
    """
    env = os.environ.get(f"HDFUNC_{name.upper()}_DIR")
    if env:
        return [resolve_data_dir(env)]
    return [Path("data") / name, Path("..") / "shared" / "data" / name]


def _default_dir(name: str) -> Path:
    candidates = default_data_dirs(name)
    return next((c for c in candidates if c.is_dir()), candidates[0])


def default_mnist_dir() -> Path:
    """The MNIST folder used when none is given: ``$HDFUNC_MNIST_DIR``, else the first of
    ``data/mnist`` and ``../shared/data/mnist`` (from the working directory) that exists.

    Returns:
        The folder (the first candidate if none exists).
    """
    return _default_dir("mnist")


def default_cifar10_dir() -> Path:
    """``$HDFUNC_CIFAR10_DIR``, else the first of ``data/cifar10`` and ``../shared/data/cifar10``
    (from the working directory) that exists.

    Returns:
        The folder (the first candidate if none exists).
    """
    return _default_dir("cifar10")


def mnist_available(data_dir: str | Path | None = None) -> bool:
    """Whether a readable pair of MNIST IDX files exists in ``data_dir`` (default folder if None).

    Args:
        data_dir: the folder to look in (None: :func:`default_mnist_dir`).

    Returns:
        True if the images and labels of a split (train or test) are there.
    """
    folder = resolve_data_dir(data_dir) if data_dir is not None else default_mnist_dir()
    return any(_find(folder, images) and _find(folder, labels)
               for images, labels in MNIST_FILES.values())


# ----------------------------------------------------------------------------- IDX


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed when the name ends in .gz).

    Args:
        path: the file.

    Returns:
        The array, with the dtype and shape of the file's header (read-only, over the bytes).

    Raises:
        DatasetError: the file cannot be read, is not IDX, or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: IDX payload has {len(data) - header} bytes, its header "
                           f"promises {expected} for shape {shape} (corrupt or truncated file)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(data_dir: str | Path | None = None, split: str = "auto",
               download: bool = False) -> Dataset:
    """MNIST as ``(N, 784)`` float32 inputs normalised with mean 0.1307 / std 0.3081 and int64
    labels. ``split``: "train" (60k), "test" (10k) or "auto" (train if present, else test).
    With ``download=True`` and torchvision installed, missing files are downloaded first.

    Args:
        data_dir: the folder of the IDX files (None: :func:`default_mnist_dir`).
        split: "train", "test" or "auto".
        download: download missing files with torchvision first.

    Returns:
        The dataset: inputs ``(N, 784)``, labels ``(N,)``.

    Raises:
        ValueError: a bad ``split``.
        DatasetError: the files are missing (the message says where they were looked for),
            unreadable or disagree, or ``download`` without torchvision.
    """
    if split not in ("auto", "train", "test"):
        raise ValueError(f"split must be 'auto', 'train' or 'test', got {split!r}")
    folder = resolve_data_dir(data_dir) if data_dir is not None else default_mnist_dir()
    if download:
        _torchvision_download("MNIST", folder, train=split != "test")
        raw = folder / "MNIST" / "raw"
        if raw.is_dir() and not mnist_available(folder):
            folder = raw
    splits = ["train", "test"] if split == "auto" else [split]
    for name in splits:
        images_stem, labels_stem = MNIST_FILES[name]
        images_path, labels_path = _find(folder, images_stem), _find(folder, labels_stem)
        if images_path is None or labels_path is None:
            continue
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetError(f"MNIST files in {folder} disagree: images {images.shape}, "
                               f"labels {labels.shape}")
        inputs = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        inputs = (inputs - MNIST_MEAN) / MNIST_STD
        return Dataset(inputs, torch.from_numpy(labels.astype(np.int64)), f"mnist-{name}",
                       f"MNIST {name} split, {images.shape[0]} images from {images_path}")
    wanted = " or ".join(f"{MNIST_FILES[s][0]}[.gz] + {MNIST_FILES[s][1]}[.gz]" for s in splits)
    where = (str(folder.resolve()) if data_dir is not None else
             " or ".join(str(c.resolve()) for c in default_data_dirs("mnist")))
    raise DatasetError(f"MNIST not found: looked for {wanted} in {where} "
                       f"(set data_dir, --data-dir or HDFUNC_MNIST_DIR to the folder holding them)")


# ----------------------------------------------------------------------------- CIFAR-10


def load_cifar10(data_dir: str | Path | None = None, split: str = "train",
                 download: bool = False) -> Dataset:
    """CIFAR-10 from the python batches (``data_batch_1..5``, ``test_batch``) as ``(N, 3, 32, 32)``
    float32 normalised per channel, with int64 labels. ``data_dir`` may be the folder holding the
    batches or its parent holding ``cifar-10-batches-py``.

    Args:
        data_dir: the folder (None: :func:`default_cifar10_dir`).
        split: "train" (50k) or "test" (10k).
        download: download missing files with torchvision first.

    Returns:
        The dataset: inputs ``(N, 3, 32, 32)``, labels ``(N,)``.

    Raises:
        ValueError: a bad ``split``.
        DatasetError: the batches are missing or unreadable, or ``download`` without
            torchvision.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = resolve_data_dir(data_dir) if data_dir is not None else default_cifar10_dir()
    if download:
        _torchvision_download("CIFAR10", folder, train=split == "train")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    candidates = [folder, folder / "cifar-10-batches-py"]
    for candidate in candidates:
        if all((candidate / n).is_file() for n in names):
            break
    else:
        raise DatasetError(f"CIFAR-10 {split} batches ({', '.join(names)}) not found in "
                           f"{' or '.join(str(c.resolve()) for c in candidates)} (set data_dir, "
                           f"--data-dir or HDFUNC_CIFAR10_DIR, or pass download=True with torchvision)")
    images, labels = [], []
    for n in names:
        try:
            with open(candidate / n, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
            raise DatasetError(f"cannot read CIFAR-10 batch {candidate / n}: {error}") from error
    x = torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return Dataset((x - mean) / std, torch.from_numpy(np.concatenate(labels)), f"cifar10-{split}",
                   f"CIFAR-10 {split} split, {x.shape[0]} images from {candidate}")


def _torchvision_download(name: str, folder: Path, train: bool) -> None:
    try:
        import torchvision.datasets as datasets
    except ImportError as error:
        raise DatasetError(f"download=True needs torchvision, which is not installed; put the "
                           f"{name} files in {folder} instead") from error
    getattr(datasets, name)(str(folder), train=train, download=True)
