"""FGSM with random start, "fast" adversarial training (Wong, Rice & Kolter, "Fast is better
than free: revisiting adversarial training", ICLR 2020, Algorithm 3).

``δ ~ U(−ε, ε)``, one step ``δ ← Π(δ + α · sign ∇_δ CE(f(x + δ), y))`` with ``α = 1.25 ε``,
then CE at ``x + δ`` (detached).  At large ε it overfits catastrophically: PGD accuracy falls to
about 0 within an epoch while FGSM accuracy rises; set ``monitor_eps`` to record held-out PGD
accuracy per epoch (the paper's early-stopping signal).  Cyclic learning rate and mixed
precision of the paper are not reproduced (the base loop's schedule is used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from robustbench_lite import Defense, ops, register_defense, setting

from ._inner_max import maximize


@register_defense("fgsm-rs")
@dataclass(frozen=True, kw_only=True)
class FGSMRS(Defense):
    """One random-start FGSM step of ``alpha · eps`` per batch."""

    eps: float = setting(0.1, low=0.0, low_open=True, high=1.0)
    alpha: float = setting(1.25, low=0.0, low_open=True)  # step as a multiple of eps

    def batch_loss(self, model, x, y, state):
        x_adv = maximize(
            model, x, lambda logits: ops.ce(logits, y), eps=self.eps, step=self.alpha * self.eps, steps=1,
            gen=self.generator(state), start="uniform",
        )
        return F.cross_entropy(model(x_adv), y)
