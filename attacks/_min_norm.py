"""Bookkeeping shared by the minimum-norm attacks (FMN, DDN, DeepFool, HopSkipJump): each point's
smallest adversarial example so far, and the ``(x_adv, distances)`` pair a minimum-norm attack
returns (:meth:`robustbench_lite.EvasionAttack._perturb`).

Plugin-only machinery: the package never imports it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robustbench_lite import Geometry, ops


class Smallest:
    """Each point's smallest adversarial example found so far, measured in ``geometry``'s norm.

    ``d`` is ``inf`` where none was found; :meth:`offer` keeps a candidate when it is adversarial
    and smaller than the point's best (strictly, so the first of equal candidates stays)."""

    def __init__(self, x: Tensor, geometry: Geometry) -> None:
        self.x = x
        self.geometry = geometry
        self.best = x.clone()
        self.d = torch.full((x.shape[0],), math.inf, device=x.device, dtype=x.dtype)

    def offer(self, idx: Tensor | None, candidates: Tensor, adversarial: Tensor) -> None:
        """Offer ``candidates`` for the points ``idx`` (all points when ``None``); ``adversarial``
        says which of them are."""
        if idx is None:
            idx = torch.arange(self.x.shape[0], device=self.x.device)
        size = self.geometry.distance(candidates - self.x[idx])
        better = adversarial & (size < self.d[idx])
        if better.any():
            self.best[idx[better]] = candidates[better]
            self.d[idx[better]] = size[better]

    def found(self) -> Tensor:
        return torch.isfinite(self.d)

    def result(self, eps: float) -> tuple[Tensor, Tensor]:
        """``(x_adv, distances)``: the smallest example where it lies within ``eps``, else ``x``
        itself, and every point's smallest distance (``inf`` where none was found)."""
        inside = self.d <= eps
        return torch.where(ops.per_sample(inside, self.x), self.best, self.x), self.d.clone()


def cosine(start: float, end: float, step: int, steps: int) -> float:
    """Cosine annealing from ``start`` (step 0) towards ``end`` (step ``steps``)."""
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def misclassified(logits: Tensor, y: Tensor) -> Tensor:
    """Untargeted success: the predicted class is not ``y``."""
    return logits.argmax(dim=1) != y
