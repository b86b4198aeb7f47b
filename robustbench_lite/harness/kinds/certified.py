"""The certified kind: the share of a row's points a verifier proves robust, beside the worst case.

A certified cell names a verifier (:mod:`robustbench_lite.certify`) and a threat.  It certifies the
first ``n`` test points of the group's model and stores the per-point certified mask.  When the
group has an evasion worst case on the same points and threat, a certified point that an attack
broke raises ``certified-broken`` (the certificate, or the model, is unsound).  The evasion tables
get a ``certified`` column (the best verifier's share) right after ``worst_case``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from ...certify import VERIFIERS, create_verifier
from ...core.threat import ThreatModel
from ...eval.flags import CERTIFIED_BROKEN
from ..plan import Cell
from ..rows import WORST_CASE, CellResult, Row
from . import CellKind, Group, register_kind, rows_of_kind

COLUMN = "certified"


@dataclass(frozen=True)
class CertifiedRow:
    norm: str
    eps: float
    n: int
    clean_acc: float
    certified_acc: float  # share of the n points proven robust in the whole ball
    worst_case: float | None  # the attacked worst case on the same points (an upper bound)
    seconds: float


@register_kind("certified")
class Certified(CellKind):
    row: ClassVar[type] = CertifiedRow
    order: ClassVar[int] = 2  # after the evasion worst cases it is compared with
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (
        ("norm", True), ("eps", True), ("model", True), ("defense", True), ("certified_acc", False),
    )

    def knows(self, method: str) -> bool:
        return method in VERIFIERS

    def build(self, cell: Cell) -> Any:
        return create_verifier(cell.attack.name, **cell.attack.params)

    def key_fields(self, cell: Cell) -> dict[str, Any]:
        return {"kind": self.name, "threat": cell.threat.label}

    def measure(self, cell: Cell, group: Group) -> Row:
        verifier = cell.build()
        points = group.data.test.head(cell.n)
        x, y = group.policy.batch_to(points.x), group.policy.batch_to(points.y)
        model = group.trained.model
        start = time.perf_counter()
        certified = verifier.certify(model, x, y, cell.threat).cpu().bool()
        seconds = time.perf_counter() - start
        clean = float((group.trained.model(x).argmax(1) == y).float().mean()) if len(points) else float("nan")
        worst = _worst_case(cell, group)
        flags = ""
        if worst is not None and bool((certified & ~worst[1].cpu()).any()):
            flags = CERTIFIED_BROKEN
        values = CertifiedRow(
            cell.threat.norm.value, cell.threat.eps, cell.n, clean, float(certified.float().mean()),
            None if worst is None else worst[0].robust_acc, seconds,
        )
        return self.result(cell, group, values, method=verifier, robust_acc=values.certified_acc, flags=flags), certified

    def wide_columns(self, rows: list[CellResult]) -> dict[tuple, dict[str, Any]]:
        out: dict[tuple, dict[str, Any]] = {}
        for r in rows_of_kind(rows, self.name):
            if r.status != "ok" or r.robust_acc is None:
                continue
            cols = out.setdefault((r.dataset, r.model, r.defense, r.n, r.norm, r.eps), {COLUMN: 0.0, "flags": set()})
            cols[COLUMN] = max(cols[COLUMN], r.robust_acc)
            cols["flags"].update(f for f in r.flags.split(";") if f)
        return out


def _worst_case(cell: Cell, group: Group) -> Row | None:
    """The group's evasion worst case on the cell's points and threat, if there is one."""
    for row, mask in group.latest().values():
        same_points = row.n == cell.n and ThreatModel(row.norm, row.eps) == cell.threat
        if row.attack == WORST_CASE and row.status == "ok" and mask is not None and same_points:
            return row, mask
    return None
