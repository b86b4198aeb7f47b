"""WRM: Wasserstein robust training (Sinha, Namkoong & Duchi, "Certifying some distributional
robustness with principled adversarial training", ICLR 2018, Algorithm 1).

Minimises the empirical robust surrogate ``E[φ_γ(θ; Z)]`` with ``φ_γ(θ; z₀) = sup_z ℓ(θ; z) −
γ‖z − z₀‖²₂`` (eq. 2b): each batch's supremum is approximated by the Lagrangian ascent of
:func:`robustbench_lite.core.wasserstein.lagrangian_ascent` and, by Danskin's theorem, the gradient
in θ is that of ``ℓ`` at the (detached) maximiser.  The paper's MNIST setting: the cost
``‖x − x'‖²₂`` on the input (labels not moved), ``T_adv = 15`` ascent steps of size
``α_t = 1/√t``, and ``γ = 0.04·C₂`` with ``C₂ = E‖X‖₂`` the mean input norm; on Fashion-MNIST
``C₂ = 12.15`` gives the default ``γ = 0.486`` (:func:`paper_gamma` computes it for other data).
Smooth activations make the inner problem strongly concave for γ above the loss's smoothness
constant: train on ``small-cnn`` with ``activation="elu", pool="avg"``.

Changed from the paper: each ascent step is projected onto [0, 1] (``clip``), so training and its
certificate concern distributions of valid images; the loss is plain cross-entropy on the true
labels (no label smoothing).

Per epoch, the training curve records ``rho_hat`` (mean ``‖z* − z₀‖²``) and ``phi`` (mean
``φ_γ``) over the epoch's batches: ``γ·rho_hat + phi`` is the certificate's empirical part on
training data at the transport cost the ascent reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustbench_lite import Defense, ops, register_defense, setting
from robustbench_lite.core.wasserstein import lagrangian_ascent, transport_cost


def paper_gamma(x: Tensor, factor: float = 0.04) -> float:
    """The paper's ``γ = 0.04·C₂`` with ``C₂`` the mean L2 norm of the inputs ``x``."""
    return factor * float(x.flatten(1).double().norm(dim=1).mean())


@register_defense("wrm")
@dataclass(frozen=True, kw_only=True)
class WRM(Defense):
    """Cross-entropy at the Lagrangian maximiser ``argmax_z ℓ(z) − γ‖z − x‖²``."""

    gamma: float = setting(0.486, low=0.0, low_open=True)
    steps: int = setting(15, low=1)
    step: float = setting(1.0, low=0.0, low_open=True)
    clip: bool = setting(True)

    def batch_loss(self, model, x, y, state):
        z = lagrangian_ascent(model, x, y, gamma=self.gamma, steps=self.steps, step=self.step, clip=self.clip)
        losses = ops.ce(model(z), y)
        with torch.no_grad():
            cost = transport_cost(z, x)
            sums = state.extra.setdefault("wrm", {"epoch": -1, "n": 0, "rho": 0.0, "phi": 0.0})
            if sums["epoch"] != state.epoch:
                sums.update(epoch=state.epoch, n=0, rho=0.0, phi=0.0)
            sums["n"] += len(x)
            sums["rho"] += float(cost.double().sum())
            sums["phi"] += float((losses.detach() - self.gamma * cost).double().sum())
            state.metrics["rho_hat"] = sums["rho"] / sums["n"]
            state.metrics["phi"] = sums["phi"] / sums["n"]
        return losses.mean()
