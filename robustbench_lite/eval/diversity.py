"""The Diversity Index of a search (Yamamura et al., ICML 2022, section 4.2).

Take a point's last ``n`` search points, their pairwise Euclidean distances ``D_ij``, and the graph
``G_h`` with an edge wherever ``D_ij ≤ h``.  ``C(h)`` is the mean local clustering coefficient
``2e_i/(k_i(k_i − 1))`` (0 where ``k_i < 2``).  Then

    DI = 1 − (1/h_max) ∫_0^{h_max} C(h) dh,    h_max = 2ε√d  (the Linf ball's diameter in L2).

``C`` is a step function that changes only at the pairwise distances, so the integral is a sum
over the sorted distances.  Higher DI means a more spread-out search.  Pure functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def clustering_coefficient(adj: Tensor) -> Tensor:
    """Mean local clustering coefficient of an undirected graph (bool ``[n, n]``, no self loops)."""
    a = adj.to(torch.float64)
    k = a.sum(dim=1)
    triangles = (a @ a * a).sum(dim=1) / 2  # edges among each node's neighbours
    pairs = k * (k - 1) / 2
    c = torch.where(pairs > 0, triangles / pairs.clamp_min(1), torch.zeros_like(k))
    return c.mean()


def diversity_index(points: Tensor, eps: float | None = None, *, h_max: float | None = None) -> float:
    """DI of one search: ``points`` is ``[n, ...]`` (n search points, any shape each).

    Give ``eps`` (then ``h_max = 2·eps·√d``, d the dimension of a point) or ``h_max``.
    """
    if points.dim() < 2 or points.shape[0] < 2:
        raise ValueError(f"points must be [n, ...] with n >= 2 search points, got shape {tuple(points.shape)}")
    flat = points.detach().flatten(1).to(torch.float64)
    if h_max is None:
        if eps is None:
            raise ValueError("give eps (h_max = 2·eps·sqrt(d)) or h_max")
        h_max = 2.0 * eps * math.sqrt(flat.shape[1])
    if not h_max > 0:
        raise ValueError(f"h_max must be > 0, got {h_max}")
    n = flat.shape[0]
    dist = torch.cdist(flat, flat)
    off = ~torch.eye(n, dtype=torch.bool)
    levels = torch.unique(dist[off]).clamp(max=h_max)
    levels = torch.unique(torch.cat([levels, torch.tensor([h_max], dtype=torch.float64)]))
    area, prev_h, prev_c = 0.0, 0.0, 0.0
    for h in levels.tolist():  # C is constant on [level_i, level_{i+1})
        area += prev_c * (h - prev_h)
        prev_h, prev_c = h, float(clustering_coefficient((dist <= h) & off))
    return 1.0 - area / h_max


def compare_diversity(points_a: Tensor, points_b: Tensor, eps: float) -> dict[str, float]:
    """Compare two attacks' search points on the same images (``[B, n, d]`` each): mean DI of
    each, and the fraction of images where ``a`` searched more diversely than ``b``."""
    if points_a.shape[0] != points_b.shape[0]:
        raise ValueError(f"both searches must cover the same images, got {points_a.shape[0]} and {points_b.shape[0]}")
    da = torch.tensor([diversity_index(p, eps) for p in points_a])
    db = torch.tensor([diversity_index(p, eps) for p in points_b])
    return {"di_a": float(da.mean()), "di_b": float(db.mean()), "a_more_diverse": float((da > db).float().mean())}
