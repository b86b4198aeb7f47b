"""Wasserstein distributional robustness: WRM's Lagrangian inner problem, the matching attack and
its certificate (Sinha, Namkoong & Duchi, "Certifying some distributional robustness with
principled adversarial training", ICLR 2018).

With the transport cost ``c(z, z₀) = ‖z − z₀‖²₂`` on the input (``+∞`` for a change of label, and
``+∞`` outside the image box when ``clip``), the Lagrangian relaxation of the worst case over the
Wasserstein ball is the per-point robust surrogate (eq. 2b)::

    φ_γ(θ; z₀) = sup_z ℓ(θ; z) − γ ‖z − z₀‖²₂,

and weak duality gives, for every γ ≥ 0 and ρ ≥ 0 (Proposition 1; Theorem 3 without its
generalisation term ε_n, i.e. on the empirical distribution of the points at hand)::

    sup_{P : W_c(P, P₀) ≤ ρ} E_P[ℓ]  ≤  γ ρ + E_{P₀}[φ_γ(θ; Z)].

The right side is a certificate only if φ_γ is the true supremum: when γ exceeds the smoothness
constant of ``ℓ`` in ``z`` the objective is strongly concave and gradient ascent finds it (Lemma 1),
hence smooth networks (ELU).  The ascent is the authors' (``T_adv = 15`` steps of size
``α_t = 1/√t`` on ``ℓ/(2γ) − ½‖z − z₀‖²``, whose quadratic part the first step solves exactly);
``clip`` projects each step onto [0, 1] (projected ascent on a concave objective over a convex set
still converges, and the worst case is then over distributions of valid images).

:func:`wasserstein_certificate` evaluates the bound at the transport cost the ascent reaches,
``ρ̂ = E‖z* − z₀‖²`` (where it equals the mean loss at the ascent's points), and at a user ``ρ``,
beside the loss a stronger *Wasserstein attack* reaches within the same budget: the same ascent run
longer, with random restarts, for a range of multipliers γ', keeping the largest mean loss whose
mean transport cost is at most the budget.  Means are taken in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import ops
from ..core.attack import eval_mode
from ..core.wasserstein import Loss, lagrangian, lagrangian_ascent, transport_cost

__all__ = ["Loss", "lagrangian", "lagrangian_ascent", "transport_cost", "wasserstein_attack", "wasserstein_certificate"]


def wasserstein_attack(
    model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, gen: torch.Generator, steps: int = 100,
    restarts: int = 3, sigma: float = 0.3, clip: bool = True, loss: Loss = ops.ce,
) -> Tensor:
    """Per point, the best of ``restarts`` Lagrangian ascents (the first from ``x``, the others from
    ``x + sigma·N(0, I)``) by the value ``ℓ(z) − γ‖z − x‖²``; detached."""
    best = x.detach().clone()
    best_val = torch.full((len(x),), -math.inf, dtype=torch.float64, device=x.device)
    for r in range(restarts):
        start = None
        if r > 0:
            noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
            start = (x + sigma * noise).clamp(0.0, 1.0) if clip else x + sigma * noise
        z = lagrangian_ascent(model, x, y, gamma=gamma, steps=steps, clip=clip, start=start, loss=loss)
        with torch.no_grad(), eval_mode(model):
            val = lagrangian(model(z), y, z, x, gamma, loss).double()
        better = val > best_val
        best[better], best_val[better] = z[better], val[better]
    return best


def fill_budget(cost_a: Tensor, loss_a: Tensor, cost_b: Tensor, loss_b: Tensor, budget: float) -> tuple[float, float]:
    """Mean (loss, cost) of a per-point mix of two attacks within a mean-cost budget.

    Starts from ``a`` (whose mean cost is within the budget) and moves points to ``b`` in the order
    of their loss gain per unit of extra cost (gains at no extra cost first) while the mean cost
    stays within ``budget``: the greedy solution of the knapsack over whole points.  Every mix is a
    distribution within the budget, so its loss is a lower bound on the worst case there."""
    n = len(cost_a)
    gain, extra = loss_b - loss_a, cost_b - cost_a
    useful = gain > 0
    ratio = torch.where(extra > 0, gain / extra.clamp_min(1e-30), torch.full_like(gain, math.inf))
    order = torch.argsort(torch.where(useful, ratio, torch.full_like(gain, -math.inf)), descending=True)
    total_cost, total_loss = float(cost_a.sum()), float(loss_a.sum())
    for i in order.tolist():
        if not bool(useful[i]):
            break
        if total_cost + float(extra[i]) <= budget * n:
            total_cost += float(extra[i])
            total_loss += float(gain[i])
    return total_loss / n, total_cost / n


@dataclass(frozen=True)
class WassersteinCertificate:
    """The certificate and the attack beside it (mean losses over the points)."""

    gamma: float
    n: int
    clean_loss: float  # mean loss on the clean points
    phi: float  # mean φ_γ at the ascent's points
    rho_hat: float  # mean transport cost the ascent reached
    rho: float  # the user's budget
    bound_at_rho_hat: float  # γ ρ̂ + mean φ_γ
    bound_at_rho: float  # γ ρ + mean φ_γ
    attack_phi: float  # mean φ_γ the attack reaches at the same γ (<= phi when the ascent found the sup)
    attack_at_rho_hat: tuple[float, float]  # (mean loss, mean cost <= ρ̂) of the strongest attack within ρ̂
    attack_at_rho: tuple[float, float]  # the same within ρ
    curve: tuple[tuple[float, float, float], ...]  # (γ', mean cost, mean loss) of every attack run

    @property
    def holds(self) -> bool:
        """The bound is at least the attacked loss at both budgets."""
        return self.bound_at_rho_hat >= self.attack_at_rho_hat[0] and self.bound_at_rho >= self.attack_at_rho[0]


def _batched(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def wasserstein_certificate(
    model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, rho: float, steps: int = 15, step: float = 1.0,
    clip: bool = True, attack_steps: int = 100, restarts: int = 3, bisections: int = 4, expansions: int = 8,
    seed: int = 0, batch_size: int = 500, loss: Loss = ops.ce,
    attack_runs: dict[float, tuple[Tensor, Tensor]] | None = None,
) -> WassersteinCertificate:
    """WRM's certificate ``γρ + E[φ_γ]`` at ``ρ̂`` and at ``rho`` on the points ``(x, y)``, with φ_γ
    from :func:`lagrangian_ascent` (``steps``, ``step``), beside the Wasserstein attack's mean loss
    within each budget: starting at γ' = γ, γ' is divided (cost too low) or multiplied (cost too
    high) by 4 up to ``expansions`` times until the budget is bracketed, then the bracket is halved
    ``bisections`` times on a log scale; the attack's value at a budget is the largest mean loss among
    the clean points, the runs whose mean cost is within it, and the per-point mix of the bracket's
    two runs that fills it (:func:`fill_budget`).

    ``attack_runs`` (γ' → per-point float64 (cost, loss) of the attack's points) is filled as the
    attack runs; pass the same dict to calls on the same model, points and attack settings (other
    γ or ρ) to reuse the runs they share."""
    if not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    x, y = x.detach(), y.detach()

    def losses(points: Tensor) -> Tensor:
        with torch.no_grad(), eval_mode(model):
            return _batched(lambda a, b: loss(model(a), b), points, y, batch_size).double()

    z = _batched(lambda a, b: lagrangian_ascent(model, a, b, gamma=gamma, steps=steps, step=step, clip=clip, loss=loss),
                 x, y, batch_size)
    cost_z = transport_cost(z, x).double()
    phi, rho_hat = float((losses(z) - gamma * cost_z).mean()), float(cost_z.mean())
    clean = float(losses(x).mean())
    gen = torch.Generator().manual_seed(seed)
    runs = {} if attack_runs is None else attack_runs  # γ' -> per-point (cost, loss), float64

    def attack(g: float) -> float:
        """The attack's mean cost at multiplier ``g`` (run once per ``g``)."""
        if g not in runs:
            za = _batched(lambda a, b: wasserstein_attack(model, a, b, gamma=g, steps=attack_steps, restarts=restarts,
                                                         gen=gen, clip=clip, loss=loss), x, y, batch_size)
            runs[g] = (transport_cost(za, x).double(), losses(za))
        return float(runs[g][0].mean())

    def best_within(budget: float) -> tuple[float, float]:
        g, lo, hi = gamma, None, None  # the cost falls as γ' rises; lo: cost above the budget, hi: within
        for _ in range(expansions + 1):
            if attack(g) <= budget:
                hi = g if hi is None else min(hi, g)
                if lo is not None:
                    break
                g /= 4
            else:
                lo = g if lo is None else max(lo, g)
                if hi is not None:
                    break
                g *= 4
        if lo is not None and hi is not None and lo < hi:
            for _ in range(bisections):
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if attack(mid) <= budget else (mid, hi)
        best = (clean, 0.0)
        for c, value in runs.values():
            if float(c.mean()) <= budget and float(value.mean()) > best[0]:
                best = (float(value.mean()), float(c.mean()))
        if lo is not None and hi is not None:  # per point, the cheaper run or the stronger one
            best = max(best, fill_budget(*runs[hi], *runs[lo], budget))
        return best

    at_rho_hat, at_rho = best_within(rho_hat), best_within(rho)
    attack(gamma)
    attack_phi = float((runs[gamma][1] - gamma * runs[gamma][0]).mean())
    return WassersteinCertificate(
        gamma=gamma, n=len(x), clean_loss=clean, phi=phi, rho_hat=rho_hat, rho=rho, bound_at_rho_hat=gamma * rho_hat + phi,
        bound_at_rho=gamma * rho + phi, attack_phi=attack_phi, attack_at_rho_hat=at_rho_hat, attack_at_rho=at_rho,
        curve=tuple((g, float(c.mean()), float(v.mean())) for g, (c, v) in sorted(runs.items())),
    )
