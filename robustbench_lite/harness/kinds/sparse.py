"""The sparse kind: L0 evasion attacks (one-pixel) on the clean-correct points of the first ``n``
test points, reported by success rate and queries (:func:`~robustbench_lite.eval.sparse.evaluate_sparse`;
its result's fields are this kind's columns)."""

from __future__ import annotations

from typing import ClassVar

from ...eval.sparse import SparseResult, evaluate_sparse
from ..plan import Cell
from ..rows import Row
from . import CellKind, Group, register_kind


@register_kind("sparse")
class Sparse(CellKind):
    """L0 attacks: success rate and queries on the clean-correct points."""

    row: ClassVar[type] = SparseResult
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (
        ("pixels", True), ("model", True), ("defense", True), ("success_rate", False),
    )

    def measure(self, cell: Cell, group: Group) -> Row:
        attack = cell.build()
        r = evaluate_sparse(group.trained.model, attack, group.data.test.head(cell.n), policy=group.policy)
        return self.result(cell, group, r, method=attack, grad_evals=0, forward_evals=r.queries), None
