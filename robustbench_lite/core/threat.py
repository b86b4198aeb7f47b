"""Threat models, and the geometry of each norm.

``ThreatModel(norm, eps)`` is a norm ball of radius ``eps`` around an image in [0, 1].  Strings are
parsed to :class:`Norm` at the boundary; everything inside the library works with the enum.

Every norm owns one :class:`Geometry` object (``Norm.LINF.geometry``), which is the only place that
knows how the norm measures a perturbation, projects onto its ball (and onto ball ∩ [0, 1]), picks
the steepest-ascent direction and draws random points.  Attacks, defenses and evaluations ask the
geometry instead of branching on the norm, so a new norm is one enum member and one geometry class
here (its longer math in a module of its own, as :mod:`robustbench_lite.core.l1`), plus the attacks
that opt in (their ``norms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

from . import l1
from .ops import per_sample


class Norm(str, Enum):
    """The distance an evasion budget is measured in. ``L0`` counts changed pixels; ``L1`` sums the
    absolute changes of every coordinate (channels included)."""

    LINF = "linf"
    L2 = "l2"
    L0 = "l0"
    L1 = "l1"

    @classmethod
    def parse(cls, value: Norm | str) -> Norm:
        if isinstance(value, Norm):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("_", "").replace("-", "")
            for norm in cls:
                if key in norm.geometry.aliases:
                    return norm
        raise ValueError(f"unknown norm {value!r}; use one of {[n.value for n in cls]}")

    @property
    def geometry(self) -> Geometry:
        return _GEOMETRIES[self]

    def __str__(self) -> str:
        return self.value


def _uniform(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.rand(shape, generator=gen, device=gen.device, dtype=dtype)


def _gaussian(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, generator=gen, device=gen.device, dtype=dtype)


class Geometry:
    """How one norm measures, projects, steps and samples; one instance per :class:`Norm`.

    Every method works per sample on a batch (first dimension) and takes its randomness from an
    explicit ``torch.Generator``.  Methods a norm has no use for raise ``ValueError`` naming it.
    """

    norm: ClassVar[Norm]
    aliases: ClassVar[tuple[str, ...]] = ()
    #: a budget that visibly moves a small image in [0, 1] (the attack contract tests use it)
    example_eps: ClassVar[float] = 0.1
    #: budgets are whole numbers (L0 counts pixels): an attack moves them a whole unit at a time
    discrete: ClassVar[bool] = False
    #: the ball is round (L2): scaling a perturbation onto the sphere is the shortest way there, so
    #: an attack may keep its iterate on the sphere (FMN's authors do for L2; for Linf or L1 scaling
    #: every coordinate up is a long way from the ball's nearest point, and no attack does it)
    round_ball: ClassVar[bool] = False
    #: relative slack when checking that a perturbation is inside the ball (float rounding)
    rtol: ClassVar[float] = 1e-4
    atol: ClassVar[float] = 1e-6
    #: the ball ∩ [0, 1] is the box ``[x − ε, x + ε] ∩ [0, 1]`` (interval bounds over it are exact)
    ball_is_box: ClassVar[bool] = False

    # -- what each norm implements ----------------------------------------------------------------
    def distance(self, delta: Tensor) -> Tensor:
        """Per-sample norm of a perturbation, shape ``[B]``."""
        raise NotImplementedError

    def project_ball(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        """The Euclidean projection of a perturbation onto the ball of radius ``eps`` (no box);
        ``eps`` is a number or a tensor of one radius per sample (as in :meth:`project`)."""
        raise ValueError(f"the {self.norm.value} ball has no projection here")

    def project(self, x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
        """A point of the ``eps`` ball around ``x`` intersected with the box [0, 1], close to ``x_adv``.
        ``eps`` is a number or a tensor ``[B]`` of one radius per sample (minimum-norm attacks
        move each point's budget on its own)."""
        raise ValueError(f"the {self.norm.value} ball has no projection here")

    def scale_budget(self, eps: Tensor, factor: float) -> Tensor:
        """Budgets ``eps`` (one per sample) grown or shrunk by ``factor`` (FMN's ε schedule):
        ``eps · factor`` for a continuous norm."""
        return eps * factor

    def ascent(self, grad: Tensor) -> Tensor:
        """The steepest-ascent direction of unit norm: ``argmax_{‖d‖ ≤ 1} ⟨grad, d⟩``."""
        raise ValueError(f"{self.norm.value} has no steepest-ascent step here")

    def random_start(self, x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
        """A random point of the ``eps`` ball around ``x`` ∩ [0, 1] (PGD's start)."""
        raise ValueError(f"{self.norm.value} has no random start here")

    def noise(self, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        """The norm's own isotropic noise, whose direction ``t / ‖t‖`` is a random point of the
        unit sphere (APGD's start, Croce & Hein 2020)."""
        raise ValueError(f"{self.norm.value} has no noise distribution here")

    def random_sphere(self, shape: tuple[int, ...], eps: float, gen: torch.Generator) -> Tensor:
        """Random perturbations of norm exactly ``eps`` (the random-noise floor of a universal
        perturbation), shape ``shape`` with the batch first."""
        raise ValueError(f"{self.norm.value} has no random sphere point here")

    def check_eps(self, eps: float) -> None:
        """Raise a ``ValueError`` naming the fix when ``eps`` makes no sense for this norm."""

    def dual_norm(self, a: Tensor) -> Tensor:
        """``‖a‖_* = max_{‖d‖ ≤ 1} ⟨a, d⟩`` over the last dimension (pass per-sample gradients
        flattened, ``g.flatten(1)``): what a linear bound loses over the ball, and ``|L| / ‖∇L‖_*`` is
        the distance to the zero level set of the linearised ``L`` (DeepFool, FMN)."""
        raise ValueError(f"{self.norm.value} has no dual norm here")

    def diameter(self, d: int) -> float:
        """The largest distance between two points of ``[0, 1]^d`` (a search range for radii)."""
        raise ValueError(f"{self.norm.value} has no diameter here")

    def linear_min(self, a: Tensor, x: Tensor, eps: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """A lower bound ``[B, S]`` of ``min ⟨a_s, x'⟩`` over the ball of radius ``eps[b]`` around
        ``x[b]`` ∩ [0, 1] (``a``: ``[B, S, d]``; ``x``, ``lo``, ``hi``: ``[B, d]``, a box that holds the
        set).  By default ``⟨a, x⟩ − eps‖a‖_*`` over the ball (leaving the box out only lowers it)."""
        centre = (a @ x[:, :, None])[..., 0]
        return centre - eps[:, None] * self.dual_norm(a)

    # -- shared by every norm ---------------------------------------------------------------------
    def sphere_start(self, x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
        """``x + ε·t/‖t‖`` clipped to [0, 1], ``t`` from :meth:`noise` (APGD's start)."""
        t = self.noise(tuple(x.shape), gen, x.dtype).to(x.device)
        t = t / per_sample(self.distance(t).clamp_min(1e-12), t)
        return (x + eps * t).clamp(0.0, 1.0)

    def inside(self, delta: Tensor, eps: float) -> Tensor:
        """Bool ``[B]``: each perturbation lies in the ball (with float slack)."""
        return self.distance(delta) <= eps * (1 + self.rtol) + self.atol


_GEOMETRIES: dict[Norm, Geometry] = {}


def _geometry(cls: type[Geometry]) -> type[Geometry]:
    _GEOMETRIES[cls.norm] = cls()
    return cls


def geometry(norm: Norm | str) -> Geometry:
    """The geometry of ``norm`` (a :class:`Norm` or its name)."""
    return Norm.parse(norm).geometry


@_geometry
class LinfGeometry(Geometry):
    """``‖δ‖∞ = max |δ_i|``; the ball ∩ box is a box, so projection is a clamp (exact)."""

    norm = Norm.LINF
    aliases = ("linf", "inf", "l∞")
    example_eps = 0.1
    ball_is_box = True

    def distance(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().amax(dim=1)

    def project_ball(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        e = _radius(eps, delta)
        return delta.clamp(-e, e) if isinstance(e, Tensor) else delta.clamp(-float(e), float(e))

    def project(self, x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
        e = _radius(eps, x)
        return torch.min(torch.max(x_adv, x - e), x + e).clamp_(0.0, 1.0)

    def ascent(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def random_start(self, x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
        """``x + U(−ε, ε)`` per coordinate, clipped (Madry et al. 2018)."""
        noise = _uniform(tuple(x.shape), gen, x.dtype).to(x.device)
        return (x + (2 * noise - 1) * eps).clamp_(0.0, 1.0)

    def noise(self, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        """``U[−1, 1]`` per coordinate."""
        return 2 * _uniform(shape, gen, dtype) - 1

    def random_sphere(self, shape: tuple[int, ...], eps: float, gen: torch.Generator) -> Tensor:
        """A random vertex of the ball: ``±ε`` per coordinate."""
        return (torch.randint(0, 2, shape, generator=gen, device=gen.device).float() * 2 - 1) * eps

    def dual_norm(self, a: Tensor) -> Tensor:
        return a.abs().sum(dim=-1)

    def diameter(self, d: int) -> float:
        return 1.0

    def linear_min(self, a: Tensor, x: Tensor, eps: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Exact: the ball ∩ [0, 1] is the box ``[lo, hi]``, whose minimum takes ``lo`` where
        ``a > 0`` and ``hi`` where ``a < 0``."""
        return (a.clamp(min=0) @ lo[:, :, None] + a.clamp(max=0) @ hi[:, :, None])[..., 0]

    def check_eps(self, eps: float) -> None:
        if eps > 1:
            raise ValueError(f"Linf eps on images in [0, 1] must be <= 1, got {eps:g}; did you mean {eps:g}/255?")


def _radius(eps: float | Tensor, like: Tensor) -> float | Tensor:
    """A number as it is; a tensor of per-sample radii ``[B]`` as a broadcastable ``[B, 1, ...]``."""
    return per_sample(eps.to(like.dtype), like) if isinstance(eps, Tensor) else eps


def _normalize_l2(g: Tensor, tiny: float = 1e-12) -> Tensor:
    return g / per_sample(g.flatten(1).norm(p=2, dim=1).clamp_min(tiny), g)


@_geometry
class L2Geometry(Geometry):
    """``‖δ‖₂``.  Projection onto ball ∩ box: onto the ball, then clip to the box; the result stays in
    both sets (clipping toward ``x`` never increases the distance to ``x``)."""

    norm = Norm.L2
    aliases = ("l2", "2")
    example_eps = 1.0
    round_ball = True

    def distance(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).norm(p=2, dim=1)

    def project_ball(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        """``δ · min(1, ε / ‖δ‖₂)`` per sample."""
        factor = (eps / self.distance(delta).clamp_min(1e-12)).clamp(max=1.0)
        return delta * per_sample(factor, delta)

    def project(self, x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
        return (x + self.project_ball(x_adv - x, eps)).clamp_(0.0, 1.0)

    def ascent(self, grad: Tensor) -> Tensor:
        return _normalize_l2(grad)

    def random_start(self, x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
        """A uniform random direction at radius ``ε·u``, ``u ~ U(0, 1)``, clipped.  (A volume-uniform
        radius ``ε·u^(1/d)`` puts nearly every start on the sphere in high dimension; starts spread
        over the radius make a better PGD-L2 at 10-20 steps.)"""
        direction = _normalize_l2(_gaussian(tuple(x.shape), gen, x.dtype))
        radius = _uniform((x.shape[0],), gen, x.dtype)
        delta = direction * per_sample(radius * eps, x)
        return (x + delta.to(x.device)).clamp_(0.0, 1.0)

    def noise(self, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        """``N(0, I)``."""
        return _gaussian(shape, gen, dtype)

    def random_sphere(self, shape: tuple[int, ...], eps: float, gen: torch.Generator) -> Tensor:
        """A Gaussian direction scaled to ``ε``."""
        return _normalize_l2(torch.randn(shape, generator=gen, device=gen.device)) * eps

    def dual_norm(self, a: Tensor) -> Tensor:
        return a.norm(dim=-1)

    def diameter(self, d: int) -> float:
        return math.sqrt(d)


@_geometry
class L0Geometry(Geometry):
    """Changed pixels: a pixel (spatial position) counts once however many channels changed.
    Budgets are whole numbers and checked exactly (no slack)."""

    norm = Norm.L0
    aliases = ("l0", "0")
    example_eps = 1.0
    discrete = True

    def distance(self, delta: Tensor) -> Tensor:
        return (delta.abs().amax(dim=1) > 0).flatten(1).sum(dim=1).to(delta.dtype)

    def inside(self, delta: Tensor, eps: float) -> Tensor:
        return self.distance(delta) <= eps

    def project_ball(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        """Keep the ``⌊ε⌋`` pixels whose change is largest (squared over channels), zero the rest:
        the Euclidean projection onto the set of perturbations that change at most ``ε`` pixels."""
        k = torch.as_tensor(eps, dtype=torch.float64, device=delta.device).floor().long().reshape(-1)
        k = k.expand(delta.shape[0]) if k.numel() == 1 else k
        power = delta.pow(2).sum(dim=1).flatten(1)  # [B, H*W]
        order = power.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(power.shape[1], device=delta.device).expand_as(order))
        keep = (rank < k.clamp(min=0)[:, None]).view(delta.shape[0], 1, *delta.shape[2:])
        return delta * keep

    def project(self, x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
        """Keep the ``⌊ε⌋`` pixels that changed most, then clip to the box (the order of FMN,
        Pintor et al. 2021).  The result lies in ball ∩ box; it is not always the closest such
        point (clipping may shrink a kept pixel below one left out), and choosing after clipping
        was measured weaker for FMN's L0 search: it spends every pixel of the budget, where this
        order leaves the search room below ε (BENCHMARKS.md)."""
        return (x + self.project_ball(x_adv - x, eps)).clamp(0.0, 1.0)

    def scale_budget(self, eps: Tensor, factor: float) -> Tensor:
        """Whole pixels: at least one pixel in ``factor``'s direction, ``⌊ε · factor⌋`` when that
        moves further, never below 0."""
        if factor >= 1:
            return torch.maximum(eps + 1, (eps * factor).floor())
        return torch.minimum(eps - 1, (eps * factor).floor()).clamp_min(0)

    def check_eps(self, eps: float) -> None:
        if eps != int(eps):
            raise ValueError(f"L0 eps counts pixels and must be a whole number, got {eps}")


@_geometry
class L1Geometry(Geometry):
    """``‖δ‖₁``, the threat model of Croce & Hein, "Mind the box", ICML 2021.  Unlike L2, projecting
    onto the ball and then clipping to the box is not the projection onto ball ∩ box (clipping frees
    budget the ball projection had spent), so :meth:`project` is the exact projection onto the
    intersection (:func:`robustbench_lite.core.l1.project_l1_box`)."""

    norm = Norm.L1
    aliases = ("l1", "1")
    example_eps = 2.0

    def distance(self, delta: Tensor) -> Tensor:
        return l1.l1_norm(delta)

    def project_ball(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        """Duchi et al.'s sorting projection (ICML 2008, Figure 1)."""
        return l1.project_l1_ball(delta, eps)

    def project(self, x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
        return l1.project_l1_box(x_adv, x, eps)

    def ascent(self, grad: Tensor) -> Tensor:
        """One coordinate, ``sign(g_j)·e_j`` at ``j = argmax |g_j|`` (a vertex of the cross-polytope)."""
        return l1.l1_ascent(grad)

    def random_start(self, x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
        """A uniform point of the ε-sphere at radius ``ε·u``, ``u ~ U(0, 1)``, clipped."""
        return l1.l1_random_start(x, eps, gen)

    def noise(self, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        """I.i.d. Laplace, whose normalised direction is uniform on the L1 sphere."""
        return l1.l1_laplace(shape, gen, dtype)

    def random_sphere(self, shape: tuple[int, ...], eps: float, gen: torch.Generator) -> Tensor:
        return l1.l1_random_sphere(shape, eps, gen)

    def dual_norm(self, a: Tensor) -> Tensor:
        return a.abs().amax(dim=-1)

    def diameter(self, d: int) -> float:
        return float(d)


#: the smallest eps of any threat: float32 pixels near 1 move in steps of about 6e-8, so a smaller
#: ball measures rounding, not robustness (and 1e-300 is 0 in float32)
MIN_EPS = 1e-6


def check_eps(eps: object, norm: Norm) -> float:
    """Return ``eps`` as a float or raise a ``ValueError``/``TypeError`` that says what is allowed."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if eps < MIN_EPS:
        raise ValueError(
            f"eps {eps:g} is below {MIN_EPS:g}: float32 pixels move in steps of about 6e-8, so such a ball measures "
            "rounding, not robustness; give eps for pixels in [0, 1], e.g. 0.1 or 8/255"
        )
    norm.geometry.check_eps(eps)
    return eps


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball: ``ThreatModel(Norm.LINF, 0.1)`` or ``ThreatModel("l2", 1.5)``."""

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        norm = Norm.parse(self.norm)
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", check_eps(self.eps, norm))

    @property
    def geometry(self) -> Geometry:
        return self.norm.geometry

    @property
    def label(self) -> str:
        """Short stable label used in file names and tables, e.g. ``linf_0.1``."""
        return f"{self.norm.value}_{self.eps:g}"

    @classmethod
    def parse(cls, text: str) -> ThreatModel:
        """Parse ``"linf:0.1"``, ``"l2:1.5"`` or ``"linf_0.1"``."""
        for sep in (":", "_", "="):
            if sep in text:
                norm, eps = text.split(sep, 1)
                try:
                    value = float(eps)
                except ValueError:
                    break
                return cls(Norm.parse(norm), value)
        raise ValueError(f"cannot parse threat {text!r}; write it as NORM:EPS, e.g. 'linf:0.1' or 'l2:1.5'")
