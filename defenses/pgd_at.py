"""PGD adversarial training (Madry et al., "Towards deep learning models resistant to
adversarial attacks", ICLR 2018, eq. 2.1): ``min_θ E[max_{‖δ‖∞≤ε} CE(f(x + δ), y)]``.

The inner max is PGD with a uniform random start (``steps`` sign steps of ``step``); by
Danskin's theorem the outer gradient is the CE gradient at the (detached) maximizer.  Optional
mix with the clean loss (Goodfellow et al. 2015 used 0.5 / 0.5): ``clean_weight · CE(x) +
(1 − clean_weight) · CE(x_adv)``.  Changed from the paper: the search runs with the model in
``eval()`` by default (``attack_mode="train"`` for Madry's choice); BatchNorm running
statistics are never updated by the search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from robustbench_lite import ops, register_defense, setting

from ._inner_max import AdversarialDefense


@register_defense("pgd-at")
@dataclass(frozen=True, kw_only=True)
class PGDAT(AdversarialDefense):
    """CE at the PGD maximizer, optionally mixed with clean CE."""

    clean_weight: float = setting(0.0, low=0.0, high=1.0)

    def batch_loss(self, model, x, y, state):
        x_adv = self.adversarial(model, x, lambda logits: ops.ce(logits, y), state)
        loss = F.cross_entropy(model(x_adv), y)
        if self.clean_weight > 0:
            loss = self.clean_weight * F.cross_entropy(model(x), y) + (1 - self.clean_weight) * loss
        return loss
