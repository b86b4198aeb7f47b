"""The L1 threat model's mathematics: norm, exact projections, steepest ascent, random points.

Pure batched functions: every tensor is a batch over its first dimension, of any image shape, on
any device; randomness comes from an explicit ``torch.Generator``.  The projections are exact
(closed form after one sort), computed in float64 and returned in the input's dtype.
:class:`robustbench_lite.core.threat.L1Geometry` is the only caller inside the library.

* :func:`project_l1_ball` is the sorting algorithm of Duchi, Shalev-Shwartz, Singer and Chandra,
  "Efficient projections onto the l1-ball for learning in high dimensions", ICML 2008 (Figure 1).
* :func:`project_l1_box` is the Euclidean projection onto the L1 ball intersected with the image
  box, ``{x + δ : ‖δ‖₁ ≤ ε, x + δ ∈ [0, 1]^d}``, the effective threat model of Croce and Hein,
  "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021, who
  show that its exact projection is cheap; here in ``O(d log d)`` per sample (one sort).  Derivation: with
  a multiplier ``λ ≥ 0`` on the L1 constraint the problem separates per coordinate, and the
  minimiser of ``½(δᵢ − wᵢ)² + λ|δᵢ|`` over the interval ``[−xᵢ, 1 − xᵢ]`` (which contains 0) is
  the soft threshold clipped to the interval: ``δᵢ = sign(wᵢ)·min(max(|wᵢ| − λ, 0), uᵢ)``, ``uᵢ``
  the room to the box in the direction of ``wᵢ``.  ``λ = 0`` if the clipped ``w`` is inside the
  ball; otherwise ``λ`` solves ``φ(λ) = Σ min(max(|wᵢ| − λ, 0), uᵢ) = ε``.  ``φ`` is continuous,
  non-increasing and piecewise linear with breakpoints ``max(|wᵢ| − uᵢ, 0)`` (the coordinate
  leaves its cap: one more unit of negative slope) and ``|wᵢ|`` (it reaches 0: one less), so
  sorting the ``2d`` breakpoints gives ``φ`` at each of them by a cumulative sum, and ``λ`` by
  linear interpolation inside the one segment where ``φ`` crosses ``ε``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import per_sample

__all__ = [
    "l1_ascent",
    "l1_norm",
    "l1_random_sphere",
    "l1_random_start",
    "project_l1_ball",
    "project_l1_box",
]


def _per_sample(eps: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """``eps`` as a float64 column ``[B, 1]`` on ``like``'s device (a number or one per sample)."""
    e = torch.as_tensor(eps, dtype=torch.float64, device=like.device).reshape(-1, 1)
    if e.shape[0] not in (1, batch):
        raise ValueError(f"eps must be a number or hold one value per sample ({batch}), got {e.shape[0]}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError("eps must be finite and >= 0")
    return e.expand(batch, 1)


def l1_norm(delta: Tensor) -> Tensor:
    """``‖δ‖₁`` per sample (every coordinate, channels included), shape ``[B]``."""
    return delta.flatten(1).abs().sum(dim=1)


def project_l1_ball(delta: Tensor, eps: float | Tensor) -> Tensor:
    """Euclidean projection of each perturbation onto ``{δ : ‖δ‖₁ ≤ ε}`` (Duchi et al. 2008, Fig. 1).

    Inside the ball nothing changes; outside, ``δ ← sign(δ)·max(|δ| − θ, 0)`` where, with ``μ`` the
    magnitudes sorted in decreasing order, ``ρ = max{j : μ_j − (Σ_{r≤j} μ_r − ε)/j > 0}`` and
    ``θ = (Σ_{r≤ρ} μ_r − ε)/ρ``.  ``eps`` is a number or a tensor with one radius per sample.
    """
    flat = delta.flatten(1)
    b, d = flat.shape
    e = _per_sample(eps, b, flat)
    a = flat.abs().double()
    mu = a.sort(dim=1, descending=True).values
    css = mu.cumsum(dim=1)
    j = torch.arange(1, d + 1, device=flat.device, dtype=torch.float64)
    rho = ((mu - (css - e) / j > 0) * j).amax(dim=1, keepdim=True).clamp_min(1)
    theta = ((css.gather(1, rho.long() - 1) - e) / rho).clamp_min(0)
    theta = torch.where(a.sum(dim=1, keepdim=True) > e, theta, torch.zeros_like(theta))
    out = flat.sign() * (a - theta).clamp_min(0).to(flat.dtype)
    return out.view_as(delta)


def project_l1_box(x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
    """The exact Euclidean projection of ``x_adv`` onto ``{x + δ : ‖δ‖₁ ≤ ε, x + δ ∈ [0, 1]}``.

    ``x`` must lie in [0, 1].  The solution is a soft threshold of ``w = x_adv − x`` with a
    per-coordinate box cap, ``δᵢ = sign(wᵢ)·min(max(|wᵢ| − λ, 0), uᵢ)``; ``λ ≥ 0`` comes from sorting
    the breakpoints of the piecewise-linear ``φ(λ) = ‖δ(λ)‖₁`` (see the module docstring).  No
    iteration, no tolerance: exact up to float64 rounding.
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv and x must have the same shape, got {tuple(x_adv.shape)} and {tuple(x.shape)}")
    xf = x.flatten(1).double()
    w = x_adv.flatten(1).double() - xf
    b, d = w.shape
    e = _per_sample(eps, b, w)
    a = w.abs()
    cap = torch.where(w > 0, 1.0 - xf, xf).clamp_min(0.0)  # room to the box in w's direction
    phi0 = torch.minimum(a, cap).sum(dim=1, keepdim=True)  # φ(0): the box-clipped w
    # breakpoints: a coordinate starts shrinking (slope -1) at max(a - cap, 0) and stops at a
    t = torch.cat([(a - cap).clamp_min(0.0), a], dim=1)
    t, order = t.sort(dim=1)
    step = torch.cat([-torch.ones_like(a), torch.ones_like(a)], dim=1).gather(1, order)
    slope_before = step.cumsum(dim=1) - step  # slope of φ on the segment ending at each breakpoint
    gap = t - torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1)
    phi = phi0 + (slope_before * gap).cumsum(dim=1)  # φ at each breakpoint, non-increasing
    need = phi0 > e
    j = (phi > e).sum(dim=1, keepdim=True).clamp(1, 2 * d - 1)  # first breakpoint with φ ≤ ε
    t_lo, phi_lo = t.gather(1, j - 1), phi.gather(1, j - 1)
    slope = slope_before.gather(1, j)  # < 0 on the segment where φ crosses ε
    lam = t_lo + (phi_lo - e) / (-slope).clamp_min(1.0)
    lam = torch.where(need, lam.clamp_min(0.0), torch.zeros_like(lam))
    delta = w.sign() * torch.minimum((a - lam).clamp_min(0.0), cap)
    delta = torch.where(e > 0, delta, torch.zeros_like(delta))  # radius 0: the point itself, exactly
    return (xf + delta).clamp(0.0, 1.0).to(x_adv.dtype).view_as(x_adv)


def l1_ascent(grad: Tensor) -> Tensor:
    """The steepest-ascent direction of unit L1 norm: ``argmax_{‖d‖₁ ≤ 1} ⟨g, d⟩``.

    A linear function over the L1 ball (a cross-polytope) is maximised at a vertex:
    ``sign(g_j)·e_j`` with ``j = argmax |g_j|``; ties go to the first such coordinate in flattened
    order (deterministic).  A zero gradient gives the zero direction, as ``sign(0)`` does for Linf.
    One coordinate per step is why plain PGD is a weak L1 attack (the box soon stops that
    coordinate); l1-APGD steps on many coordinates instead.
    """
    flat = grad.flatten(1)
    j = flat.abs().argmax(dim=1, keepdim=True)
    out = torch.zeros_like(flat).scatter_(1, j, flat.gather(1, j).sign())
    return out.view_as(grad)


def l1_laplace(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """I.i.d. standard Laplace noise (a random sign times an Exp(1) magnitude), on ``gen``'s device.

    Normalising it, ``L/‖L‖₁``, gives a point uniform on the unit L1 sphere (its cone measure,
    which for L1 is the normalised surface measure)."""
    u = torch.rand(tuple(shape), generator=gen, device=gen.device, dtype=torch.float64)
    sign = torch.where(torch.rand(tuple(shape), generator=gen, device=gen.device) < 0.5, -1.0, 1.0)
    return (-torch.log1p(-u) * sign.double()).to(dtype)  # -log(1 - U) ~ Exp(1), U in [0, 1)


def l1_random_sphere(
    shape: tuple[int, ...] | torch.Size,
    eps: float,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Points drawn uniformly from the L1 sphere ``{δ : ‖δ‖₁ = ε}``, one per sample of ``shape``:
    ``ε·L/‖L‖₁`` with ``L`` from :func:`l1_laplace`.  On ``gen``'s device."""
    flat = l1_laplace(tuple(shape), gen, torch.float64).flatten(1)
    flat = flat / flat.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
    return (eps * flat).view(tuple(shape)).to(dtype)


def l1_random_start(x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    """A random point of the L1 ball of radius ``eps`` around ``x`` intersected with [0, 1].

    ``x + r·s`` with ``s`` uniform on the ε-sphere (:func:`l1_random_sphere`) and ``r ~ U(0, 1)``,
    clipped to [0, 1].  Clipping moves coordinates toward ``x``, so the point stays in the ball.
    The radius is uniform, not volume-uniform (``U^{1/d}`` would put nearly every start on the
    sphere in high dimension), as for the L2 start.
    """
    s = l1_random_sphere(x.shape, eps, gen, dtype=x.dtype)
    r = torch.rand(x.shape[0], generator=gen, device=gen.device, dtype=x.dtype)
    delta = s * per_sample(r, x)
    return (x + delta.to(x.device)).clamp(0.0, 1.0)
