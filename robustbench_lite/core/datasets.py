"""The built-in datasets, each a loader registered with ``@register_dataset``.

``fashion-mnist`` reads the IDX ``.gz`` files that Debian's ``dataset-fashion-mnist`` package
installs (or any folder holding them); ``digits`` is scikit-learn's bundled 8x8 set (for fast
tests); ``mnist`` and ``cifar10`` go through torchvision from a local root, never downloading.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from .data import ENV_ROOT, DatasetNotFoundError, DataSplit, default_eps
from .registry import register_dataset

DEBIAN_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


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


@register_dataset("fashion-mnist")
@default_eps(linf=0.1, l2=1.5)
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


@register_dataset("digits")
@default_eps(linf=0.1, l2=1.0)
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


@register_dataset("mnist")
@default_eps(linf=0.3, l2=2.0)
def _mnist(root: Path | None) -> tuple[DataSplit, DataSplit, int]:
    return _torchvision_split(
        "MNIST", root, "Place the MNIST raw files under ROOT/MNIST/raw (torchvision's layout); nothing is downloaded."
    )


@register_dataset("cifar10")
@default_eps(linf=8 / 255, l2=0.5)
def _cifar10(root: Path | None) -> tuple[DataSplit, DataSplit, int]:
    return _torchvision_split(
        "CIFAR10", root, "Extract cifar-10-python.tar.gz into ROOT (ROOT/cifar-10-batches-py); nothing is downloaded."
    )
