"""What to run: cells = dataset x model x defense x attack x threat, each with a stable key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import config_hash
from .model_cache import ModelSpec
from .registry import ATTACKS, create_attack, create_defense
from .threat import AttackKind, Norm, ThreatModel


@dataclass(frozen=True)
class DataSpec:
    """A dataset and how much of it to train on (``train_limit`` keeps the first points)."""

    name: str
    train_limit: int | None = None
    val_fraction: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "train_limit": self.train_limit, "val_fraction": self.val_fraction}


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def build(self):
        return create_defense(self.name, **self.params)


@dataclass(frozen=True)
class AttackSpec:
    """An attack by name with its settings other than the threat (norm and eps come from the cell)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def supports(self, threat: ThreatModel) -> bool:
        return threat.norm in ATTACKS.get(self.name).norms


@dataclass(frozen=True)
class Cell:
    data: DataSpec
    model: ModelSpec
    defense: DefenseSpec
    attack: AttackSpec
    threat: ThreatModel
    n: int
    survivors: bool = False

    def build_attack(self):
        return create_attack(self.attack.name, norm=self.threat.norm, eps=self.threat.eps, **self.attack.params)

    @property
    def kind(self) -> str:
        """``evasion``, ``sparse`` (an evasion attack under L0), ``universal`` or ``poisoning``;
        it names the leaderboard CSV the cell's row goes to."""
        kind = ATTACKS.get(self.attack.name).kind
        if kind is AttackKind.EVASION:
            return "sparse" if self.threat.norm is Norm.L0 else "evasion"
        return kind.value

    @property
    def group(self) -> tuple[str, str, str]:
        """The trained model this cell evaluates: (data, model, defense) as a hashable key."""
        return (
            config_hash(self.data.as_dict()),
            config_hash(self.model.as_dict()),
            config_hash({"name": self.defense.name, "params": self.defense.params}),
        )

    @property
    def key(self) -> str:
        return config_hash(
            {
                "data": self.data.as_dict(),
                "model": self.model.as_dict(),
                "defense": {"name": self.defense.name, "params": self.defense.params},
                "attack": {"name": self.attack.name, "params": self.build_attack().get_params()},
                "n": self.n,
                "survivors": self.survivors,
            }
        )


@dataclass(frozen=True)
class Plan:
    name: str
    cells: tuple[Cell, ...]

    def groups(self) -> dict[tuple[str, str, str], list[Cell]]:
        out: dict[tuple[str, str, str], list[Cell]] = {}
        for c in self.cells:
            out.setdefault(c.group, []).append(c)
        return out
