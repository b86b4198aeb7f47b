"""PGD: projected gradient descent with random start (Madry et al., ICLR 2018, eq. 2 and §3).

Start at a random point of the eps ball (Linf: ``x + U(−eps, eps)``; L2: random direction at
radius ``eps · U(0, 1)``, see ``Geometry.random_start``),
then ``x_{k+1} = Π(x_k + α · sign ∇ loss)`` (Linf) or ``Π(x_k + α · ∇/||∇||_2)`` (L2), Π the
projection onto the ball ∩ [0, 1].  Default ``α = 2.5 · eps / steps`` (Madry's rule of thumb).
Restarts run on the points no earlier restart broke; each point keeps its first successful
iterate, so a point counts as broken if any restart broke it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_lite import EvasionAttack, ops, register_attack, setting

from ._ascent import misclassified, projected_ascent

LOSSES = {"ce": ops.ce, "cw": ops.cw_loss, "dlr": ops.dlr}


@register_attack("pgd")
@dataclass(frozen=True, kw_only=True)
class PGD(EvasionAttack):
    """Linf or L2 PGD.  ``step=0`` means ``2.5 · eps / steps``."""

    steps: int = setting(40, low=1)
    step: float = setting(0.0, low=0.0)
    restarts: int = setting(1, low=1)
    random_start: bool = setting(True)
    loss: str = setting("ce", choices=tuple(LOSSES))

    @property
    def step_size(self) -> float:
        return self.step or 2.5 * self.eps / self.steps

    @property
    def grad_budget(self) -> float:
        return float(self.steps * self.restarts)

    def _perturb(self, model, x, y, target, gen):
        out = x.clone()
        todo = torch.arange(x.shape[0], device=x.device)
        for r in range(self.restarts):
            xs, ys = x[todo], y[todo]
            start = self.geometry.random_start(xs, self.eps, gen) if self.random_start else xs
            adv, found = projected_ascent(
                model, xs, ys, LOSSES[self.loss], norm=self.norm, eps=self.eps,
                step=self.step_size, steps=self.steps, x_start=start,
            )
            out[todo] = adv
            if r + 1 == self.restarts:
                break
            pending = ~found
            if pending.any():  # the last iterates were never evaluated
                pending[pending.clone()] = ~misclassified(model(adv[pending]), ys[pending])
            todo = todo[pending]
            if todo.numel() == 0:
                break
        return out
