"""What to run: cells = dataset x model x defense x (attack | verifier) x threat, each with a stable key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import config_hash
from ..core.models import ModelSpec
from ..core.registry import ATTACKS, KINDS
from ..core.threat import ThreatModel
from .specs import AttackSpec, DataSpec, DefenseSpec


@dataclass(frozen=True)
class Cell:
    """One measurement: ``attack`` (or a verifier) on the model ``defense`` trains on ``data``.

    ``kind`` names the cell kind (the harness registry) that runs it; empty means the kind the
    attack declares (``cell_kind``: evasion, universal, sparse, poisoning, ...).
    """

    data: DataSpec
    model: ModelSpec
    defense: DefenseSpec
    attack: AttackSpec
    threat: ThreatModel
    n: int
    survivors: bool = False
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", ATTACKS.get(self.attack.name).cell_kind)

    def build(self) -> Any:
        """The attack (or verifier) this cell runs, built by its kind."""
        return kind_of(self).build(self)

    @property
    def group(self) -> tuple[str, str, str]:
        """The trained model this cell evaluates: (data, model, defense) as a hashable key."""
        return (
            config_hash(self.data.as_dict()),
            config_hash(self.model.as_dict()),
            config_hash(self.defense.as_dict()),
        )

    @property
    def key(self) -> str:
        payload: dict[str, Any] = {
            "data": self.data.as_dict(),
            "model": self.model.as_dict(),
            "defense": self.defense.as_dict(),
            "attack": {"name": self.attack.name, "params": self.build().get_params()},
            "n": self.n,
            "survivors": self.survivors,
        }
        payload.update(kind_of(self).key_fields(self))
        return config_hash(payload)


def kind_of(cell: Cell):
    """The registered cell kind that runs ``cell`` (an instance; kinds hold no state)."""
    return KINDS.get(cell.kind)()


@dataclass(frozen=True)
class Plan:
    """Named cells; cells with the same key (the same measurement asked twice) are kept once."""

    name: str
    cells: tuple[Cell, ...]

    def __post_init__(self) -> None:
        unique: dict[str, Cell] = {}
        for c in self.cells:
            unique.setdefault(c.key, c)
        object.__setattr__(self, "cells", tuple(unique.values()))

    def groups(self) -> dict[tuple[str, str, str], list[Cell]]:
        out: dict[tuple[str, str, str], list[Cell]] = {}
        for c in self.cells:
            out.setdefault(c.group, []).append(c)
        return out
