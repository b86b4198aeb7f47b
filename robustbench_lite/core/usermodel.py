"""A user's architecture: a registry name (``small-cnn``, ``timm:resnet18``) or a function in
their own Python file (``my_net.py:build``), optionally behind a normalization layer.

A file builder is called as ``build(input_shape, num_classes, **kwargs)`` with
``input_shape = (channels, height, width)`` and must return an ``nn.Module`` that maps images in
[0, 1] (NCHW) to logits.  ``my_net.py`` alone means ``my_net.py:build``.  Importing the file runs
it, like ``--plugin``: point it only at your own code.

:class:`NormalizedModel` puts ``(x - mean) / std`` in front of a network, so attacks keep working
in [0, 1] pixel space (eps in that space) while the network sees the inputs it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .models import InputShape, Normalize, create_model
from .registry import line_in, user_code_error


class NormalizedModel(nn.Module):
    """``wrapped((x - mean) / std)``: normalization as the model's first layer."""

    def __init__(self, wrapped: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.wrapped = wrapped

    def forward(self, x: Tensor) -> Tensor:
        return self.wrapped(self.normalize(x))


def is_file_arch(arch: str) -> bool:
    """``path.py`` or ``path.py:function``."""
    return arch.split(":", 1)[0].endswith(".py") if not arch.startswith("timm:") else False


def split_file_arch(arch: str) -> tuple[Path, str]:
    """``("path.py", "function")`` of a file architecture (the function defaults to ``build``)."""
    path, _, fn = arch.partition(":")
    return Path(path), (fn or "build")


def file_digest(path: str | Path) -> str:
    """A short hash of a model file's source (a changed file gets new keys)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def import_builder(arch: str) -> Callable[..., Any]:
    """The function ``fn`` of ``path.py:fn`` (the file is imported once per process)."""
    path, fn = split_file_arch(arch)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} not found; pass --model path/to/file.py:function")
    resolved = path.resolve()
    name = f"robustbench_lite_user_model_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:10]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, resolved)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import {path}; pass a Python source file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise user_code_error(f"importing {path.name}", path, exc) from exc
    builder = getattr(module, fn, None)
    if not callable(builder):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{path.name} has no function {fn!r}; found {found[:8]}; pass --model {path.name}:NAME")
    return builder


def build_architecture(arch: str, input_shape: InputShape, num_classes: int, kwargs: dict[str, Any] | None = None,
                       normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> nn.Module:
    """The untrained network ``arch`` for images of ``input_shape`` and ``num_classes`` outputs,
    behind :class:`NormalizedModel` when ``normalize = (mean, std)``."""
    kwargs = dict(kwargs or {})
    if is_file_arch(arch):
        builder = import_builder(arch)
        path, fn = split_file_arch(arch)
        try:
            model = builder(tuple(input_shape), int(num_classes), **kwargs)
        except Exception as exc:
            if isinstance(exc, TypeError) and line_in(exc, path) is None:  # the call itself: the signature
                raise TypeError(f"{arch}: calling it as build(input_shape, num_classes) failed ({exc}); "
                                "give it the signature build(input_shape, num_classes)") from None
            raise user_code_error(f"{path.name}:{fn}{(tuple(input_shape), int(num_classes))}", path, exc) from exc
        if not isinstance(model, nn.Module):
            raise TypeError(f"{arch} returned {type(model).__name__}, not an nn.Module")
    else:
        model = create_model(arch, tuple(input_shape), int(num_classes), **kwargs)
    if normalize is not None:
        mean, std = normalize
        model = NormalizedModel(model, mean, std)
    return model


def parse_normalize(text: str, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"MEAN,STD"`` (one value each, every channel) or ``"m1,m2,m3,s1,s2,s3"`` (per channel)."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--normalize takes numbers MEAN,STD (or 3 means then 3 stds), got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--normalize takes finite numbers MEAN,STD (e.g. 0.5,0.25), got {text!r}")
    if len(values) < 2 or len(values) % 2:
        raise ValueError(f"--normalize takes MEAN,STD or one mean and one std per channel, got {text!r}")
    half = len(values) // 2
    mean, std = tuple(values[:half]), tuple(values[half:])
    check_normalize(mean, std, channels)
    return mean, std


def check_normalize(mean: Sequence[float], std: Sequence[float], channels: int | None = None) -> None:
    if len(mean) != len(std) or not mean:
        raise ValueError(f"normalize needs as many means as stds, got {list(mean)} and {list(std)}")
    try:
        values = [float(v) for v in (*mean, *std)]
    except (TypeError, ValueError):
        raise ValueError(f"normalize takes numbers, got mean {list(mean)} and std {list(std)}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"normalize mean and std must be finite numbers, got mean {list(mean)} and std {list(std)}")
    if channels is not None and len(mean) not in (1, channels):
        if channels == 1:
            fix = "give one mean and one std (MEAN,STD)"
        else:
            fix = f"give one mean and one std for all channels, or {channels} of each ({2 * channels} values)"
        raise ValueError(f"normalize has {len(mean)} means and {len(std)} stds, but the images have {channels} "
                         f"channel{'s' if channels != 1 else ''}; {fix}")
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize stds must be > 0, got {list(std)}")
    if any(not 0.0 <= m <= 1.0 for m in mean) or any(s > 1.0 for s in std):
        raise ValueError(
            f"normalize mean {list(mean)} / std {list(std)} look like 0-255 values; give them for pixels in [0, 1] "
            "(divide by 255, e.g. 0.4914 rather than 125.3)"
        )
