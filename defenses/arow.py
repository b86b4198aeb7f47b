"""ARoW: anti-robust weighted regularization (Yang, Kim, Kim, Kim, Kim & Kim, "Improving
adversarial robustness by putting more regularizations on less robust samples", ICML 2023,
eq. 9):

``CE_LS(f(x), y) + 2λ · KL(p(·|x) ‖ p(·|x̂)) · (1 − p_y(x̂))`` with label smoothing ``a = 0.2``,
λ = 3.5, and ``x̂`` by 10 PGD steps of ε/4 on the KL term (started at ``x + 0.001·N(0, I)``).
Less robust points (low ``p_y(x̂)``) get more regularization.  The weight is differentiated
through (our reading of the loss; the paper does not say it is detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_lite import ops, register_defense, setting

from ._inner_max import AdversarialDefense
from .trades import kl_search, robustness_weight


def arow_loss(logits: Tensor, logits_adv: Tensor, y: Tensor, lam: float, smoothing: float) -> Tensor:
    """Per-sample ARoW loss."""
    smooth_ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
    return smooth_ce + 2 * lam * ops.kl_div(logits, logits_adv) * robustness_weight(logits_adv, y)


@register_defense("arow")
@dataclass(frozen=True, kw_only=True)
class ARoW(AdversarialDefense):
    """Label-smoothed CE + 2 ``lam`` · (1 − p_y(x̂))-weighted KL."""

    lam: float = setting(3.5, low=0.0)
    smoothing: float = setting(0.2, low=0.0, high=1.0)
    step: float = setting(0.0, low=0.0)  # 0 -> eps / 4, the paper's step
    start: str = setting("gaussian", choices=("uniform", "gaussian", "none"))

    @property
    def step_size(self) -> float:
        return self.step or self.eps / 4

    def batch_loss(self, model, x, y, state):
        with torch.no_grad():
            clean = model(x)
        x_adv = self.adversarial(model, x, kl_search(clean), state)
        return arow_loss(model(x), model(x_adv), y, self.lam, self.smoothing).mean()
