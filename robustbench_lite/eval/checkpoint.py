"""Checkpoints of one evaluation: its stages stored as they finish, so a killed evaluation
resumes with only what is missing.

:func:`~robustbench_lite.eval.evasion.evaluate` names each stage (``checks``, ``attack:<id>``,
``probe:<threat>``, ``adaptive:<id>``, ``escalate:<threat>:<step>``) and puts its outcome (a JSON
payload and a per-point mask) into a :class:`Checkpoint` the moment it is done; on a rerun it
takes every stage it finds there instead of measuring it again.  The harness keeps the stages in
the results store (:class:`~robustbench_lite.harness.store.Store`, table ``stages``);
:class:`MemoryCheckpoint` keeps them in a dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from ..core.config import config_hash

if TYPE_CHECKING:
    from ..core.attack import EvasionAttack

Stage = tuple[dict[str, Any], Tensor | None]


class Checkpoint(Protocol):
    """Where an evaluation keeps its finished stages."""

    def get(self, name: str) -> Stage | None: ...

    def put(self, name: str, payload: dict[str, Any], mask: Tensor | None) -> None: ...


class MemoryCheckpoint:
    """Stages in a dict (``stages``): for tests and for resuming inside one process."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}

    def get(self, name: str) -> Stage | None:
        return self.stages.get(name)

    def put(self, name: str, payload: dict[str, Any], mask: Tensor | None) -> None:
        self.stages[name] = (dict(payload), None if mask is None else mask.clone())


def attack_id(attack: EvasionAttack) -> str:
    """A stage name part that names an attack and its settings."""
    return f"{attack.name}:{config_hash(attack.get_params(), 12)}"
