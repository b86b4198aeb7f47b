"""The machinery of FAB (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020): the projection onto a hyperplane intersected with the image box, in
Linf, L2 and L1 (section 3.1), and one run of Algorithm 1 over a batch.

**Projection** (the paper's ``proj_p(x, π, C)``).  For a point ``x ∈ [0, 1]^d`` and the hyperplane
``π = {z : ⟨w, z⟩ + b = 0}``, the smallest ``δ`` in the ``p``-norm with ``⟨w, x + δ⟩ + b = 0`` and
``x + δ`` in the box.  With ``c = −(⟨w, x⟩ + b)`` (its sign folded into ``w``, so ``c ≥ 0``) every
coordinate moves in the direction of ``sign(wᵢ)`` by ``tᵢ ∈ [0, uᵢ]``, ``uᵢ`` the room to the box
that way, and the constraint reads ``Σ |wᵢ| tᵢ = c``:

* Linf: ``tᵢ = min(r, uᵢ)`` for the smallest radius ``r`` that reaches ``c``;
* L2: ``tᵢ = min(λ|wᵢ|, uᵢ)`` (the KKT point of the least-squares problem with box constraints);
* L1: the coordinates in decreasing ``|wᵢ|`` are filled to their room until ``c`` is reached (the
  fractional knapsack: a unit of norm buys most where ``|wᵢ|`` is largest).

Each is exact after one sort: Linf and L2 are ``tᵢ = min(θ·vᵢ, uᵢ)`` with ``vᵢ = 1`` or ``|wᵢ|``,
whose constraint ``G(θ) = Σ |wᵢ| min(θ vᵢ, uᵢ)`` is piecewise linear and non-decreasing with
breakpoints ``uᵢ / vᵢ``, so a cumulative sum over the sorted breakpoints gives ``G`` at each and
``θ`` by solving on the one segment where ``G`` crosses ``c``.  Where the box keeps the hyperplane
out of reach (``G(∞) < c``), the point of the box closest to it: every coordinate at its room.

**One run** (Algorithm 1).  At the iterate ``x_k`` the boundary of the class ``s`` whose linearised
boundary is closest, ``|f_s − f_y| / ‖∇f_s − ∇f_y‖_q`` (``q`` the dual norm), gives the hyperplane;
``x_k`` and the original ``x₀`` are projected onto it (``δ_k``, ``δ₀``), and with
``α = min(‖δ_k‖ / (‖δ_k‖ + ‖δ₀‖), α_max)`` the step is the biased
``x_{k+1} = clip((1 − α)(x_k + ηδ_k) + α(x₀ + ηδ₀))``.  An adversarial ``x_{k+1}`` is kept when it
is the closest yet, then pulled back towards ``x₀``: ``x₀ + β(x_{k+1} − x₀)``.  The forward pass
that linearises the next iterate also says whether it is adversarial (the paper's extra check),
so only pulled-back points are evaluated twice; a pulled-back point that is still adversarial is
kept too when it is closer.  Untargeted runs linearise every other class (one backward pass per
class); targeted ones the target only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustbench_lite import Norm


def _room(x: Tensor, w: Tensor) -> Tensor:
    """How far each coordinate of ``x`` can move in the direction of ``sign(w)`` inside [0, 1]."""
    return torch.where(w > 0, 1.0 - x, torch.where(w < 0, x, torch.zeros_like(x)))


def _saturating(a: Tensor, room: Tensor, c: Tensor, speed: Tensor) -> Tensor:
    """``t = min(θ·speed, room)`` with the smallest ``θ`` for which ``Σ a·t = c``; all rows at
    once (``[B, d]``, ``c`` ``[B]``).  Coordinates with ``a = 0`` never move."""
    live = (a > 0) & (speed > 0)
    brk = torch.where(live, room / torch.where(live, speed, torch.ones_like(speed)), torch.full_like(room, float("inf")))
    order = brk.argsort(dim=1)
    brk_s = brk.gather(1, order)
    full = (a * room * live).gather(1, order)  # contribution of a saturated coordinate
    slope = (a * speed * live).gather(1, order)  # contribution per unit of θ while not saturated
    done_before = full.cumsum(1) - full  # saturated contributions of the coordinates before k
    slope_from = slope.flip(1).cumsum(1).flip(1)  # slope of the coordinates k and after
    g_at = done_before + torch.where(torch.isfinite(brk_s), brk_s, torch.zeros_like(brk_s)) * slope_from
    reach = (g_at >= c[:, None]) & torch.isfinite(brk_s)
    k = torch.where(reach.any(1), reach.float().argmax(1), torch.full_like(c, brk.shape[1] - 1, dtype=torch.long))
    rows = torch.arange(a.shape[0], device=a.device)
    theta = (c - done_before[rows, k]) / slope_from[rows, k].clamp_min(1e-30)
    feasible = (full.sum(1) >= c)
    t = torch.minimum(theta[:, None] * speed, room) * live
    return torch.where(feasible[:, None], t, room * live)


def _fill_l1(a: Tensor, room: Tensor, c: Tensor) -> Tensor:
    """L1: fill the coordinates in decreasing ``a`` to their room until ``Σ a·t = c``."""
    order = a.argsort(dim=1, descending=True)
    a_s, room_s = a.gather(1, order), room.gather(1, order)
    full = a_s * room_s
    before = full.cumsum(1) - full
    part = ((c[:, None] - before) / a_s.clamp_min(1e-30)).clamp(min=0.0)
    t_s = torch.where(a_s > 0, torch.minimum(part, room_s), torch.zeros_like(room_s))
    return torch.zeros_like(t_s).scatter(1, order, t_s)


def _linf_or_l2(speed_of: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def solve(a: Tensor, room: Tensor, c: Tensor) -> Tensor:
        return _saturating(a, room, c, speed_of(a))

    return solve


#: per norm: ``t`` from (``|w|``, room, ``c``), and the dual norm of a gradient (``[B, d]`` -> ``[B]``)
SOLVERS: dict[Norm, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    Norm.LINF: _linf_or_l2(torch.ones_like),
    Norm.L2: _linf_or_l2(lambda a: a),
    Norm.L1: _fill_l1,
}
DUAL: dict[Norm, Callable[[Tensor], Tensor]] = {
    Norm.LINF: lambda g: g.abs().sum(1),
    Norm.L2: lambda g: g.norm(dim=1),
    Norm.L1: lambda g: g.abs().amax(1),
}


def project_hyperplane_box(norm: Norm, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The paper's ``proj_p(x, π, C) − x`` for flat rows: the smallest ``δ`` in ``norm`` with
    ``⟨w, x + δ⟩ + b = 0`` and ``x + δ ∈ [0, 1]^d`` (the box point closest to the hyperplane where
    none lies on it).  ``x``, ``w``: ``[B, d]``; ``b``: ``[B]``."""
    c = -((w * x).sum(1) + b)
    sign = torch.where(c < 0, -1.0, 1.0).to(x.dtype)
    w = w * sign[:, None]
    t = SOLVERS[norm](w.abs(), _room(x, w), c.abs())
    return torch.sign(w) * t


def closest_boundary(
    model: nn.Module, x: Tensor, y: Tensor, classes: Tensor, dual: Callable[[Tensor], Tensor], *, grad: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Logits at ``x`` and the linearised boundary to the closest of each point's ``classes``
    (``[B, m]``): ``f_s − f_y`` and ``∇(f_s − f_y)`` (flat) of the class ``s`` with the smallest
    ``|f_s − f_y| / ‖∇(f_s − f_y)‖_q``; one backward pass per column.  ``grad=False``: logits only."""
    if not grad:
        return model(x), torch.empty(0), None
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        best = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        df_best = torch.zeros_like(best)
        dg_best = torch.zeros(x.shape[0], x[0].numel(), device=x.device, dtype=x.dtype)
        for j in range(classes.shape[1]):
            sel = torch.zeros_like(logits).scatter(1, classes[:, j : j + 1], 1.0).scatter_add(
                1, y[:, None], -torch.ones_like(y[:, None], dtype=logits.dtype)
            )
            (g,) = torch.autograd.grad(logits, xg, grad_outputs=sel, retain_graph=j < classes.shape[1] - 1)
            g = g.flatten(1)
            df = (logits.detach() * sel).sum(1)
            dist = df.abs() / (dual(g) + 1e-12)
            closer = dist < best
            best = torch.where(closer, dist, best)
            df_best = torch.where(closer, df, df_best)
            dg_best = torch.where(closer[:, None], g, dg_best)
    return logits.detach(), df_best, dg_best


def fab_run(
    model: nn.Module, x0: Tensor, y: Tensor, classes: Tensor, x_start: Tensor, *, norm: Norm, steps: int,
    alpha_max: float, eta: float, beta: float, stop_at: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One run of Algorithm 1 from ``x_start`` on the batch ``(x0, y)``, the boundaries of
    ``classes`` (``[B, m]``) linearised; returns per point the closest adversarial found and its
    distance to ``x0`` (``x0`` and ``inf`` where none).  With ``stop_at`` a point stops as soon as
    it has an adversarial within that distance (a fixed-eps run needs no closer one)."""
    geo, dual, shape = norm.geometry, DUAL[norm], x0.shape[1:]
    best_d = torch.full((x0.shape[0],), float("inf"), device=x0.device, dtype=x0.dtype)
    best_x = x0.clone()
    idx = torch.arange(x0.shape[0], device=x0.device)
    xk = x_start.clone()
    logits, df, dg = closest_boundary(model, xk, y, classes, dual, grad=steps > 0)

    def record(rows: Tensor, pts: Tensor, lg: Tensor) -> Tensor:
        """Keep the adversarial ones of ``pts`` (points ``rows``) that are the closest yet."""
        adv = lg.argmax(1) != y[rows]
        d = geo.distance(pts - x0[rows])
        better = adv & (d < best_d[rows])
        best_d[rows[better]] = d[better]
        best_x[rows[better]] = pts[better]
        return adv

    for k in range(steps + 1):
        adv = record(idx, xk, logits)
        if idx.numel() == 0 or k == steps:
            break
        if stop_at is not None:
            keep = best_d[idx] > stop_at
            if not keep.all():
                idx, xk, logits, df, dg, adv = idx[keep], xk[keep], logits[keep], df[keep], dg[keep], adv[keep]
            if idx.numel() == 0:
                break
        if adv.any():  # the backward step towards x0, then the pulled-back points linearised again
            rows = idx[adv]
            xk[adv] = x0[rows] + beta * (xk[adv] - x0[rows])
            lg, d1, g1 = closest_boundary(model, xk[adv], y[rows], classes[rows], dual)
            record(rows, xk[adv], lg)
            df[adv], dg[adv] = d1, g1
        xs, x0s = xk.flatten(1), x0[idx].flatten(1)
        b = df - (dg * xs).sum(1)
        both = project_hyperplane_box(norm, torch.cat([xs, x0s]), torch.cat([dg, dg]), torch.cat([b, b]))
        dk, d0 = both[: idx.numel()], both[idx.numel() :]
        nk, n0 = geo.distance(dk).clamp_min(1e-8), geo.distance(d0).clamp_min(1e-8)
        alpha = (nk / (nk + n0)).clamp(0.0, alpha_max)[:, None]
        xk = ((1 - alpha) * (xs + eta * dk) + alpha * (x0s + eta * d0)).clamp(0.0, 1.0).view(-1, *shape)
        logits, df, dg = closest_boundary(model, xk, y[idx], classes[idx], dual, grad=k + 1 < steps)
    return best_x, best_d
