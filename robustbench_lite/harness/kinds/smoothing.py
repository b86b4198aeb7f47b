"""The smoothing kind: randomized smoothing's probabilistic L2 certificate (Cohen, Rosenfeld &
Kolter, ICML 2019) for any model, however large.

A smoothing cell runs CERTIFY (:class:`~robustbench_lite.certify.smoothing.Smoothing`: ``n0``
draws pick the class, ``n`` draws bound its probability at level ``alpha``) on the first ``n``
test points of the group's model, and reports the certified accuracy of the smoothed classifier at
the cell's L2 radius and at a fixed grid of radii.  Its guarantee holds with probability
``1 − alpha`` per point, so it has its own table and never enters the deterministic ``certified``
column.  The number of noise draws is in the row: with all ``n`` draws agreeing the largest radius
it can certify is ``σ Φ⁻¹(α^(1/n))`` (``max_radius``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...certify.binomial import all_agree_radius
from ...certify.smoothing import Smoothing
from ..plan import Cell
from ..rows import Row
from . import CellKind, Group, register_kind

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)  # the L2 radii of every row's curve


@dataclass(frozen=True)
class SmoothingRow:
    norm: str
    eps: float  # the cell's L2 radius: certified_acc is measured there
    n: int  # points
    sigma: float  # the noise of the smoothed classifier
    n0: int  # draws that pick the class
    draws: int  # draws that bound its probability (the paper's n)
    alpha: float  # the guarantee holds with probability 1 - alpha per point
    clean_acc: float  # the base model on the clean points
    certified_acc: float  # smoothed prediction correct and certified radius >= eps
    abstain_rate: float
    max_radius: float  # the largest radius `draws` agreeing draws can certify
    r0_00: float  # certified accuracy at L2 radius 0 (the smoothed classifier's accuracy)
    r0_25: float
    r0_50: float
    r0_75: float
    r1_00: float
    r1_50: float
    seconds: float


@register_kind("smoothing")
class Smoothed(CellKind):
    """Randomized smoothing (L2, probabilistic): certified accuracy at the cell's radius and a grid."""

    row: ClassVar[type] = SmoothingRow
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (
        ("eps", True), ("sigma", True), ("model", True), ("defense", True), ("certified_acc", False),
    )

    def knows(self, method: str) -> bool:
        return method == "smoothing"  # the name its cells give (AttackSpec("smoothing", settings))

    def build(self, cell: Cell) -> Any:
        if cell.threat.norm not in Smoothing.norms:  # the certificate is an L2 radius
            raise ValueError(f"randomized smoothing certifies L2 radii; give the cell an l2 threat, not {cell.threat.norm.value}")
        return Smoothing(**cell.attack.params)

    def key_fields(self, cell: Cell) -> dict[str, Any]:
        return {"kind": self.name, "threat": cell.threat.label}

    def measure(self, cell: Cell, group: Group) -> Row:
        smoothing = cell.build()
        points = group.data.test.head(cell.n)
        x, y = group.policy.batch_to(points.x), points.y
        model = group.trained.model
        with torch.no_grad():
            clean = float((model(x).argmax(1).cpu() == y).float().mean())
        gen = torch.Generator(device=group.policy.device).manual_seed(smoothing.seed)
        r = smoothing.evaluate(model, x, y.to(torch.long), gen, radii=(cell.threat.eps, *RADII))
        at_eps, curve = r.certified_acc[0], r.certified_acc[1:]
        values = SmoothingRow(
            cell.threat.norm.value, cell.threat.eps, cell.n, smoothing.sigma, smoothing.n0, smoothing.n,
            smoothing.alpha, clean, at_eps, r.abstain_rate, all_agree_radius(smoothing.sigma, smoothing.n, smoothing.alpha),
            *curve, r.seconds,
        )
        envelope = {"robust_acc": at_eps, "forward_evals": cell.n * (smoothing.n0 + smoothing.n), "attacked": cell.n}
        return self.result(cell, group, values, method=smoothing, **envelope), None
