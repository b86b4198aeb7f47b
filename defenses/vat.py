"""Virtual adversarial training (Miyato, Maeda, Koyama & Ishii, "Virtual adversarial training:
a regularization method for supervised and semi-supervised learning", TPAMI 2018).

``LDS(x) = KL(p(·|x) ‖ p(·|x + r_adv))`` (eq. 9), ``r_adv = ε · g/‖g‖₂`` from ``K`` power
iterations (eq. 12–13, ``K = 1``) started at a random unit ``d`` scaled by ``ξ``; loss
``CE(f(x), y) + α · mean LDS`` (α = 1).  ``p(·|x)`` is detached, ε is an L2 radius on the [0, 1]
pixel scale, and BatchNorm statistics are not updated by the perturbed passes.

Changed from the paper: ``ξ`` defaults to 1e-2 rather than 1e-6.  The gradient at ``r = ξd``
is ``O(ξ)`` (the KL has a minimum at ``r = 0``), so in float32 a ξ of 1e-6 drowns it in
rounding noise; values below 1e-4 are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite import Defense, ops, register_defense, setting

from ._inner_max import frozen_bn, vat_direction


def lds(model: nn.Module, x: Tensor, logits: Tensor, *, eps: float, xi: float, gen, power_iterations: int = 1) -> Tensor:
    """Per-sample local distributional smoothness ``KL(p(·|x) ‖ p(·|x + r_adv))`` (≥ 0)."""
    r_adv = vat_direction(model, x, logits, xi=xi, eps=eps, gen=gen, power_iterations=power_iterations)
    with frozen_bn(model):
        return ops.kl_div(logits.detach(), model(x + r_adv))


@register_defense("vat")
@dataclass(frozen=True, kw_only=True)
class VAT(Defense):
    """CE + ``alpha`` · LDS with an L2 radius ``eps``."""

    eps: float = setting(2.0, low=0.0, low_open=True)
    xi: float = setting(1e-2, low=1e-4)
    alpha: float = setting(1.0, low=0.0)
    power_iterations: int = setting(1, low=1)

    def batch_loss(self, model, x, y, state):
        logits = model(x)
        smooth = lds(model, x, logits, eps=self.eps, xi=self.xi, gen=self.generator(state), power_iterations=self.power_iterations)
        return F.cross_entropy(logits, y) + self.alpha * smooth.mean()
