"""The records of an evaluation: one :class:`AttackRecord` per attack, the :class:`Evaluation`
that holds them, and the one place a record becomes a stored payload and back
(:func:`record_payload`, :func:`record_from`), so a new field is added once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..core.attack import EvasionAttack
from ..core.threat import ThreatModel
from .adversarial import AdvExamples
from .escalate import Escalated


@dataclass(frozen=True)
class AttackRecord:
    """One attack's outcome on the evaluated points."""

    attack: EvasionAttack
    robust: Tensor | None  #: bool [n]; None when the attack failed
    seconds: float
    grad_evals: int
    forward_evals: int
    attacked: int
    scope: str
    target_hit_rate: float | None = None
    error: str = ""
    success_rate: float | None = None  #: min-norm attacks: share of attacked points with any adversarial
    median_l2: float | None = None  #: min-norm attacks: median distance of the adversarials found
    examples: AdvExamples | None = None  #: the broken points' adversarial images (only when asked to keep them)
    skipped: str = ""  #: why the attack did not run (it needs more of the model than the model gives)

    @property
    def robust_acc(self) -> float | None:
        return None if self.robust is None else float(self.robust.float().mean())


@dataclass(frozen=True)
class Evaluation:
    """Everything :func:`~robustbench_lite.evaluate` measured."""

    n: int
    correct: Tensor  #: bool [n]: clean prediction is right
    records: list[AttackRecord]  #: in the order of the attacks passed in
    worst_case: dict[ThreatModel, Tensor]  #: bool [n] per threat
    flags: dict[str, set[str]]  #: attack name or "worst_case:<threat>" -> flags
    plain_records: list[AttackRecord] | None = None  #: before an adaptive rerun (None: no rerun)
    model_flags: frozenset[str] = frozenset()  #: codes of the model-level checks that fired
    escalated: dict[ThreatModel, Escalated] = dataclasses.field(default_factory=dict)  #: the ladder, per threat

    @property
    def clean_acc(self) -> float:
        return float(self.correct.float().mean())


# what a stored record does not keep beside its numbers: the attack (the caller has it), the mask
# (stored beside the payload) and the adversarial images (kept only in a run's --save-adv files)
_NOT_IN_PAYLOAD = ("attack", "robust", "examples")
_PAYLOAD_FIELDS = tuple(f.name for f in dataclasses.fields(AttackRecord) if f.name not in _NOT_IN_PAYLOAD)
_REQUIRED = ("seconds", "grad_evals", "forward_evals", "attacked", "scope")


def record_payload(rec: AttackRecord) -> dict[str, Any]:
    """An attack record's numbers (its mask is stored beside them)."""
    return {name: getattr(rec, name) for name in _PAYLOAD_FIELDS}


def record_from(attack: EvasionAttack, payload: dict[str, Any], mask: Tensor | None) -> AttackRecord:
    """The record :func:`record_payload` stored, for ``attack`` (fields a payload from an older
    version lacks take their defaults)."""
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"a stored attack record lacks {missing}; the stage is damaged and is measured again")
    values = {k: payload[k] for k in _PAYLOAD_FIELDS if k in payload}
    for k, cast in (("seconds", float), ("grad_evals", int), ("forward_evals", int), ("attacked", int), ("scope", str)):
        values[k] = cast(values[k])
    if values.get("error") is None:
        values.pop("error", None)
    return AttackRecord(attack=attack, robust=mask, **values)
