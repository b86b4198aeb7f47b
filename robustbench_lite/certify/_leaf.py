"""The leaves of branch and bound: a subdomain whose unstable ReLUs are all split is a linear
program, solved exactly (scipy's HiGHS).

With every neuron's phase fixed (stable ones by the root bounds, unstable ones by the splits)
the network is affine on the subdomain: the margin is ``a·x + c`` and each split neuron's input
is ``A_j x + b_j``, all read off backward passes in float64 (the relaxations are exact there).
The subdomain is the box ``lo ≤ x ≤ hi`` (the Linf ball ∩ [0, 1]) with ``g_j(x) ≤ 0``
(``g = −z`` for an active split, ``z`` for an inactive one), so

    min a·x + c   s.t.   g(x) ≤ 0,   lo ≤ x ≤ hi

is the exact minimum of the margin there.  The solver's answer is not trusted as such:

* its dual multipliers ``μ ≥ 0`` give a sound lower bound by weak duality, evaluated in float64:
  ``c + μ·h + min over the box of (a + μG)·x`` (``g = Gx + h``), the β-CROWN bound with ``β = μ``;
* an infeasible program (an empty subdomain) is proven empty the same way, from the multipliers
  of ``min t s.t. g(x) ≤ t``, scaled until the bound is positive;
* its minimiser is returned as a candidate counterexample, which the caller checks on the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._beta import Layout, split_bounds
from ._bounds import backward


def leaf_program(layout: Layout, spec: Tensor, signs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a [d], c, G [U, d], h [U])``: the margin ``a·x + c`` and the constraints ``Gx + h ≤ 0``
    of a subdomain with every unstable neuron split (``signs``: ``[U]`` of ±1)."""
    net = layout.net
    bounds = split_bounds(layout, signs[None])
    a, c = backward(net, {net.output: spec[None, None]}, bounds, layout.inset, linear=True)
    rows, offs = [], []
    for i, (k, idx) in enumerate(zip(layout.relus, layout.index, strict=True)):
        p = net.nodes[k].inputs[0]
        shape = net.nodes[p].shape
        unit = a.new_zeros(1, idx.numel(), int(np.prod(shape)))
        unit[0, torch.arange(idx.numel()), idx] = 1.0
        g, h = backward(net, {p: unit.reshape(1, idx.numel(), *shape)}, bounds, layout.inset, linear=True)
        sign = -signs[layout.offsets[i] : layout.offsets[i + 1]].to(a.dtype)
        rows.append(sign[:, None] * g[0].flatten(1))
        offs.append(sign * h[0])
    return a[0, 0].flatten(), c[0, 0], torch.cat(rows), torch.cat(offs)


def lagrangian(a: Tensor, c: Tensor, g: Tensor, h: Tensor, mu: Tensor, lo: Tensor, hi: Tensor) -> float:
    """``c + μ·h + min_{lo ≤ x ≤ hi} (a + μG)·x``: a lower bound of the program for any ``μ ≥ 0``."""
    w = a + mu @ g
    return float(c + mu @ h + w.clamp(min=0) @ lo + w.clamp(max=0) @ hi)


def solve_leaf(layout: Layout, spec: Tensor, signs: Tensor) -> tuple[float, Tensor | None]:
    """``(sound lower bound, minimiser or None)`` of the margin over a leaf subdomain."""
    from scipy.optimize import linprog

    a, c, g, h = leaf_program(layout, spec, signs)
    lo, hi = layout.inset.lo.flatten(), layout.inset.hi.flatten()
    box = np.stack([lo.cpu().numpy(), hi.cpu().numpy()], 1)
    g_np, h_np = g.cpu().numpy(), h.cpu().numpy()
    res = linprog(a.cpu().numpy(), A_ub=g_np, b_ub=-h_np, bounds=box, method="highs")
    if res.status == 0:
        mu = torch.as_tensor(-res.ineqlin.marginals, dtype=a.dtype, device=a.device).clamp(min=0)
        x = torch.as_tensor(res.x, dtype=a.dtype, device=a.device).clamp(lo, hi)
        return lagrangian(a, c, g, h, mu, lo, hi), x.reshape(layout.inset.x.shape[1:])
    if res.status == 2:  # infeasible: the multipliers of min t s.t. g(x) <= t prove the subdomain empty
        n = a.numel()
        cost = np.zeros(n + 1)
        cost[-1] = 1.0
        phase = linprog(cost, A_ub=np.hstack([g_np, -np.ones((g_np.shape[0], 1))]), b_ub=-h_np,
                        bounds=np.vstack([box, [[None, None]]]), method="highs")
        if phase.status == 0 and phase.fun > 0:
            mu = torch.as_tensor(-phase.ineqlin.marginals, dtype=a.dtype, device=a.device).clamp(min=0)
            zero = torch.zeros_like(a)
            gap = lagrangian(zero, zero.sum(), g, h, mu, lo, hi)  # min over the box of mu·g > 0
            base = lagrangian(a, c, g, h, torch.zeros_like(mu), lo, hi)
            if gap > 0:
                scale = (abs(base) + 1.0) / gap
                return lagrangian(a, c, g, h, scale * mu, lo, hi), None
    return float("-inf"), None
