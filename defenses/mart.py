"""MART: misclassification-aware adversarial training (Wang, Zou, Yi, Bailey, Ma & Gu,
"Improving adversarial robustness requires revisiting misclassified examples", ICLR 2020,
eq. 8):

``BCE(p(·|x̂), y) + β · KL(p(·|x) ‖ p(·|x̂)) · (1 − p_y(x))`` with the boosted CE
``BCE(p, y) = −log p_y − log(1 − max_{k≠y} p_k)`` and ``x̂`` by PGD on CE (started at
``x + 0.001·N(0, I)`` as in the authors' code).  β = 6 (the paper's WRN-34 value; 5 for
ResNet-18).  The weight ``1 − p_y(x)`` is differentiated through, as in the paper's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustbench_lite import ops, register_defense, setting

from ._inner_max import AdversarialDefense
from .trades import robustness_weight


def boosted_ce(logits: Tensor, y: Tensor) -> Tensor:
    """``−log p_y − log(1 − max_{k≠y} p_k)`` per sample."""
    probs = logits.softmax(dim=1)
    other = probs.scatter(1, y[:, None], 0.0).amax(dim=1)
    return ops.ce(logits, y) - torch.log((1.0 - other).clamp_min(1e-12))


def mart_loss(logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """Per-sample MART loss."""
    return boosted_ce(logits_adv, y) + beta * ops.kl_div(logits, logits_adv) * robustness_weight(logits, y)


@register_defense("mart")
@dataclass(frozen=True, kw_only=True)
class MART(AdversarialDefense):
    """Boosted CE at x̂ + ``beta`` · (1 − p_y(x))-weighted KL."""

    beta: float = setting(6.0, low=0.0)
    start: str = setting("gaussian", choices=("uniform", "gaussian", "none"))

    def batch_loss(self, model, x, y, state):
        x_adv = self.adversarial(model, x, lambda logits: ops.ce(logits, y), state)
        return mart_loss(model(x), model(x_adv), y, self.beta).mean()
