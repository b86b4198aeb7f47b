"""Dataset loaders: every loader returns a :class:`Data` of float tensors in [0, 1], NCHW.

``fashion-mnist`` reads the IDX ``.gz`` files that Debian's ``dataset-fashion-mnist`` package
installs (or any folder holding them); ``digits`` is scikit-learn's bundled 8x8 set (for fast
tests); ``mnist`` and ``cifar10`` go through torchvision from a local root, never downloading.
A missing dataset raises :class:`DatasetNotFoundError` that says how to get it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ENV_ROOT = "RBL_DATA_ROOT"
DEBIAN_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where we looked; the message says how to get them."""


@dataclass(frozen=True)
class DataSplit:
    """Images ``x`` (float, [0, 1], NCHW) and integer labels ``y``."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"DataSplit needs x (N,C,H,W) and y (N,), got {tuple(self.x.shape)}, {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def head(self, n: int) -> DataSplit:
        """The first ``n`` points (fixed, so every run evaluates the same points)."""
        return DataSplit(self.x[:n], self.y[:n])

    def subset(self, index: Tensor) -> DataSplit:
        return DataSplit(self.x[index], self.y[index])

    def fingerprint(self) -> str:
        """A short content hash, so cached models are tied to the data they saw."""
        h = hashlib.sha256()
        h.update(self.x.detach().cpu().numpy().tobytes())
        h.update(self.y.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Data:
    """A dataset's fixed splits and shape facts."""

    name: str
    train: DataSplit
    test: DataSplit
    num_classes: int
    val: DataSplit | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


_LOADERS: dict[str, Callable[[Path | None], tuple[DataSplit, DataSplit, int]]] = {}


def _loader(name: str):
    def deco(fn):
        _LOADERS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load(
    name: str,
    root: str | Path | None = None,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    train_limit: int | None = None,
) -> Data:
    """Load a dataset by name.

    ``root`` (or the ``RBL_DATA_ROOT`` environment variable) says where the files are.
    ``val_fraction`` takes a seeded random validation split out of train; ``train_limit`` keeps
    only the first points of train (for quick tests), taken after the validation split.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list_datasets()}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root_path = Path(root) if root is not None else (Path(os.environ[ENV_ROOT]) if os.environ.get(ENV_ROOT) else None)
    train, test, num_classes = _LOADERS[name](root_path)
    val = None
    if val_fraction > 0:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train), generator=gen)
        n_val = max(1, int(round(val_fraction * len(train))))
        val, train = train.subset(perm[:n_val].sort().values), train.subset(perm[n_val:].sort().values)
    if train_limit is not None:
        train = train.head(train_limit)
    return Data(name=name, train=train, test=test, num_classes=num_classes, val=val)


# ------------------------------------------------------------------------------------------------
# IDX files (MNIST format)
# ------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_split(root: Path, prefix: str) -> DataSplit | None:
    images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x = torch.from_numpy(read_idx(images).copy()).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    return DataSplit(x, y)


@_loader("fashion-mnist")
def _fashion_mnist(root: Path | None) -> tuple[DataSplit, DataSplit, int]:
    candidates = [root, root / "fashion-mnist" if root else None] if root else [DEBIAN_FASHION_ROOT]
    for folder in [c for c in candidates if c is not None]:
        train, test = _idx_split(folder, "train"), _idx_split(folder, "t10k")
        if train is not None and test is not None:
            return train, test, 10
    where = ", ".join(str(c) for c in candidates if c is not None)
    raise DatasetNotFoundError(
        f"Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) not found in {where}. "
        "Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
        f"{DEBIAN_FASHION_ROOT}), or point --data-root / {ENV_ROOT} at a folder holding the four IDX files."
    )


@_loader("digits")
def _digits(root: Path | None) -> tuple[DataSplit, DataSplit, int]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetNotFoundError(
            "the digits dataset comes with scikit-learn: `pip install scikit-learn`"
        ) from exc
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed split
    n_test = 360
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    return DataSplit(x[train_idx], y[train_idx]), DataSplit(x[test_idx], y[test_idx]), 10


def _torchvision_split(cls_name: str, root: Path | None, how_to_get: str) -> tuple[DataSplit, DataSplit, int]:
    import torchvision

    if root is None:
        raise DatasetNotFoundError(f"{cls_name} needs a local root: pass --data-root or set {ENV_ROOT}. {how_to_get}")
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DatasetNotFoundError(f"{cls_name} not found under {root}: {exc}. {how_to_get}") from exc

    def split(ds) -> DataSplit:
        arr = torch.as_tensor(np.asarray(ds.data))
        x = arr.float().div_(255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
        return DataSplit(x, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))

    return split(train), split(test), 10


@_loader("mnist")
def _mnist(root: Path | None) -> tuple[DataSplit, DataSplit, int]:
    return _torchvision_split(
        "MNIST", root, "Place the MNIST raw files under ROOT/MNIST/raw (torchvision's layout); nothing is downloaded."
    )


@_loader("cifar10")
def _cifar10(root: Path | None) -> tuple[DataSplit, DataSplit, int]:
    return _torchvision_split(
        "CIFAR10", root, "Extract cifar-10-python.tar.gz into ROOT (ROOT/cifar-10-batches-py); nothing is downloaded."
    )
