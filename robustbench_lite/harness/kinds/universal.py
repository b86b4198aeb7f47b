"""The universal kind: one perturbation for every input (UAP, SGA), fitted on the first
:data:`FIT_POINTS` training points and measured on the first ``n`` test points by its fooling rate
next to random noise of the same norm (:func:`~robustbench_lite.eval.universal.evaluate_universal`;
its result's fields are this kind's columns)."""

from __future__ import annotations

from typing import ClassVar

from ...eval.universal import UniversalResult, evaluate_universal
from ..plan import Cell
from ..rows import Row
from . import CellKind, Group, register_kind

FIT_POINTS = 500  # the universal attacker's set: the first training points


@register_kind("universal")
class Universal(CellKind):
    """One perturbation for all inputs: fooling rate against the random-noise floor."""

    row: ClassVar[type] = UniversalResult
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (
        ("norm", True), ("eps", True), ("model", True), ("defense", True), ("fooling_rate", False),
    )

    def measure(self, cell: Cell, group: Group) -> Row:
        attack = cell.build()
        fit, test = group.data.train.head(FIT_POINTS), group.data.test.head(cell.n)
        r = evaluate_universal(group.trained.model, attack, fit, test, policy=group.policy)
        row = self.result(cell, group, r, method=attack, robust_acc=r.acc_under_delta, success_rate=r.fooling_rate, attacked=r.n)
        return row, None
