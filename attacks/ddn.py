"""Decoupled Direction and Norm, DDN (Rony, Hafemann, Oliveira, Ben Ayed, Sabourin & Granger,
"Decoupling direction and norm for efficient gradient-based L2 adversarial attacks and defenses",
CVPR 2019, Algorithm 1).

The direction and the norm of the perturbation are updated separately.  Each step takes the
cross-entropy gradient at ``x + δ``, normalised, as an ascent step of size α:
``δ ← δ + α g/‖g‖₂`` (a zero gradient gets a random direction).  Then the norm ε moves on its
own: ``ε ← ε(1 − γ)`` if ``x + δ`` was adversarial at this step, else ``ε(1 + γ)`` (γ = 0.05), and
``δ`` is rescaled to norm ε and clipped to the box.  ε starts at ``init_norm`` (1) and is capped at
the largest perturbation the box allows; α decays from ``alpha_init`` (1) to ``alpha_final`` (0.01)
by cosine annealing.  The paper rounds every iterate to 256 grey levels so the example is a valid
8-bit image; ``levels = 0`` (the default here) keeps real-valued images in [0, 1], the threat model
of every other attack of this package; ``levels = 256`` is the paper's setting.

Minimum-norm attack: the smallest adversarial iterate of each point is kept; the run returns it
when it lies within ``eps`` (else ``x``) and ``AttackOutput.distances`` holds every point's
smallest L2 distance (``inf`` where none was found; 0 for points misclassified already).  Each
of the ``steps`` steps costs one gradient; the last iterate is checked with one more forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustbench_lite import EvasionAttack, Norm, ops, register_attack, setting

from ._min_norm import Smallest, cosine, misclassified


@register_attack("ddn")
@dataclass(frozen=True, kw_only=True)
class DDN(EvasionAttack):
    """Decoupled Direction and Norm L2 attack (untargeted): each point's smallest adversarial example."""

    norms = (Norm.L2,)
    min_norm: ClassVar[bool] = True
    steps: int = setting(100, low=1)
    gamma: float = setting(0.05, low=0.0, high=1.0, low_open=True)
    init_norm: float = setting(1.0, low=0.0, low_open=True)
    alpha_init: float = setting(1.0, low=0.0, low_open=True)
    alpha_final: float = setting(0.01, low=0.0)
    levels: int = setting(0, low=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.levels == 1:
            raise ValueError("ddn: levels must be 0 (no rounding) or >= 2 grey levels (256: the paper's 8-bit images), got 1")

    @property
    def grad_budget(self) -> float:
        return float(self.steps)

    def _perturb(self, model, x, y, target, gen):
        geo = self.geometry
        track = Smallest(x, geo)
        delta = torch.zeros_like(x)
        eps = torch.full((x.shape[0],), self.init_norm, device=x.device, dtype=x.dtype)
        widest = geo.distance(torch.maximum(x, 1 - x))
        for k in range(self.steps):
            alpha = cosine(self.alpha_init, self.alpha_final, k, self.steps)
            logits, _, grad = self.loss_grad(model, x + delta, y, ops.ce)
            adv = misclassified(logits, y)
            track.offer(None, x + delta, adv)
            flat = geo.distance(grad) < 1e-12
            if flat.any():  # no direction to follow: a random one
                noise = torch.randn(grad[flat].shape, generator=gen, device=gen.device, dtype=grad.dtype)
                grad[flat] = noise.to(grad.device)
            delta = delta + alpha * ops.normalize_l2(grad)
            eps = torch.minimum(torch.where(adv, eps * (1 - self.gamma), eps * (1 + self.gamma)), widest)
            delta = delta * ops.per_sample(eps / geo.distance(delta).clamp_min(1e-12), delta)
            x_new = (x + delta).clamp(0.0, 1.0)
            if self.levels:
                x_new = (x_new * (self.levels - 1)).round() / (self.levels - 1)
            delta = x_new - x
        track.offer(None, x + delta, misclassified(model(x + delta), y))
        return track.result(self.eps)
