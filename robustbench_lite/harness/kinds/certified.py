"""The certified kind: the share of a row's points a verifier proves robust, beside the worst case.

A certified cell names a verifier (:mod:`robustbench_lite.certify`) and a threat.  It certifies the
first ``n`` test points of the group's model and stores the per-point certified mask, the
verifier's seconds, and the per-point certified radius found by bisection on eps over
``[0, 2 eps]`` to ``eps / 4`` (:meth:`~robustbench_lite.certify.Verifier.radius`, started from the
certificate at eps): the certified-accuracy-vs-eps curve (``curve_eps``, ``curve``) that the report
draws on the same axes as the attacked curve.  Sound verifiers can be combined: ``union_acc`` is the
share certified by this cell's verifier or by any certified cell of the group run before it on the
same points and threat, so the row's last verifier holds the union of all of them.

When the group has an evasion worst case on the same points and threat, a certified point that an
attack broke raises ``certified-broken`` (the certificate, or the model, is unsound).  The evasion
tables get a ``certified`` column (the union over the row's verifiers) right after ``worst_case``.
A model the verifier cannot parse (an unsupported layer) raises a ``ValueError`` naming the layer
and the supported ones; the base stores it as an error row and the run goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...certify import VERIFIERS, create_verifier
from ...core.threat import ThreatModel
from ...eval.flags import CERTIFIED_BROKEN
from ..identity import distinguish
from ..plan import Cell
from ..rows import WORST_CASE, CellResult, Row
from . import CellKind, Group, register_kind, rows_of_kind, wide_key

COLUMN = "certified"
CURVE_STEPS = 4  # the radius bisection's resolution: eps / CURVE_STEPS, over [0, 2 eps]


@dataclass(frozen=True)
class CertifiedRow:
    norm: str
    eps: float
    n: int
    clean_acc: float
    certified_acc: float  # share of the n points proven robust in the whole ball
    worst_case: float | None  # the attacked worst case on the same points (an upper bound)
    seconds: float  # the verifier's time for the certificate at eps
    union_acc: float | None = None  # certified by this or an earlier verifier of the group (same points)
    verifiers: str = ""  # the verifiers of the union, '+'-joined
    curve_seconds: float | None = None  # the radius bisection
    curve_eps: list[float] | None = None
    curve: list[float] | None = None  # share of the n points with certified radius >= each curve_eps
    _radii: list[float] | None = None  # per point (private: left out of the CSVs)


@register_kind("certified")
class Certified(CellKind):
    """Verified robustness: the share of points a verifier proves robust, beside the attacked worst case."""

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
        eps = cell.threat.eps
        start = time.perf_counter()
        radii = verifier.radius(model, x, y, cell.threat.norm, hi=2 * eps, tol=eps / CURVE_STEPS,
                                known=(eps, certified)).cpu()
        curve_seconds = time.perf_counter() - start
        grid = [eps * i / CURVE_STEPS for i in range(2 * CURVE_STEPS + 1)]
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean()) if len(points) else float("nan")
        union, names = certified.clone(), [label(verifier.name, verifier.get_params())]
        for row, mask in _certified_before(cell, group):
            union |= mask.cpu().bool()
            names.append(label(row.attack, json.loads(row.attack_params or "{}")))
        worst = _worst_case(cell, group)
        flags = ""
        if worst is not None and bool((union & ~worst[1].cpu().bool()).any()):
            flags = CERTIFIED_BROKEN
        values = CertifiedRow(
            cell.threat.norm.value, eps, cell.n, clean, float(certified.float().mean()),
            None if worst is None else worst[0].robust_acc, seconds,
            union_acc=float(union.float().mean()), verifiers="+".join(sorted(set(names))),
            curve_seconds=curve_seconds, curve_eps=[round(e, 10) for e in grid],
            curve=[clean] + [float((radii >= e - 1e-12).float().mean()) for e in grid[1:]],  # eps 0: clean
            _radii=[round(float(r), 8) for r in radii],
        )
        return self.result(cell, group, values, method=verifier, robust_acc=values.certified_acc, flags=flags), certified

    def wide_columns(self, rows: list[CellResult]) -> dict[tuple, dict[str, Any]]:
        out: dict[tuple, dict[str, Any]] = {}
        for r in rows_of_kind(distinguish(rows), self.name):
            if r.status != "ok" or r.robust_acc is None:
                continue
            cols = out.setdefault(wide_key(r), {COLUMN: 0.0, "flags": set()})
            union = json.loads(r.metrics).get("union_acc") if r.metrics else None
            cols[COLUMN] = max(cols[COLUMN], r.robust_acc, union if union is not None else 0.0)
            cols["flags"].update(f for f in r.flags.split(";") if f)
        return out


def label(name: str, params: dict[str, Any]) -> str:
    """A verifier's name with its settings that differ from the defaults (batch size aside), e.g.
    ``crown[intermediate=ibp]``."""
    defaults = create_verifier(name).get_params()
    changed = [f"{k}={v}" for k, v in sorted(params.items()) if k != "batch_size" and defaults.get(k) != v]
    return f"{name}[{','.join(changed)}]" if changed else name


def _certified_before(cell: Cell, group: Group) -> list[Row]:
    """The group's other certified rows on the cell's points and threat (ok, with a mask)."""
    out = []
    for row, mask in group.latest().values():
        if row.kind == cell.kind and row.key != cell.key and row.status == "ok" and mask is not None \
                and row.n == cell.n and ThreatModel(row.norm, row.eps) == cell.threat:
            out.append((row, mask))
    return out


def _worst_case(cell: Cell, group: Group) -> Row | None:
    """The group's evasion worst case on the cell's points and threat, if there is one."""
    for row, mask in group.latest().values():
        same_points = row.n == cell.n and ThreatModel(row.norm, row.eps) == cell.threat
        if row.attack == WORST_CASE and row.status == "ok" and mask is not None and same_points:
            return row, mask
    return None
