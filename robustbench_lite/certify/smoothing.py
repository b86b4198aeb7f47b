"""Randomized smoothing for L2 (Cohen, Rosenfeld & Kolter, "Certified adversarial robustness via
randomized smoothing", ICML 2019): a certificate for any classifier that holds with probability 1 − α.

The smoothed classifier is ``g(x) = argmax_c P(f(x + δ) = c)``, ``δ ~ N(0, σ² I)``.  If the top class
has probability at least ``p_A >= 1/2`` then ``g`` is constant on the L2 ball of radius
``R = σ Φ⁻¹(p_A)`` (their Theorem 1 with ``p_B = 1 − p_A``, as in their CERTIFY).  The probabilities
are estimated by Monte Carlo, so the result is a probabilistic certificate: with probability at least
``1 − α`` over the noise, what CERTIFY returns is right.  It is a different kind of guarantee from the
deterministic verifiers and is reported apart from them.

* :meth:`Smoothing.predict` is their PREDICT: ``n`` draws, the top two counts, and a two-sided
  binomial test of ``p = 1/2`` at level ``α``; abstains (``-1``) when the p-value exceeds ``α``.
* :meth:`Smoothing.certify` is their CERTIFY: ``n0`` draws pick ``ĉ``; ``n`` fresh draws give the
  one-sided Clopper–Pearson lower bound ``p_A`` at level ``α``; abstain (``-1``, radius 0) if
  ``p_A < 1/2``, else radius ``σ Φ⁻¹(p_A)``.

Noise is added to images in [0, 1] and the noisy images are *not* clipped back to [0, 1], as in the
paper (and as ART does): the base classifier is trained on unclipped noisy images (``gaussian-aug``),
and the theorem needs nothing of ``f``, so a base model that wants clipping can clip inside itself
(any ``f`` works; clipping only changes which ``f`` is smoothed).

The noise depends on the generator, the batch layout (``batch_size``) and the device of the
generator; the same config, inputs and seed give the same numbers.  The statistics are in
:mod:`robustbench_lite.certify.binomial` (float64, exact, no scipy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.config import MAX_SEED, Plugin, setting
from ..core.threat import Norm
from .binomial import binom_test_half, clopper_pearson_lower, normal_quantile

ABSTAIN = -1


@dataclass(frozen=True, kw_only=True)
class Smoothing(Plugin):
    """Settings of the smoothed classifier and its Monte Carlo estimates (the paper's n0, n, α).

    ``n`` is part of every result: with all ``n`` draws agreeing the largest certifiable radius is
    ``σ Φ⁻¹(α^(1/n))`` (:func:`robustbench_lite.certify.binomial.all_agree_radius`).
    """

    sigma: float = setting(0.25, low=0.0, low_open=True)
    n0: int = setting(100, low=1)
    n: int = setting(100_000, low=1, high=10**9)
    alpha: float = setting(0.001, low=0.0, low_open=True)
    batch_size: int = setting(1000, low=1)
    seed: int = setting(0, low=0, high=MAX_SEED)  # the noise generator's seed where the harness runs it

    registry_name = "smoothing"
    norms: ClassVar[tuple[Norm, ...]] = (Norm.L2,)  # the certified radius is an L2 distance

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha < 1.0:
            raise ValueError(f"smoothing: alpha must be in (0, 1) (the paper uses 0.001), got {self.alpha!r}")

    # -- the two procedures of the paper --------------------------------------------------------
    def predict(self, model: nn.Module, x: Tensor, gen: torch.Generator) -> Tensor:
        """PREDICT: the smoothed class of each point, or ``-1`` (abstain) where the binomial test of the
        top two of ``n`` counts does not reject ``p = 1/2`` at level ``alpha``.  Long tensor [B], CPU."""
        counts = noise_counts(model, x, self.n, self.sigma, gen, self.batch_size)
        return predict_from_counts(counts, self.alpha)

    def certify(self, model: nn.Module, x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """CERTIFY: ``(prediction [B] long, radius [B] float64)`` on the CPU; abstentions are
        ``(-1, 0.0)``.  ``n0`` draws pick the class, ``n`` fresh draws bound its probability."""
        counts0 = noise_counts(model, x, self.n0, self.sigma, gen, self.batch_size)
        counts = noise_counts(model, x, self.n, self.sigma, gen, self.batch_size)
        return certify_from_counts(counts0, counts, self.sigma, self.alpha)

    def evaluate(
        self, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator, radii: Sequence[float] = (0.0,)
    ) -> SmoothingResult:
        """CERTIFY on ``(x, y)`` and the certified accuracy at each L2 radius in ``radii``."""
        _check_inputs(x, gen)
        if not (isinstance(y, Tensor) and y.dtype == torch.long and y.shape == x.shape[:1]):
            raise ValueError(f"y must be a long tensor of {x.shape[0]} labels, got {getattr(y, 'shape', y)!r}")
        start, cpu = time.perf_counter(), time.process_time()
        pred, radius = self.certify(model, x, gen)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        acc = certified_accuracy(radius, pred == y.cpu(), radii)
        return SmoothingResult(
            sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha, points=len(x),
            abstain_rate=float((pred == ABSTAIN).double().mean()) if len(x) else 0.0,
            radii=tuple(float(r) for r in radii), certified_acc=tuple(float(a) for a in acc),
            seconds=seconds, cpu_seconds=cpu_seconds,
        )


@dataclass(frozen=True)
class SmoothingResult:
    """What :meth:`Smoothing.evaluate` measured; ``certified_acc[i]`` is at L2 radius ``radii[i]``."""

    sigma: float
    n0: int
    n: int
    alpha: float
    points: int
    abstain_rate: float
    radii: tuple[float, ...]
    certified_acc: tuple[float, ...]
    seconds: float
    cpu_seconds: float


# -- pure functions ------------------------------------------------------------------------------
def predict_from_counts(counts: Tensor, alpha: float) -> Tensor:
    """PREDICT's decision from class counts ``[B, C]``: the top class, or ``-1`` where the two-sided
    binomial test of the top two counts against ``p = 1/2`` has p-value above ``alpha``."""
    if counts.ndim != 2:
        raise ValueError(f"counts must be [points, classes], got shape {tuple(counts.shape)}")
    counts = counts.cpu()
    if counts.shape[1] < 2:
        counts = torch.cat([counts, torch.zeros(len(counts), 2 - counts.shape[1], dtype=counts.dtype)], 1)
    top2, idx = counts.topk(2, dim=1)
    pval = binom_test_half(top2[:, 0], top2[:, 1])
    return torch.where(pval <= alpha, idx[:, 0], torch.full_like(idx[:, 0], ABSTAIN))


def certify_from_counts(counts0: Tensor, counts: Tensor, sigma: float, alpha: float) -> tuple[Tensor, Tensor]:
    """CERTIFY's decision from the selection counts ``counts0`` and the estimation counts ``counts``
    (both ``[B, C]``): ``ĉ = argmax counts0``, ``p_A`` = Clopper–Pearson lower bound of
    ``counts[ĉ]`` out of ``counts.sum(1)``; ``(ĉ, σ Φ⁻¹(p_A))``, or ``(-1, 0)`` if ``p_A < 1/2``."""
    if counts0.ndim != 2 or counts.shape != counts0.shape:
        raise ValueError(f"counts0 and counts must both be [points, classes], got {tuple(counts0.shape)}, "
                         f"{tuple(counts.shape)}")
    counts0, counts = counts0.cpu(), counts.cpu()
    if len(counts) == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
    c_hat = counts0.argmax(1)
    n_a = counts.gather(1, c_hat[:, None])[:, 0]
    p_a = clopper_pearson_lower(n_a, counts.sum(1), alpha)
    ok = p_a >= 0.5
    radius = torch.where(ok, sigma * normal_quantile(p_a.clamp(min=0.5)), torch.zeros_like(p_a))
    return torch.where(ok, c_hat, torch.full_like(c_hat, ABSTAIN)), radius


def certified_accuracy(radii: Tensor, correct: Tensor, radii_grid: Sequence[float] | Tensor) -> Tensor:
    """Certified accuracy at each L2 radius of ``radii_grid`` (float64 [len(grid)]): the share of points
    that are correct and whose certified radius is at least that radius.

    ``correct`` must be ``prediction == label`` with CERTIFY's prediction, so abstentions (``-1``)
    never count, even at radius 0 (where their radius 0 would otherwise reach)."""
    radii, correct = torch.as_tensor(radii).cpu(), torch.as_tensor(correct).cpu()
    if radii.ndim != 1 or correct.shape != radii.shape or correct.dtype != torch.bool:
        raise ValueError("radii must be [B] and correct a bool tensor [B] (prediction == label)")
    grid = torch.as_tensor(radii_grid, dtype=torch.float64).cpu().reshape(-1)
    if bool((grid < 0).any()):
        raise ValueError(f"radii_grid must be non-negative L2 radii, got {grid.tolist()}")
    if len(radii) == 0:
        return torch.zeros(len(grid), dtype=torch.float64)
    hit = correct[None, :] & (radii.double()[None, :] >= grid[:, None])
    return hit.double().mean(1)


# -- sampling ------------------------------------------------------------------------------------
@torch.no_grad()
def noise_counts(
    model: nn.Module, x: Tensor, num: int, sigma: float, gen: torch.Generator, batch_size: int = 1000
) -> Tensor:
    """How often ``model(x + δ)`` picks each class over ``num`` draws ``δ ~ N(0, σ² I)`` per point:
    long ``[B, C]`` on the CPU.  The ``B · num`` noisy images go through the model in batches of
    ``batch_size`` (points follow each other), in eval mode (the model's mode is restored)."""
    _check_inputs(x, gen)
    if num < 1 or sigma <= 0 or batch_size < 1:
        raise ValueError(f"need num >= 1, sigma > 0 and batch_size >= 1, got {num}, {sigma}, {batch_size}")
    total = len(x) * num
    counts: Tensor | None = None
    was = model.training
    model.eval()
    try:
        for start in range(0, total, batch_size):
            point = torch.arange(start, min(start + batch_size, total), device=x.device) // num
            noise = torch.randn((len(point), *x.shape[1:]), generator=gen, device=gen.device, dtype=x.dtype)
            logits = model(x[point] + sigma * noise.to(x.device))
            pred = logits.argmax(1)
            if counts is None:
                classes = logits.shape[1]
                counts = torch.zeros(len(x) * classes, dtype=torch.long, device=x.device)
            counts.index_add_(0, point * classes + pred, torch.ones_like(pred))
    finally:
        model.train(was)
    if counts is None:
        return torch.zeros(0, 0, dtype=torch.long)
    return counts.view(len(x), -1).cpu()


def _check_inputs(x: Tensor, gen: torch.Generator) -> None:
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"gen must be a seeded torch.Generator, e.g. torch.Generator().manual_seed(0); got {gen!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"x must be a float tensor of images [B, ...], got {getattr(x, 'shape', type(x))}")
    if len(x) and not bool(torch.isfinite(x).all()):
        raise ValueError("x has NaN or inf values; pass finite images in [0, 1]")
    if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(
            f"x must be images in [0, 1], got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]; "
            "scale the inputs to [0, 1] and put any normalization inside the model"
        )
