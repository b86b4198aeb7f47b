"""Convex Linf-robust training of a one-hidden-layer ReLU network (Bai, Gautam & Sojoudi,
"Practical convex formulation of robust one-hidden-layer neural network training", ACC 2022),
one-vs-rest.

``min Σ_k (1 − y_k Σ_i d_ik x_kᵀ(v_i − w_i) + ε‖Σ_i d_ik (v_i − w_i)‖₁)₊ / n + β Σ_i (‖v_i‖₂ +
‖w_i‖₂)`` s.t. ``(2D_i − I) X v_i ≥ ε‖v_i‖₁`` and the same for ``w_i`` (row-wise): every
training point's activation pattern is fixed over its ε ball, where the network is linear and
the worst-case hinge above is exact.  Recovered as ``f_c(x) = Σ_i (xᵀv_i)₊ − (xᵀw_i)₊``;
the ``stable-relu`` verifier (``robustbench_lite.certify.stable_relu``) certifies a point when all
its neurons keep their sign over the ball and the worst-case margin is positive.  Multiclass data goes one-vs-rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_lite import register_defense, setting

from ._convex import ConvexDefense


@register_defense("convex-robust")
@dataclass(frozen=True, kw_only=True)
class ConvexRobust(ConvexDefense):
    """The robust program at Linf radius ``eps``."""

    eps: float = setting(0.1, low=0.0, low_open=True, high=1.0)
