"""The poisoning kind: poison the group's training split, train the cell's model under the cell's
defense on it (cached by the poisoned split's fingerprint, so a rerun loads it), and report the
clean test accuracy, its drop from the group's unpoisoned model, and the attack success rate.
Attacks that need a model (feature collision) retrain only the last layer of the group's model
(:func:`~robustbench_lite.eval.poisoning.evaluate_poisoning`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from ...eval.poisoning import PoisonResult, evaluate_poisoning
from ..plan import Cell
from ..rows import Row
from . import CellKind, Group, register_kind


@dataclass(frozen=True)
class PoisoningRow(PoisonResult):
    """The evaluation's result beside the group's model trained on the clean split."""

    clean_acc_unpoisoned: float
    clean_acc_drop: float


@register_kind("poisoning")
class Poisoning(CellKind):
    """Training-time attacks: clean accuracy, its drop, and the attack success rate."""

    row: ClassVar[type] = PoisoningRow
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (
        ("attack", True), ("model", True), ("defense", True), ("poison_rate", True),
    )

    def measure(self, cell: Cell, group: Group) -> Row:
        attack = cell.build()
        defense, data = cell.defense.build(), group.data
        if attack.needs_model:
            r = evaluate_poisoning(
                attack, data, defense, model=group.trained.model, retrain="last-layer", policy=group.policy,
                feature_space=cell.defense.name == "standard",
            )
        else:
            r = evaluate_poisoning(attack, data, defense, spec=cell.model, cache=group.cache, policy=group.policy)
        ref = group.trained.sidecar.get("clean_acc")
        ref = float(ref) if ref is not None else float("nan")
        values = PoisoningRow(**asdict(r), clean_acc_unpoisoned=ref, clean_acc_drop=ref - r.clean_acc)
        row = self.result(
            cell, group, values, method=attack, n=len(data.test), seconds=r.poison_seconds + r.train_seconds,
            attacked=r.n_poison, success_rate=r.attack_success_rate, model_key=r.model_key or group.trained.key,
        )
        return row, None
