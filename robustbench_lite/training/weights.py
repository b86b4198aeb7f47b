"""A user's trained weights: read a checkpoint safely, fit it to an architecture, and the
``user-weights`` "defense" whose training is loading them.

* ``.safetensors``: read with safetensors (never runs code).
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: ``torch.load(weights_only=True)``, which only rebuilds
  tensors and plain containers.  A checkpoint that needs real unpickling (a whole pickled
  ``nn.Module``, or custom classes) is refused unless the caller passes ``trust_pickle=True``:
  unpickling runs whatever code the file names, so a checkpoint from an untrusted source could
  take over the machine.

A state dict nested under ``state_dict`` / ``model_state_dict`` / ``model`` (training-loop
checkpoints) is unwrapped, and a ``module.`` prefix on every key (``nn.DataParallel``) is
stripped.  A state dict that does not fit the architecture raises :class:`WeightsMismatch`,
listing the missing, unexpected and mis-shaped keys, with a hint when the mismatch is the image
channels or the class count.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import params_of, setting
from ..core.data import Data
from ..core.device import DevicePolicy
from .defense import Defense, TrainLog

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
_NESTED = ("state_dict", "model_state_dict", "model", "net", "weights")


class WeightsMismatch(ValueError):
    """A state dict that does not fit the model (the message lists what differs)."""


class PickleRefused(ValueError):
    """A checkpoint that only unpickling could read, refused without ``trust_pickle``."""


def file_sha256(path: str | Path, length: int = 16) -> str:
    """The hex SHA-256 of a file's bytes (first ``length`` characters): the weights' identity."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def state_fingerprint(module: nn.Module, length: int = 16) -> str:
    """A content hash of a module's state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor] | nn.Module:
    """A state dict (or, with ``trust_pickle``, possibly a whole module) from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found; pass the path of a .safetensors or .pt file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _state_dict(load_file(str(path)), path)
        except Exception as exc:  # safetensors raises its own error type
            raise ValueError(f"{path.name} is not a readable safetensors file ({str(exc)[:120]}); re-save it with "
                             "safetensors.torch.save_file(model.state_dict(), path)") from None
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(f"weights {path.name}: unknown file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # the weights-only reader met no Python class: not a checkpoint at all
            raise ValueError(f"{path.name} is not a readable torch checkpoint; save it with "
                             "torch.save(model.state_dict(), path)") from None
        if not trust_pickle:
            raise PickleRefused(
                f"{path.name} holds pickled Python objects (e.g. a whole nn.Module), and unpickling runs code from the "
                "file, so it is refused; save a state dict instead (torch.save(model.state_dict(), path) or "
                "safetensors), or pass --trust-pickle (trust_pickle=True) only for a file from a source you trust"
            ) from None
        loaded = _load_pickled(path)
    except Exception as exc:  # torch raises KeyError/RuntimeError/EOFError for files it cannot parse
        raise ValueError(f"{path.name} is not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:100]}); "
                         "save it with torch.save(model.state_dict(), path)") from None
    if isinstance(loaded, nn.Module):
        return loaded
    return _state_dict(loaded, path)


def _load_pickled(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # a pickled class whose module is not importable here, ...
        raise ValueError(f"{path.name} could not be unpickled ({type(exc).__name__}: {str(exc)[:120]}); make its "
                         "model class importable, or save a state dict instead") from None


def _state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint: a flat ``{name: tensor}`` dict, unwrapped and de-prefixed."""
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _NESTED:
            if isinstance(obj.get(key), dict):
                return _state_dict(obj[key], path)
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(
            f"{path.name} does not hold a state dict (name -> tensor) nor one under "
            f"{'/'.join(_NESTED)}; save it with torch.save(model.state_dict(), path)"
        )
    if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _short(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + more + "]"


def fit_state(model: nn.Module, state: dict[str, Tensor], *, what: str, num_classes: int | None = None,
              channels: int | None = None, input_shape: tuple[int, int, int] | None = None) -> None:
    """Load ``state`` into ``model`` (strict); a mismatch raises :class:`WeightsMismatch` (naming
    the images the model was built for, when ``input_shape`` is given)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shaped:
            parts.append("mis-shaped keys " + _short([f"{k}: file {a} vs model {b}" for k, a, b in shaped]))
        hint = _size_hint(shaped, input_shape) or _hint(shaped, num_classes, channels) or (
            "check --model (the architecture and its settings) against the network that saved the weights"
        )
        built = ""
        if input_shape is not None:
            c, h, w = input_shape
            built = f" (built for {h}x{w}-pixel images with {c} channel{'s' if c != 1 else ''}" + (
                f" and {num_classes} classes)" if num_classes is not None else ")")
        raise WeightsMismatch(f"{what} does not fit the model{built}: {'; '.join(parts)}. Fix: {hint}")
    model.load_state_dict(state, strict=True)


def _size_hint(shaped: list[tuple[str, tuple, tuple]], input_shape: tuple[int, int, int] | None) -> str:
    """A layer with no elements in the model but some in the file: the images are too small for
    the architecture (its flattened features shrank to nothing)."""
    if input_shape is None:
        return ""
    for _, file_shape, model_shape in shaped:
        if 0 in model_shape and 0 not in file_shape:
            _, h, w = input_shape
            return (f"the data's {h}x{w}-pixel images are too small for this architecture (a layer came out empty); "
                    "use the image size the model was trained on")
    return ""


def _hint(shaped: list[tuple[str, tuple, tuple]], num_classes: int | None, channels: int | None) -> str:
    for _, file_shape, model_shape in shaped:
        if len(file_shape) == 4 == len(model_shape) and file_shape[0] == model_shape[0] and file_shape[2:] == model_shape[2:]:
            if channels is not None and model_shape[1] == channels:
                return (f"the weights take {file_shape[1]}-channel images and the data has {channels}; "
                        f"add --channels {file_shape[1]} to convert the data")
    for _, file_shape, model_shape in shaped:
        if num_classes is not None and model_shape and model_shape[0] == num_classes and file_shape[1:] == model_shape[1:]:
            return (f"the weights have {file_shape[0]} output classes and the data {num_classes}; "
                    f"add --num-classes {file_shape[0]}")
    return ""


def inner_model(model: nn.Module) -> nn.Module:
    """The network a checkpoint belongs to: the model itself, or the one inside its wrappers (a
    normalizing wrapper, a label-only or scores-only view): each holds the next as ``wrapped``."""
    while isinstance(getattr(model, "wrapped", None), nn.Module):
        model = model.wrapped
    return model


def load_weights(model: nn.Module, path: str | Path, *, trust_pickle: bool = False, num_classes: int | None = None,
                 channels: int | None = None, input_shape: tuple[int, int, int] | None = None) -> None:
    """Read ``path`` and load it into ``model`` (into the network inside a normalizing wrapper)."""
    path = Path(path)
    loaded = read_checkpoint(path, trust_pickle=trust_pickle)
    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    fit_state(inner_model(model), state, what=f"weights {path.name}", num_classes=num_classes, channels=channels,
              input_shape=input_shape)


@dataclass(frozen=True, kw_only=True)
class UserWeights(Defense):
    """No training: the model's weights are the user's checkpoint (``path``), identified by its
    content hash ``sha256``.  The path is not a setting (it stays out of every key, so a moved file
    keeps its results); an empty path means the model arrives with its weights (an in-memory
    module)."""

    sha256: str = setting("")
    path: str = ""
    trust_pickle: bool = False

    registry_name: ClassVar[str] = "user-weights"
    uses_autocast: ClassVar[bool] = False
    needs_training_data: ClassVar[bool] = False

    def get_params(self) -> dict[str, Any]:
        params = params_of(self)
        params.pop("path")
        params.pop("trust_pickle")
        return params

    def fit(self, model: nn.Module, data: Data, *, device: torch.device | str = "cpu", progress: bool = True,
            policy: DevicePolicy | None = None) -> TrainLog:
        start = time.perf_counter()
        if self.path:
            if self.sha256 and file_sha256(self.path) != self.sha256:
                raise ValueError(f"weights {self.path} changed since the run was planned; rerun the command")
            load_weights(model, self.path, trust_pickle=self.trust_pickle, num_classes=data.num_classes,
                         channels=data.input_shape[0], input_shape=data.input_shape)
        model.eval()
        return TrainLog([], time.perf_counter() - start)
