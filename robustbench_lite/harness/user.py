"""A user's model and data as a harness group, so the existing cell kinds run on it unchanged.

The harness trains a model per (data, model, defense).  A user's model is the same kind of group:

* :class:`UserDataSpec`: evaluation points from a folder, an ``.npz`` or memory (carried with
  the spec; keyed by a content hash, so a moved file keeps its results);
* :class:`UserModelSpec`: the architecture (registry name, ``timm:NAME``, ``file.py:function``, a
  pickled module or an in-memory module), its class count and normalization, and what it gives an
  attacker (``access``: gradients, or only scores or labels, as behind an API);
* :class:`UserWeightsSpec`: the "defense" ``user-weights`` whose training is loading the
  checkpoint (:class:`~robustbench_lite.training.weights.UserWeights`), keyed by the weights'
  hash, so a rerun with the same file resumes and a changed file is a new model.

:func:`prepare` reads and checks everything before any work (weights that do not fit, images the
model cannot take, labels outside its classes), so a bad input fails at once with its fix.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.access import Access, restrict
from ..core.data import Data, DataSplit, load
from ..core.models import ModelSpec
from ..core.registry import DATASETS
from ..core.threat import Norm, ThreatModel
from ..core.userdata import (
    as_labels,
    as_unit_nchw,
    convert_channels,
    fingerprint,
    read_image_folder,
    read_npz,
)
from ..core.usermodel import NormalizedModel, build_architecture, file_digest, is_file_arch, split_file_arch
from ..training.weights import UserWeights, file_sha256, read_checkpoint, state_fingerprint
from .attack_sets import attack_specs, curve_spec
from .plan import Cell
from .specs import DataSpec, DefenseSpec

log = logging.getLogger(__name__)


# -- specs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserDataSpec(DataSpec):
    """Evaluation points that are not a registered dataset; ``points`` carries them (train empty)."""

    fingerprint: str = ""
    source: str = field(default="", compare=False)
    points: Data | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint}

    def load(self, root: str | Path | None = None) -> Data:
        if self.points is None:
            raise ValueError(f"user data {self.name!r} travels with its spec; rebuild the plan from {self.source}")
        return self.points


@dataclass(frozen=True)
class UserModelSpec(ModelSpec):
    """A user's architecture; ``name`` is what the model column shows."""

    num_classes: int = 0
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    source: str = ""  # what identifies the architecture: a file's digest, a pickle's or a module's hash
    arch: str = field(default="", compare=False)  # registry name or resolved "path.py:fn" ("" = name)
    pickled: str = field(default="", compare=False)  # a trusted pickled module's path
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    access: str = Access.GRADIENTS.value  # "scores" or "labels": seen through ScoresOnly / LabelOnly

    def build(self, data: Data) -> nn.Module:
        return restrict(self._network(data), self.access)

    def _network(self, data: Data) -> nn.Module:
        if self.module is not None:
            model = copy.deepcopy(self.module)
        elif self.pickled:
            model = read_checkpoint(self.pickled, trust_pickle=True)
            if not isinstance(model, nn.Module):
                raise ValueError(f"{Path(self.pickled).name} holds a state dict, not a module; pass --model ARCH")
        else:
            return build_architecture(self.arch or self.name, data.input_shape, self.num_classes or data.num_classes,
                                      self.kwargs, self.normalize)
        model = model.cpu().float()
        return NormalizedModel(model, *self.normalize) if self.normalize is not None else model

    def check(self, data: Data) -> None:
        """Nothing: :func:`prepare` built, loaded and checked the model already."""

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "kwargs": dict(self.kwargs), "num_classes": self.num_classes,
               "normalize": self.normalize, "source": self.source}
        if self.access != Access.GRADIENTS.value:  # the keys of models seen whole stay what they were
            out["access"] = self.access
        return out


@dataclass(frozen=True)
class UserWeightsSpec(DefenseSpec):
    """The ``user-weights`` recipe: load the checkpoint at ``path`` (none: an in-memory module).
    ``name`` is what the defense column shows (the weights file's name)."""

    path: str = field(default="", compare=False)
    trust_pickle: bool = field(default=False, compare=False)

    def build(self) -> UserWeights:
        return UserWeights(sha256=str(self.params.get("sha256", "")), path=self.path, trust_pickle=self.trust_pickle)

    def as_dict(self) -> dict[str, Any]:
        return {"name": UserWeights.registry_name, "params": dict(self.params)}


# -- parsing ------------------------------------------------------------------------------------------
def parse_number(text: str, what: str = "eps") -> float:
    """A number, or a fraction like ``8/255``."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what} {text!r} is not a number; write e.g. 0.1 or 8/255") from None


def parse_threat(text: str) -> ThreatModel:
    """``NORM:EPS`` with EPS a number or a fraction (``linf:8/255``)."""
    norm, sep, eps = text.partition(":")
    if not sep:
        raise ValueError(f"cannot parse threat {text!r}; write it as NORM:EPS, e.g. linf:0.1, linf:8/255 or l2:1.5")
    return ThreatModel(Norm.parse(norm), parse_number(eps))


def parse_curve(text: str) -> tuple[Norm, tuple[float, ...]]:
    """``NORM:START:STOP:COUNT`` (COUNT evenly spaced eps, ends included; 0 stands for clean)."""
    parts = text.split(":")
    if len(parts) != 4:
        raise ValueError(f"cannot parse --eps-curve {text!r}; write NORM:START:STOP:COUNT, e.g. linf:0:0.2:11")
    norm = Norm.parse(parts[0])
    start, stop = parse_number(parts[1], "curve start"), parse_number(parts[2], "curve stop")
    try:
        count = int(parts[3])
    except ValueError:
        raise ValueError(f"--eps-curve COUNT must be a whole number, got {parts[3]!r}") from None
    if count < 2 or not 0 <= start < stop:
        raise ValueError(f"--eps-curve {text!r}: need 0 <= START < STOP and COUNT >= 2")
    from .kinds.curve import MAX_POINTS

    most = MAX_POINTS + (1 if start == 0 else 0)  # eps 0 is the clean accuracy, not an attacked eps
    if count > most:
        raise ValueError(f"--eps-curve {text!r}: COUNT is at most {most} ({MAX_POINTS} attacked eps"
                         f"{' plus eps 0' if start == 0 else ''}), got {count}; space the eps wider")
    grid = tuple(float(v) for v in torch.linspace(start, stop, count, dtype=torch.float64).tolist())
    positive = tuple(e for e in grid if e > 0)
    for e in positive:
        ThreatModel(norm, e)  # eps checks (Linf eps <= 1, ...) before any work
    return norm, positive


# -- data -------------------------------------------------------------------------------------------
def resolve_data(source: object, *, data_root: str | Path | None = None, channels: int | None = None,
                 num_classes: int | None = None, name: str | None = None) -> tuple[DataSpec, Data]:
    """The spec and data of ``source``: a registered dataset name, a folder, an ``.npz`` path, a
    :class:`Data`, or an ``(x, y)`` pair.  Images end in [0, 1] NCHW; ``channels`` converts."""
    if isinstance(source, str) and source in DATASETS and not Path(source).exists():
        data = load(source, data_root)
        if channels is None or channels == data.input_shape[0]:
            return DataSpec(source), data
        return _user(source, convert_channels(data.test.x, channels), data.test.y, num_classes or data.num_classes,
                     str(source))
    if isinstance(source, Data):
        return _user(name or source.name, convert_channels(source.test.x, channels), source.test.y,
                     num_classes or source.num_classes, "Data")
    if isinstance(source, (tuple, list)) and len(source) == 2:
        x = convert_channels(as_unit_nchw(source[0], what="x"), channels)
        y = as_labels(source[1], x.shape[0], what="y")
        return _user(name or "tensors", x, y, num_classes or _classes(y), "(x, y)")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            x, y, classes = read_image_folder(path)
            return _user(name or _label(path), convert_channels(x, channels), y, num_classes or max(2, len(classes)),
                         str(path))
        if path.suffix.lower() == ".npz":
            if not path.is_file():
                raise FileNotFoundError(f"data file {str(path)!r} not found")
            x, y = read_npz(path)
            return _user(name or _label(path), convert_channels(x, channels), y, num_classes or _classes(y), str(path))
        if path.exists():
            raise ValueError(f"data {str(path)!r}: use a folder of class sub-folders (ImageFolder) or an .npz with x and y")
        raise FileNotFoundError(
            f"no dataset, folder or file named {str(source)!r}; registered datasets: {', '.join(DATASETS.list())} "
            "(or pass a folder of class sub-folders, or an .npz with x and y)"
        )
    raise TypeError(f"dataset must be a name, a path, a Data or an (x, y) pair, got {type(source).__name__}")


def _classes(y: torch.Tensor) -> int:
    return max(2, int(y.max()) + 1)


def _label(path: Path) -> str:
    """The dataset column for a path: its name, kept apart from registered datasets."""
    label = path.name or path.resolve().name
    return f"{label}-data" if label in DATASETS else label


def _user(name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, source: str) -> tuple[DataSpec, Data]:
    if int(y.max()) >= num_classes:
        raise ValueError(f"labels go up to {int(y.max())} but {num_classes} classes were given; "
                         f"pass --num-classes {int(y.max()) + 1} (or fix the labels)")
    test = DataSplit(x, y)
    data = Data(name=name, train=DataSplit(x[:0], y[:0]), test=test, num_classes=num_classes)
    return UserDataSpec(name, fingerprint=fingerprint(x, y), source=source, points=data), data


# -- model ------------------------------------------------------------------------------------------
def prepare(data: Data, *, arch: str | None = None, weights: str | Path | None = None, module: nn.Module | None = None,
            kwargs: dict[str, Any] | None = None, normalize: tuple | None = None, num_classes: int | None = None,
            trust_pickle: bool = False, name: str | None = None,
            access: Access | str = Access.GRADIENTS) -> tuple[UserModelSpec, UserWeightsSpec, nn.Module]:
    """The model and weights specs of a user's model, with the model built, loaded and checked on
    ``data`` (raises ``ValueError``/``TypeError``/``FileNotFoundError`` naming the fix).  With
    ``access`` "labels" (or "scores") the model is evaluated as an API that returns only its
    predicted label (or its scores): attacks that need more are skipped with a note, and its
    model column says so (``-label-only``, ``-scores-only``)."""
    k = num_classes or data.num_classes
    access = Access.parse(access)
    norm = None if normalize is None else (tuple(map(float, normalize[0])), tuple(map(float, normalize[1])))
    if module is not None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(module).__name__}")
        empty = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if empty:
            raise ValueError(f"the model's tensors are on the meta device (shapes without values, e.g. {empty[0]}); load "
                             "its weights first: model.to_empty(device='cpu') then model.load_state_dict(...)")
        digest = state_fingerprint(module)
        spec = UserModelSpec(type(module).__name__, num_classes=k, normalize=norm, source=f"module:{digest}", module=module)
        wspec = UserWeightsSpec(name or "user-weights", {"sha256": digest})
    else:
        if weights is None:
            raise ValueError("a user model needs its weights: pass --weights model.safetensors (or .pt)")
        wpath = Path(weights)
        if wpath.is_dir():
            inside = sorted(p.name for p in wpath.iterdir() if p.suffix.lower() in (".safetensors", ".pt", ".pth"))
            hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
            raise ValueError(f"weights {str(wpath)!r} is a folder; pass the checkpoint file inside it{hint}: "
                             ".safetensors, or a .pt/.pth state dict")
        if not wpath.is_file():
            raise FileNotFoundError(f"weights file {str(wpath)!r} not found")
        sha = file_sha256(wpath)
        wspec = UserWeightsSpec(name or wpath.name, {"sha256": sha}, path=str(wpath.resolve()), trust_pickle=trust_pickle)
        if arch is None:
            loaded = read_checkpoint(wpath, trust_pickle=trust_pickle)
            if not isinstance(loaded, nn.Module):
                raise ValueError(f"{wpath.name} holds a state dict, so the architecture must be named: pass --model "
                                 "small-cnn, timm:NAME or my_net.py:build")
            spec = UserModelSpec(type(loaded).__name__, num_classes=k, normalize=norm, source=f"pickle:{sha}",
                                 pickled=str(wpath.resolve()))
        elif is_file_arch(arch):
            path, fn = split_file_arch(arch)
            if not path.is_file():
                raise FileNotFoundError(f"model file {str(path)!r} not found; pass --model path/to/file.py:function")
            spec = UserModelSpec(f"{path.name}:{fn}", dict(kwargs or {}), num_classes=k, normalize=norm,
                                 source=file_digest(path), arch=f"{path.resolve()}:{fn}")
        else:
            spec = UserModelSpec(arch, dict(kwargs or {}), num_classes=k, normalize=norm, source="registry")
    if access is not Access.GRADIENTS:
        suffix = "-label-only" if access is Access.LABELS else "-scores-only"
        spec = dataclasses.replace(spec, name=spec.name + suffix, arch=spec.arch or spec.name, access=access.value)
    with warnings.catch_warnings(record=True) as caught:  # e.g. torch on a layer that came out empty: the
        warnings.simplefilter("always")                   # error below names the cause, the warning would leak
        model = spec.build(data)
        wspec.build().fit(model, data)
        check_on_data(model, data)
    for w in caught:
        log.debug("while preparing the model: %s", w.message)
    return spec, wspec, model


_CHANNELS = re.compile(r"to have (\d+) channels")


def check_on_data(model: nn.Module, data: Data) -> int:
    """Run the model on a few of the points: it must take the images and return logits with a
    column for every label.  Returns the number of classes."""
    x = data.test.x[:8]
    shape = tuple(x.shape[1:])
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0][:160]
        wanted = _CHANNELS.search(msg)
        fix = (f"add --channels {wanted.group(1)} to convert the images" if wanted else
               "check --model, or resize the images to the size the model was trained on")
        raise ValueError(f"the model cannot take the data's images of shape {shape} ({msg}); {fix}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape (batch, classes), got {got}; return the logits tensor")
    k = int(out.shape[1])
    top = int(data.test.y.max())
    if k < 2:
        raise ValueError(f"the model returns {k} output; a classifier needs one logit per class (>= 2)")
    if top >= k:
        raise ValueError(f"labels go up to {top} but the model has {k} classes; the labels must index the model's "
                         f"outputs 0..{k - 1}: relabel the data (or use the model trained on these classes)")
    return k


# -- cells ------------------------------------------------------------------------------------------
def user_cells(data: DataSpec, model: UserModelSpec, weights: UserWeightsSpec, *, threats: list[ThreatModel],
               attacks: str | list[str], n: int, num_classes: int,
               curves: list[tuple[Norm, tuple[float, ...]]] = (), curve_order: str = "up") -> list[Cell]:
    """Evasion cells (the attack set on survivors) per threat, and curve cells per curve."""
    from .kinds.curve import CurveCell

    cells: list[Cell] = []
    for threat in threats:
        for spec in attack_specs(attacks, threat.norm, num_classes):
            cells.append(Cell(data, model, weights, spec, threat, n, survivors=True))
    for norm, grid in curves:
        for spec in attack_specs(attacks, norm, num_classes):
            cells.append(CurveCell(data, model, weights, curve_spec(spec), ThreatModel(norm, grid[-1]),
                                   n, kind="curve", grid=grid, order=curve_order))
    if not cells:
        raise ValueError("nothing to evaluate: give --threats NORM:EPS (e.g. linf:0.1) and/or --eps-curve linf:0:0.2:11")
    return cells
