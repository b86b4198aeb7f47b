"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically principled trade-off
between robustness and accuracy", ICML 2019, eq. 5):

``CE(f(x), y) + β · KL(p(·|x) ‖ p(·|x̂))``, ``x̂ = argmax_{‖x'−x‖∞≤ε} KL(p(·|x) ‖ p(·|x'))`` by
PGD started at ``x + 0.001·N(0, I)`` (``p(·|x)`` fixed during the search), β = 6.  The clean
distribution is *not* detached in the outer loss, as in the paper.  This file also holds the
pure terms MART and ARoW reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_lite import ops, register_defense, setting

from ._inner_max import AdversarialDefense


def true_class_prob(logits: Tensor, y: Tensor) -> Tensor:
    """``p_y`` per sample."""
    return F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)


def robustness_weight(logits: Tensor, y: Tensor) -> Tensor:
    """``1 − p_y``: MART's (on the clean point) and ARoW's (on x̂) per-sample KL weight."""
    return 1.0 - true_class_prob(logits, y)


def kl_search(clean_logits: Tensor):
    """The inner objective ``x' ↦ KL(p(·|x) ‖ p(·|x'))`` with ``p(·|x)`` held fixed."""
    fixed = clean_logits.detach()
    return lambda logits: ops.kl_div(fixed, logits)


def trades_loss(logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """Per-sample ``CE(f(x), y) + β · KL(p(x) ‖ p(x̂))``."""
    return ops.ce(logits, y) + beta * ops.kl_div(logits, logits_adv)


@register_defense("trades")
@dataclass(frozen=True, kw_only=True)
class TRADES(AdversarialDefense):
    """Clean CE + ``beta`` · KL to the KL-maximizing point."""

    beta: float = setting(6.0, low=0.0)
    start: str = setting("gaussian", choices=("uniform", "gaussian", "none"))

    def batch_loss(self, model, x, y, state):
        with torch.no_grad():
            clean = model(x)
        x_adv = self.adversarial(model, x, kl_search(clean), state)
        return trades_loss(model(x), model(x_adv), y, self.beta).mean()
