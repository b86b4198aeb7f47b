"""Fast Minimum-Norm attack, FMN (Pintor, Roli, Brendel & Biggio, "Fast minimum-norm adversarial
attacks through adaptive norm constraints", NeurIPS 2021, Algorithm 1), in L0, L1, L2 and Linf.

A normalised gradient step on the logit difference ``L = Z_y − max_{j≠y} Z_j`` (minimised; the
point is adversarial when ``L < 0``), then a projection onto an ε-ball around ``x`` (and the box
[0, 1]) whose radius ε adapts per point:

* adversarial at step k: remember δ if it is the smallest so far, and shrink
  ``ε ← min(ε(1 − γ_k), ‖δ*‖)``;
* not adversarial, after an adversarial was found: grow ``ε ← ε(1 + γ_k)``;
* not adversarial, none found yet: jump to the linearised boundary,
  ``ε ← max(ε, ‖δ‖ + |L| / ‖∇L‖_*)`` (the dual norm; for L0, whose budgets are whole pixels, ε
  grows by at least one pixel instead).  The ``max`` is ours: the paper sets ε to the jump, which
  is smaller than ε whenever clipping to the box took norm from δ, and then the iterate can
  circle just inside the boundary for the whole run (BENCHMARKS.md has the measurement).

``δ ← Π_ε(x + δ − α_k ∇L/‖∇L‖₂) − x``, the projection onto ball ∩ box from the norm's geometry
(per-point radii; for L0 the ε pixels that changed most are kept, then clipped, the paper's
order).  For L2, as in the authors' code, δ is first rescaled onto the sphere of radius ε (so it
stays on the shell when a step moved it inward; on Fashion-MNIST this found smaller examples than
the projection alone, BENCHMARKS.md).  The step size α decays from ``alpha_init`` to
``alpha_final`` and γ from ``gamma_init`` (0.05) to ``gamma_final`` (0.001), both by cosine
annealing over the ``steps`` steps (the paper's schedules).  ε is capped at the largest
perturbation the box allows.  The geometry also supplies the distance, the dual norm and how a
budget grows or shrinks (whole pixels for L0), so the algorithm is written once for every norm.

Minimum-norm attack: the run returns each point's smallest adversarial example when it lies
within ``eps``, else ``x``, and ``AttackOutput.distances`` holds every point's smallest distance
(``inf`` where none was found; 0 for points misclassified already).  Each of the ``steps`` steps
costs one gradient; the last iterate is checked with one more forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustbench_lite import EvasionAttack, Norm, ops, register_attack, setting

from ._min_norm import Smallest, cosine, misclassified


@register_attack("fmn")
@dataclass(frozen=True, kw_only=True)
class FMN(EvasionAttack):
    """Fast Minimum-Norm attack (untargeted): each point's smallest adversarial example."""

    norms = (Norm.L0, Norm.L1, Norm.L2, Norm.LINF)
    min_norm: ClassVar[bool] = True
    steps: int = setting(100, low=1)
    alpha_init: float = setting(1.0, low=0.0, low_open=True)
    alpha_final: float = setting(0.01, low=0.0)
    gamma_init: float = setting(0.05, low=0.0, high=1.0, low_open=True)
    gamma_final: float = setting(0.001, low=0.0, high=1.0)

    @property
    def grad_budget(self) -> float:
        return float(self.steps)

    def _perturb(self, model, x, y, target, gen):
        geo = self.geometry
        b = x.shape[0]
        track = Smallest(x, geo)
        delta = torch.zeros_like(x)
        # ε before the first step: 0, or the smallest whole budget (one pixel) for L0
        eps = geo.scale_budget(torch.zeros(b, device=x.device, dtype=x.dtype), 1.0)
        found = torch.zeros(b, dtype=torch.bool, device=x.device)
        widest = geo.distance(torch.maximum(x, 1 - x))  # the largest perturbation the box allows
        for k in range(self.steps):
            alpha = cosine(self.alpha_init, self.alpha_final, k, self.steps)
            gamma = cosine(self.gamma_init, self.gamma_final, k, self.steps)
            logits, loss, grad = self.loss_grad(model, x + delta, y, ops.margin)
            adv = misclassified(logits, y)
            track.offer(None, x + delta, adv)
            found |= adv
            size = geo.distance(delta)
            grown = geo.scale_budget(eps, 1 + gamma)
            if not geo.discrete:  # none found yet: the linearised boundary's distance, never less than ε
                jump = size + loss.abs() / geo.dual_norm(grad.flatten(1)).clamp_min(1e-12)
                grown = torch.where(found, grown, torch.maximum(jump, eps))
            eps = torch.where(adv, torch.minimum(geo.scale_budget(eps, 1 - gamma), track.d), grown)
            eps = torch.minimum(eps, widest)
            delta = delta - alpha * ops.normalize_l2(grad)
            if geo.round_ball:  # onto the sphere of radius ε, as the authors' code does for L2
                delta = delta * ops.per_sample(eps / geo.distance(delta).clamp_min(1e-12), delta)
            delta = geo.project(x + delta, x, eps) - x
        track.offer(None, x + delta, misclassified(model(x + delta), y))
        return track.result(self.eps)
