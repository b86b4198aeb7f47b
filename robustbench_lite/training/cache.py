"""Trained models cached by config hash: ``<key>.safetensors`` + ``<key>.json`` sidecar.

Loading uses safetensors (no pickle), so a cache folder from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
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
from ..core.models import ModelSpec, accuracy
from .defense import Defense


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

    def load(self, key: str, model: nn.Module) -> dict[str, Any] | None:
        if self.root is None:
            return None
        weights, meta = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        if not (weights.is_file() and meta.is_file()):
            return None
        model.load_state_dict(load_file(str(weights)))
        return json.loads(meta.read_text())

    def save(self, key: str, model: nn.Module, sidecar: dict[str, Any]) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tmp_w, tmp_m = self.root / f".{key}.{os.getpid()}.safetensors", self.root / f".{key}.{os.getpid()}.json"
        save_file(state, str(tmp_w))
        tmp_m.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        os.replace(tmp_w, self.root / f"{key}.safetensors")  # weights first: a sidecar means complete
        os.replace(tmp_m, self.root / f"{key}.json")


def train_or_load(
    spec: ModelSpec,
    defense: Defense,
    data: Data,
    cache: ModelCache,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    policy: DevicePolicy | None = None,
) -> TrainedModel:
    """Return the model trained by ``defense`` on ``data``, from the cache when it is there.

    ``policy`` (default: float32 on ``device``) says where and in which precision it trains; a
    defense that never autocasts (``uses_autocast = False``) keeps the float32 cache key."""
    policy = policy if policy is not None else as_policy(device)
    device = policy.device
    key = model_key(spec, defense, data, policy.precision_tag() if defense.uses_autocast else None)
    model = spec.build(data)
    sidecar = cache.load(key, model)
    if sidecar is not None:
        return TrainedModel(policy.model_to(model).eval(), key, sidecar, True)
    torch.manual_seed(defense.seed)
    model = spec.build(data)  # same seed, same initial weights
    log = defense.fit(model, data, progress=progress, policy=policy)
    policy.model_to(model)
    sidecar = {
        "key": key,
        "model": spec.as_dict(),
        "defense": defense.name,
        "params": defense.get_params(),
        "data": data.name,
        "train_points": len(data.train),
        "seed": defense.seed,
        "clean_acc": accuracy(model, data.test, device),
        "train_seconds": log.seconds,
        "curve": log.as_dict()["epochs"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "device": policy.describe(),
    }
    cache.save(key, model, sidecar)
    return TrainedModel(model.eval(), key, sidecar, False)
