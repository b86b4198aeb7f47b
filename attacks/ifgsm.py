"""I-FGSM / BIM: the basic iterative method (Kurakin, Goodfellow, Bengio, "Adversarial examples
in the physical world", ICLR workshop 2017, section 2.2).

``x_0 = x``; ``x_{n+1} = Clip_{x,eps}(x_n + α · sign ∇ CE(x_n, y))`` with ``α = 1/255`` and
``N = ceil(min(255·eps + 4, 1.25 · 255·eps))`` iterations; no random start.  Each point keeps
its first misclassified iterate (an addition: it never weakens the attack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from robustbench_lite import EvasionAttack, Norm, ops, register_attack, setting

from ._ascent import projected_ascent


def kurakin_steps(eps: float) -> int:
    """The paper's iteration count ``min(eps + 4, 1.25 eps)`` with eps on the 0-255 scale."""
    return max(1, math.ceil(min(255 * eps + 4, 1.25 * 255 * eps)))


@register_attack("ifgsm")
@dataclass(frozen=True, kw_only=True)
class IFGSM(EvasionAttack):
    """Iterative FGSM.  ``steps=0`` means the paper's heuristic :func:`kurakin_steps`."""

    norms = (Norm.LINF,)
    step: float = setting(1 / 255, low=0.0, low_open=True)
    steps: int = setting(0, low=0)

    @property
    def n_steps(self) -> int:
        return self.steps or kurakin_steps(self.eps)

    @property
    def grad_budget(self) -> float:
        return float(self.n_steps)

    def _perturb(self, model, x, y, target, gen):
        x_adv, _ = projected_ascent(
            model, x, y, ops.ce, norm=self.norm, eps=self.eps, step=self.step, steps=self.n_steps, x_start=x
        )
        return x_adv
