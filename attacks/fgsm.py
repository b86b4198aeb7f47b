"""FGSM: the fast gradient sign method (Goodfellow, Shlens, Szegedy, ICLR 2015, eq. 3).

``x' = clip_[0,1](x + eps · sign ∇_x CE(f(x), y))``; one gradient.  Under L2 the step is the
normalized gradient ``eps · g / ||g||_2`` (the "fast gradient method").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from robustbench_lite import EvasionAttack, ops, register_attack


@register_attack("fgsm")
@dataclass(frozen=True, kw_only=True)
class FGSM(EvasionAttack):
    """One signed (Linf) or normalized (L2) gradient step of size eps."""

    iterative: ClassVar[bool] = False

    def _perturb(self, model, x, y, target, gen):
        _, _, grad = self.loss_grad(model, x, y, ops.ce)
        return self.geometry.project(x + self.eps * self.geometry.ascent(grad), x, self.eps)
