"""Specs: plain, hashable descriptions of what a cell trains and runs (data, defense, attack).

The model spec (:class:`~robustbench_lite.core.models.ModelSpec`) lives with the model zoo, since the
trained-model cache uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.data import Data, load
from ..core.registry import ATTACKS, create_defense
from ..core.threat import ThreatModel


@dataclass(frozen=True)
class DataSpec:
    """A dataset and how much of it to train on (``train_limit`` keeps the first points)."""

    name: str
    train_limit: int | None = None
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        from ..core.data import check_train_limit

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a dataset name must be a non-empty string, got {self.name!r}")
        check_train_limit(self.train_limit)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {self.val_fraction!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "train_limit": self.train_limit, "val_fraction": self.val_fraction}

    def load(self, root: str | Path | None = None) -> Data:
        """The data this spec names (a registered dataset, read from ``root``)."""
        return load(self.name, root, val_fraction=self.val_fraction, train_limit=self.train_limit)


@dataclass(frozen=True)
class DefenseSpec:
    """A defense (training recipe) by registry name with its settings."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def build(self):
        return create_defense(self.name, **self.params)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params}


@dataclass(frozen=True)
class AttackSpec:
    """What a cell runs, by registry name with its settings other than the threat (norm and eps
    come from the cell): an attack, or for a kind that runs something else (a verifier), its name
    in that kind's registry."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def supports(self, threat: ThreatModel) -> bool:
        return threat.norm in ATTACKS.get(self.name).norms
