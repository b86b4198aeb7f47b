"""Data: :class:`DataSplit` / :class:`Data` (float images in [0, 1], NCHW, and integer labels) and
:func:`load`, which builds one from a registered dataset loader.

A dataset is a loader function ``(root: Path | None) -> (train, test, num_classes)`` registered with
``@register_dataset("name")`` (the built-ins are in :mod:`robustbench_lite.core.datasets`; a plugin
file or a package's ``robustbench_lite.datasets`` entry points add more).  A missing dataset raises
:class:`DatasetNotFoundError` that says how to get it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .registry import DATASETS, list_datasets
from .threat import Norm

ENV_ROOT = "RBL_DATA_ROOT"


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


def default_eps(**by_norm: float):
    """Declare a dataset loader's usual budgets per norm (pixels in [0, 1]), what an evaluation
    without an eps uses: ``@register_dataset("mine")`` over ``@default_eps(linf=0.1, l2=1.5)``."""
    eps = {Norm.parse(k): float(v) for k, v in by_norm.items()}
    if any(not 0 < v <= 1e3 for v in eps.values()):
        raise ValueError(f"default eps must be > 0 and at most 1000 (pixels in [0, 1]), got {by_norm}")

    def decorate(loader):
        loader.default_eps = eps
        return loader

    return decorate


def dataset_default_eps(name: str, norm: Norm) -> float | None:
    """The registered dataset ``name``'s usual budget under ``norm`` (``None``: none declared)."""
    return getattr(DATASETS.get(name), "default_eps", {}).get(norm)


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
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list_datasets()} (or --plugin a file that registers it)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    check_train_limit(train_limit)
    root_path = Path(root) if root is not None else (Path(os.environ[ENV_ROOT]) if os.environ.get(ENV_ROOT) else None)
    train, test, num_classes = _checked(name, DATASETS.get(name)(root_path))
    val = None
    if val_fraction > 0:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train), generator=gen)
        n_val = max(1, int(round(val_fraction * len(train))))
        val, train = train.subset(perm[:n_val].sort().values), train.subset(perm[n_val:].sort().values)
    if train_limit is not None:
        train = train.head(train_limit)
    return Data(name=name, train=train, test=test, num_classes=num_classes, val=val)


def check_train_limit(train_limit: object) -> None:
    """``train_limit`` is ``None`` (all training points) or an int >= 1."""
    if train_limit is not None and (isinstance(train_limit, bool) or not isinstance(train_limit, int) or train_limit < 1):
        raise ValueError(f"train_limit must be None (all training points) or an int >= 1, got {train_limit!r}")


def _checked(name: str, loaded: object) -> tuple[DataSplit, DataSplit, int]:
    """A dataset loader's result, checked: ``(train, test, num_classes)`` of images in [0, 1]."""
    if not (isinstance(loaded, tuple) and len(loaded) == 3 and isinstance(loaded[0], DataSplit)
            and isinstance(loaded[1], DataSplit) and isinstance(loaded[2], int)):
        raise TypeError(f"dataset {name!r}: a loader must return (train: DataSplit, test: DataSplit, num_classes: int)")
    train, test, num_classes = loaded
    # float16/float64 images are accepted as float32 (the models' precision)
    train, test = (DataSplit(s.x.float(), s.y) if s.x.is_floating_point() and s.x.dtype != torch.float32 else s for s in (train, test))
    if num_classes < 2:
        raise ValueError(f"dataset {name!r}: num_classes must be >= 2, got {num_classes}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"dataset {name!r}: the loader returned an empty {'train' if len(train) == 0 else 'test'} split")
    for split_name, split in (("train", train), ("test", test)):
        if not split.x.is_floating_point() or float(split.x.min()) < 0 or float(split.x.max()) > 1:
            raise ValueError(f"dataset {name!r}: {split_name} images must be floats in [0, 1]; divide uint8 images by 255")
        if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= num_classes):
            raise ValueError(f"dataset {name!r}: {split_name} labels must lie in [0, {num_classes})")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(f"dataset {name!r}: train and test images differ in shape")
    return train, test, num_classes


__all__ = ["ENV_ROOT", "Data", "DataSplit", "DatasetNotFoundError", "list_datasets", "load"]
