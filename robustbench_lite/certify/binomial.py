"""Exact binomial statistics for randomized smoothing, in float64 torch (no scipy at run time).

Cohen, Rosenfeld & Kolter (ICML 2019) need two things from a count ``k`` of ``n`` noise draws:

* CERTIFY: the one-sided ``(1 - alpha)`` Clopper–Pearson lower confidence bound on the success
  probability, the ``alpha`` quantile of ``Beta(k, n - k + 1)`` (Clopper & Pearson, 1934);
* PREDICT: the p-value of the two-sided binomial test of ``p = 1/2`` on the top two counts.

Both reduce to the binomial upper tail ``P(X >= k) = I_p(k, n - k + 1)``, the regularised incomplete
beta function, which this module evaluates by its continued fraction (DLMF 8.17.22) with the modified
Lentz method, each element stopping when its own fraction has converged.  The lower bound is then
found by bisection on ``p``, keeping the end of the bracket whose tail (inflated by a bound on its
float64 error) is still at most ``alpha``, so rounding never lifts the bound above the exact one.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TINY = 1e-300
_EPS = torch.finfo(torch.float64).eps
_TOL = 4 * _EPS


def _f64(v: Tensor | float | int) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float64, device="cpu")


def _beta_continued_fraction(a: Tensor, b: Tensor, x: Tensor, max_iter: int) -> Tensor:
    """The continued fraction of DLMF 8.17.22 for ``I_x(a, b)``, evaluated by modified Lentz.

    It converges fast where ``x < (a + 1) / (a + b + 2)``; the caller swaps ``(a, b, x)`` elsewhere.
    """
    # the first partial numerator is 1; the fraction is 1 / (1 + d1 / (1 + d2 / (1 + ...)))
    c = torch.ones_like(x)
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d)
    d = 1.0 / d
    h = d.clone()
    done = torch.zeros_like(x, dtype=torch.bool)  # an element stops once its own last factor is 1
    for m in range(1, max_iter + 1):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # d_{2m}
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # d_{2m+1}
        ):
            d = 1.0 + num * d
            d = torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d)
            c = 1.0 + num / c
            c = torch.where(c.abs() < _TINY, torch.full_like(c, _TINY), c)
            d = 1.0 / d
            step = c * d
            h = torch.where(done, h, h * step)
        done |= (step - 1.0).abs() <= _TOL
        if bool(done.all()):
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge in {max_iter} iterations")


def betainc(a: Tensor | float, b: Tensor | float, x: Tensor | float, max_iter: int = 100_000) -> Tensor:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``x`` in [0, 1] (float64)."""
    a, b, x = torch.broadcast_tensors(_f64(a), _f64(b), _f64(x))
    if bool(((a <= 0) | (b <= 0)).any()) or bool(((x < 0) | (x > 1) | x.isnan()).any()):
        raise ValueError("betainc needs a > 0, b > 0 and x in [0, 1]")
    inner = (x > 0) & (x < 1)
    out = torch.where(x >= 1, torch.ones_like(x), torch.zeros_like(x))
    if not bool(inner.any()):
        return out
    a_i, b_i, x_i = a[inner], b[inner], x[inner]
    swap = x_i > (a_i + 1.0) / (a_i + b_i + 2.0)
    aa, bb = torch.where(swap, b_i, a_i), torch.where(swap, a_i, b_i)
    xx = torch.where(swap, 1.0 - x_i, x_i)
    log_front = torch.lgamma(aa + bb) - torch.lgamma(aa) - torch.lgamma(bb) + aa * xx.log() + bb * torch.log1p(-xx)
    val = log_front.exp() * _beta_continued_fraction(aa, bb, xx, max_iter) / aa
    out[inner] = torch.where(swap, 1.0 - val, val).clamp(0.0, 1.0)
    return out


def binom_sf(k: Tensor, n: Tensor | int, p: Tensor | float) -> Tensor:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)`` (elementwise, float64): ``I_p(k, n - k + 1)``."""
    k, n, p = torch.broadcast_tensors(_f64(k), _f64(n), _f64(p))
    out = torch.where(k <= 0, torch.ones_like(p), torch.zeros_like(p))
    mid = (k > 0) & (k <= n)
    if bool(mid.any()):
        out[mid] = betainc(k[mid], n[mid] - k[mid] + 1.0, p[mid])
    return out


def clopper_pearson_lower(k: Tensor, n: Tensor | int, alpha: float, iters: int = 64) -> Tensor:
    """The one-sided ``(1 - alpha)`` Clopper–Pearson lower bound on a binomial proportion (float64).

    It is the ``p`` at which ``P(X >= k) = alpha`` (the ``alpha`` quantile of ``Beta(k, n - k + 1)``):
    0 for ``k = 0``, ``alpha ** (1 / n)`` for ``k = n`` (then ``P(X >= n) = p ** n``; one float64 step
    down), otherwise found by bisection on ``p``.  Rounding never lifts the bound above the exact one:
    the bisection keeps the low end of its bracket, and decides with the computed tail inflated by a
    bound on its float64 error (the log-gamma terms grow like ``n log n``, so their rounding is
    ``O(eps · n log n)`` relative), which lowers the bound by at most about that relative amount.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    k, n = torch.broadcast_tensors(_f64(k), _f64(n))
    if bool(((k < 0) | (k > n) | (n < 1)).any()):
        raise ValueError("clopper_pearson_lower needs counts 0 <= k <= n and n >= 1")
    out = torch.zeros_like(k)
    full = k == n
    exact = alpha ** (1.0 / n[full])
    out[full] = torch.nextafter(exact, torch.zeros_like(exact))
    mid = (k > 0) & (k < n)
    if bool(mid.any()):
        km, nm = k[mid], n[mid]
        slack = 16 * _EPS * (torch.lgamma(nm + 2.0) + 40.0 * nm + 100.0)  # relative error bound of the tail
        lo, hi = torch.zeros_like(km), torch.ones_like(km)  # tail(lo) <= alpha < tail(hi) throughout
        for _ in range(iters):
            p = 0.5 * (lo + hi)
            above = binom_sf(km, nm, p) * (1.0 + slack) > alpha
            hi, lo = torch.where(above, p, hi), torch.where(above, lo, p)
        out[mid] = lo
    return out


def binom_test_half(k_top: Tensor, k_second: Tensor) -> Tensor:
    """The two-sided binomial-test p-value of ``p = 1/2`` for ``k_top`` successes in ``k_top + k_second``
    trials, with ``k_top >= k_second``: ``min(1, 2 P(X >= k_top))`` (the distribution is symmetric, so
    this is also the sum of all outcomes no more likely than the one seen)."""
    k_top, k_second = torch.broadcast_tensors(_f64(k_top), _f64(k_second))
    if bool((k_top < k_second).any()) or bool((k_second < 0).any()):
        raise ValueError("binom_test_half needs k_top >= k_second >= 0 (sort the counts first)")
    total = k_top + k_second
    pval = torch.ones_like(total)
    some = total > 0
    if bool(some.any()):
        pval[some] = (2.0 * binom_sf(k_top[some], total[some], 0.5)).clamp(max=1.0)
    return pval


def normal_quantile(p: Tensor) -> Tensor:
    """``Φ⁻¹(p)``, the standard normal quantile (float64)."""
    return torch.special.ndtri(_f64(p))


def all_agree_radius(sigma: float, n: int, alpha: float) -> float:
    """The radius CERTIFY gives when all ``n`` draws agree: ``σ Φ⁻¹(alpha ** (1 / n))`` (0 if that is
    below 1/2, where CERTIFY abstains); the largest radius ``n`` draws can certify."""
    p = clopper_pearson_lower(torch.tensor([n]), n, alpha)
    return sigma * float(normal_quantile(p)[0]) if float(p[0]) >= 0.5 else 0.0


__all__ = [
    "all_agree_radius",
    "betainc",
    "binom_sf",
    "binom_test_half",
    "clopper_pearson_lower",
    "normal_quantile",
]
