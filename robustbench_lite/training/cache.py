"""Trained models cached by config hash: ``<key>.safetensors`` + ``<key>.json`` sidecar.

Loading uses safetensors (no pickle), so a cache folder from elsewhere cannot run code.

The cache checks itself.  The sidecar records the SHA-256 of the weights file, checked on every
load; weights that are truncated, garbled, of another architecture or swapped for other weights,
and sidecars that do not parse or hold wrong types, are reported with a warning and treated as
missing (the model is retrained and the files replaced).  A sidecar written before hashes existed
is still read: its model's clean accuracy is measured again and must match the recorded one, and
the sidecar then gets the hash (the cache key never changes).  Temporary files of a save that was
killed are removed by :meth:`ModelCache.clean_stale`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.config import config_hash
from ..core.data import Data
from ..core.device import DevicePolicy, as_policy
from ..core.models import ModelSpec, accuracy, check_logits
from ..core.progress import Progress
from .defense import Defense

log = logging.getLogger(__name__)
HASH_FIELD = "weights_sha256"
_TEMP = re.compile(r"^\.(?P<key>.+)\.(?P<pid>\d+)\.(safetensors|json)$")
STALE_SECONDS = 6 * 3600.0  # a temp file this old is stale even if its pid is alive again (a reused pid)
ACC_TOLERANCE = 0.005  # re-measured vs recorded clean accuracy of an old sidecar (thread-count rounding)


@dataclass(frozen=True)
class TrainedModel:
    model: nn.Module
    key: str
    sidecar: dict[str, Any]
    from_cache: bool


def model_key(spec: ModelSpec, defense: Defense, data: Data, precision: str | None = None) -> str:
    """The cache key: model, defense and its settings, the exact training data, and the training
    precision when it is not float32 (``precision=None`` keeps the float32 keys unchanged)."""
    fields = {
        "model": spec.as_dict(),
        "defense": defense.name,
        "params": defense.get_params(),
        "data": data.name,
        "train": data.train.fingerprint(),
        "val": data.val.fingerprint() if data.val is not None else None,
    }
    if precision is not None:
        fields["precision"] = precision
    return config_hash(fields)


class ModelCache:
    """A folder of trained models; ``root=None`` disables caching."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def paths(self, key: str) -> tuple[Path, Path]:
        """The weights file and the sidecar of ``key``."""
        assert self.root is not None
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def load(self, key: str, model: nn.Module) -> dict[str, Any] | None:
        """Load ``key``'s weights into ``model`` and return its sidecar; ``None`` (with a warning
        for damage) when the files are missing or fail a check.  A sidecar without a weights hash
        comes back with ``verified = False`` (see :func:`train_or_load`)."""
        if self.root is None:
            return None
        weights, meta = self.paths(key)
        if not (weights.is_file() and meta.is_file()):
            return None
        sidecar, problem = read_sidecar(meta, key)
        if sidecar is None:
            log.warning("cached model %s: its sidecar %s %s; retraining", key, meta, problem)
            return None
        digest = file_sha256(weights)
        want = sidecar.get(HASH_FIELD)
        if want is not None and want != digest:
            log.warning(
                "cached model %s: the weights file %s is not the one saved after training (its SHA-256 changed); retraining",
                key, weights,
            )
            return None
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as exc:  # truncated or garbled file, another architecture's weights
            log.warning("cached model %s: the weights file %s cannot be loaded (%s: %s); retraining", key, weights,
                        type(exc).__name__, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
            return None
        return {**sidecar, "verified": want is not None}

    def save(self, key: str, model: nn.Module, sidecar: dict[str, Any]) -> dict[str, Any]:
        """Write the weights and the sidecar (with the weights' hash) atomically; returns the
        sidecar as written."""
        if self.root is None:
            return sidecar
        self.root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        weights, meta = self.paths(key)
        tmp_w, tmp_m = self.root / f".{key}.{os.getpid()}.safetensors", self.root / f".{key}.{os.getpid()}.json"
        try:
            save_file(state, str(tmp_w))
            sidecar = {**sidecar, HASH_FIELD: file_sha256(tmp_w)}
            sidecar.pop("verified", None)
            tmp_m.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
            os.replace(tmp_w, weights)  # weights first: a sidecar means complete
            os.replace(tmp_m, meta)
        finally:
            for tmp in (tmp_w, tmp_m):
                tmp.unlink(missing_ok=True)
        return sidecar

    def write_sidecar(self, key: str, sidecar: dict[str, Any]) -> None:
        """Replace ``key``'s sidecar atomically (the weights stay)."""
        if self.root is None:
            return
        _, meta = self.paths(key)
        tmp = self.root / f".{key}.{os.getpid()}.json"
        clean = {k: v for k, v in sidecar.items() if k != "verified"}
        try:
            tmp.write_text(json.dumps(clean, indent=2, sort_keys=True))
            os.replace(tmp, meta)
        finally:
            tmp.unlink(missing_ok=True)

    def clean_stale(self) -> list[Path]:
        """Remove temporary files that a killed save left (``.KEY.PID.safetensors/.json``): their
        process is gone, or they are older than ``STALE_SECONDS`` (6 hours).  Returns what it removed."""
        if self.root is None or not self.root.is_dir():
            return []
        removed = []
        now = time.time()
        for path in self.root.iterdir():
            m = _TEMP.match(path.name)
            if m is None or not path.is_file():
                continue
            try:
                old = now - path.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
            if old or not pid_alive(int(m["pid"])):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
        if removed:
            log.info("removed %d temporary file(s) of killed model saves from %s", len(removed), self.root)
        return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (this process counts as alive; a
    process we may not signal is taken as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _number(value: object, low: float = 0.0, high: float = math.inf) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high


# sidecar fields the harness reads back, and what they must hold (absent is fine: older sidecars)
_SIDECAR_CHECKS = {
    "key": (lambda v: isinstance(v, str), "a string"),
    "clean_acc": (lambda v: v is None or _number(v, 0.0, 1.0), "a number in [0, 1]"),
    "train_seconds": (lambda v: v is None or _number(v), "a number >= 0"),
    "train_points": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
    "curve": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of epoch records"),
    HASH_FIELD: (lambda v: isinstance(v, str) and len(v) == 64, "a SHA-256 hex digest"),
}


def read_sidecar(path: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """The sidecar at ``path`` if it parses and every field the harness reads is valid, else
    ``(None, what is wrong)``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"does not parse ({type(exc).__name__})"
    if not isinstance(data, dict):
        return None, f"holds a {type(data).__name__}, not a JSON object"
    for name, (ok, what) in _SIDECAR_CHECKS.items():
        if name in data and not ok(data[name]):
            return None, f"has {name} = {data[name]!r:.60}, which must be {what}"
    if data.get("key", key) != key:
        return None, f"belongs to another model ({data['key']!r})"
    return data, ""


def train_or_load(
    spec: ModelSpec,
    defense: Defense,
    data: Data,
    cache: ModelCache,
    *,
    device: torch.device | str = "cpu",
    progress: bool | Progress = True,
    policy: DevicePolicy | None = None,
) -> TrainedModel:
    """Return the model trained by ``defense`` on ``data``, from the cache when it is there.

    ``policy`` (default: float32 on ``device``) says where and in which precision it trains; a
    defense that never autocasts (``uses_autocast = False``) keeps the float32 cache key."""
    policy = policy if policy is not None else as_policy(device)
    device = policy.device
    key = model_key(spec, defense, data, policy.precision_tag() if defense.uses_autocast else None)
    model = spec.build(data)
    check_outputs(model, data, spec.name)
    sidecar = cache.load(key, model)
    if sidecar is not None:
        model = policy.model_to(model, training=True).eval()  # evaluation converts its own way, and back
        if sidecar.pop("verified"):
            return TrainedModel(model, key, sidecar, True)
        # a sidecar from before weight hashes: the weights must still give the recorded accuracy
        measured, recorded = accuracy(model, data.test, device), sidecar.get("clean_acc")
        if recorded is None or abs(measured - recorded) <= ACC_TOLERANCE:
            weights, _ = cache.paths(key)
            sidecar = {**sidecar, HASH_FIELD: file_sha256(weights)}
            cache.write_sidecar(key, sidecar)
            return TrainedModel(model, key, sidecar, True)
        log.warning(
            "cached model %s: clean accuracy %.4f now, %.4f when it was trained: the weights were changed; retraining",
            key, measured, recorded,
        )
    if len(data.train) == 0 and defense.needs_training_data:
        raise ValueError(f"{data.name} has no training points for {defense.name}: check train_limit")
    torch.manual_seed(defense.seed)
    model = spec.build(data)  # same seed, same initial weights
    train_log = defense.fit(model, data, progress=progress, policy=policy)
    sidecar = {
        "key": key,
        "model": spec.as_dict(),
        "defense": defense.name,
        "params": defense.get_params(),
        "data": data.name,
        "train_points": len(data.train),
        "seed": defense.seed,
        "clean_acc": accuracy(model, data.test, device),
        "train_seconds": train_log.seconds,
        "curve": train_log.as_dict()["epochs"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "device": policy.describe(),
    }
    sidecar = cache.save(key, model, sidecar)
    return TrainedModel(model.eval(), key, sidecar, False)


@torch.no_grad()
def check_outputs(model: nn.Module, data: Data, name: str) -> None:
    """The model's outputs on two images (training ones, else test ones: a user's data may hold
    only test points) must be logits ``(2, data.num_classes)``: fail before training, naming the
    fix, rather than deep inside a loss."""
    split = data.train if len(data.train) else data.test
    if len(split) == 0:
        raise ValueError(f"{data.name} has no points: check the data and train_limit")
    x = split.x[:2]
    was = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as exc:
        raise ValueError(
            f"model {name!r} fails on {data.name}'s images of shape {tuple(x.shape[1:])}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was)
    try:
        check_logits(out, x.shape[0], data.num_classes, data.num_classes)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"model {name!r} on {data.name}: {exc}") from None
