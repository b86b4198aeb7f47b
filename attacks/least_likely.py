"""Iterative least-likely class method (Kurakin, Goodfellow, Bengio 2017, section 2.3).

``y_LL = argmin_y p(y | x)`` on the clean input, fixed; ``x_{n+1} = Clip_{x,eps}(x_n − α · sign
∇ CE(x_n, y_LL))`` with I-FGSM's ``α = 1/255`` and iteration count.  A point stops once it is
classified as ``y_LL``.  The harness reports how often ``y_LL`` was reached (``target_hit_rate``);
for robust accuracy any misclassification counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_lite import ops, register_attack

from ._ascent import hits_target, projected_ascent
from .ifgsm import IFGSM


def _toward_target(logits, target):
    return -ops.ce(logits, target)


@register_attack("least-likely")
@dataclass(frozen=True, kw_only=True)
class LeastLikely(IFGSM):
    """Targeted at each point's least likely class; I-FGSM's settings (``steps=0``: the paper's heuristic)."""

    targeted = True

    def _choose_target(self, model, x, y, gen):
        return model(x).argmin(dim=1)

    def _perturb(self, model, x, y, target, gen):
        x_adv, _ = projected_ascent(
            model, x, target, _toward_target, norm=self.norm, eps=self.eps, step=self.step,
            steps=self.n_steps, x_start=x, success=hits_target,
        )
        return x_adv
