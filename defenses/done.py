"""DONE: doubly robust instance-reweighted adversarial training (Sow, Lin, Wang & Liang, ICLR 2024).

The weights of the adversarial losses are the solution of a KL-regularised DRO problem over the
simplex::

    min_θ max_{w ∈ Δ_n}  Σ_i w_i ℓ_i(θ, δ_i*(θ)) − r Σ_i w_i log(n w_i),
    δ_i*(θ) = argmax_{‖δ‖∞ ≤ ε} ℓ(θ; x_i + δ, y_i)   (PGD),

whose inner maximum is in closed form, ``w_i = exp(ℓ_i / r) / Σ_j exp(ℓ_j / r)`` (a softmax of the
adversarial losses at temperature ``r``; uniform as r → ∞, which is PGD-AT), turning the problem
into the compositional one ``min_θ r log((1/n) Σ_i exp(ℓ_i / r))``.  Its stochastic gradient needs
the normaliser ``g(θ) = (1/n) Σ_i exp(ℓ_i / r)`` over the whole training set, which the
compositional algorithm (CID) tracks by a moving average ``u ← (1 − β) u + β · mean_batch
exp(ℓ_i / r)`` and then steps along ``(1/(B u)) Σ_{i∈B} exp(ℓ_i / r) ∇ℓ_i`` (``estimator="ema"``,
kept in log space).  ``estimator="batch"`` normalises within the batch (weights summing to 1 exactly).

Changed from the paper: the outer gradient is Danskin's (the loss gradient at the detached PGD
point), without CID's implicit-differentiation term through δ*(θ) that the paper obtains from a
log-barrier reformulation of the inner problem.  ``temperature`` (r) and ``beta`` are this
project's choices (the paper's values were not available to check): r = 2 was picked among 1, 2
and 4 by a held-out pilot (BENCHMARKS.md, "Paper claims"); small r concentrates the weight on a
few examples, large r approaches PGD-AT.  The curve records ``max_weight_ratio``, the epoch's
largest weight times the batch size (1 for uniform weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from robustbench_lite import ops, register_defense, setting

from ._inner_max import AdversarialDefense


def done_weights(losses: Tensor, temperature: float) -> Tensor:
    """The KL-DRO weights ``softmax(ℓ / r)`` of a batch of losses (uniform for ``r = inf``)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if math.isinf(temperature):
        return torch.full_like(losses, 1.0 / losses.numel())
    return torch.softmax(losses / temperature, dim=0)


def update_log_normalizer(log_u: float | None, losses: Tensor, temperature: float, beta: float) -> float:
    """One moving-average step of ``log u``, ``u ← (1 − β) u + β · mean_i exp(ℓ_i / r)``, in log space
    (``log_u=None``: the first batch sets ``u`` to its own mean)."""
    log_batch = float(torch.logsumexp(losses.detach().double() / temperature, dim=0)) - math.log(losses.numel())
    if log_u is None:
        return log_batch
    a, b = math.log1p(-beta) + log_u if beta < 1 else -math.inf, math.log(beta) + log_batch
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


def compositional_weights(losses: Tensor, temperature: float, log_u: float) -> Tensor:
    """CID's per-example weights ``exp(ℓ_i / r) / (B · u)`` (their sum is ``mean exp(ℓ/r) / u``)."""
    return torch.exp(losses.detach().double() / temperature - log_u - math.log(losses.numel())).to(losses.dtype)


@register_defense("done")
@dataclass(frozen=True, kw_only=True)
class DONE(AdversarialDefense):
    """Adversarial CE at PGD points, weighted by the KL-DRO weights of temperature ``r``."""

    temperature: float = setting(2.0, low=0.0, low_open=True)
    estimator: str = setting("ema", choices=("ema", "batch"))
    beta: float = setting(0.1, low=0.0, low_open=True, high=1.0)

    def batch_loss(self, model, x, y, state):
        x_adv = self.adversarial(model, x, lambda logits: ops.ce(logits, y), state)
        losses = ops.ce(model(x_adv), y)
        if self.estimator == "batch":
            weights = done_weights(losses.detach(), self.temperature)
        else:
            log_u = update_log_normalizer(state.extra.get("done_log_u"), losses, self.temperature, self.beta)
            state.extra["done_log_u"] = log_u
            weights = compositional_weights(losses, self.temperature, log_u)
        # the epoch's largest weight times the batch size (1: uniform weights, as PGD-AT)
        ratio = float(weights.max()) * len(x)
        state.metrics["max_weight_ratio"] = max(ratio, state.metrics.get("max_weight_ratio", 0.0))
        return (weights * losses).sum()
