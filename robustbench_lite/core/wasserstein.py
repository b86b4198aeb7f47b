"""WRM's Lagrangian inner problem (Sinha, Namkoong & Duchi, "Certifying some distributional
robustness with principled adversarial training", ICLR 2018): the transport cost, the robust
surrogate's objective and the ascent that solves it.  Shared by the WRM defense (training) and the
Wasserstein attack and certificate of ``robustbench_lite.eval.wasserstein``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import ops
from .attack import eval_mode

Loss = Callable[[Tensor, Tensor], Tensor]  # (logits, y) -> per-sample loss


def transport_cost(z: Tensor, z0: Tensor) -> Tensor:
    """``‖z − z₀‖²₂`` per sample."""
    return (z - z0).flatten(1).pow(2).sum(1)


def lagrangian(logits: Tensor, y: Tensor, z: Tensor, z0: Tensor, gamma: float, loss: Loss = ops.ce) -> Tensor:
    """The robust surrogate's objective ``ℓ(z) − γ‖z − z₀‖²`` per sample (eq. 2b before the sup)."""
    return loss(logits, y) - gamma * transport_cost(z, z0)


def lagrangian_ascent(
    model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, steps: int, step: float = 1.0, clip: bool = True,
    start: Tensor | None = None, loss: Loss = ops.ce,
) -> Tensor:
    """``steps`` ascent steps ``z ← z + (step/√t)·(∇ℓ(z)/(2γ) − (z − x))`` from ``start`` (default
    ``x``), each projected onto [0, 1] when ``clip``; detached, the model in eval mode."""
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    x = x.detach()
    z = (x if start is None else start.detach()).clone()
    with eval_mode(model):
        for t in range(1, steps + 1):
            z.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(loss(model(z), y).sum(), z)
            z = z.detach() + (step / math.sqrt(t)) * (grad / (2 * gamma) - (z.detach() - x))
            if clip:
                z = z.clamp(0.0, 1.0)
    return z.detach()
