"""Convex standard training of a one-hidden-layer ReLU network (Pilanci & Ergen, "Neural
networks are convex regularizers", ICML 2020, eq. (8) with hinge loss), one-vs-rest.

``min Σ_k (1 − y_k Σ_i d_ik x_kᵀ(v_i − w_i))₊ / n + β Σ_i (‖v_i‖₂ + ‖w_i‖₂)`` s.t.
``(2D_i − I) X v_i ≥ 0``, ``(2D_i − I) X w_i ≥ 0``, over sampled patterns ``D_i``; recovered as
``f_c(x) = Σ_i (xᵀv_i)₊ − (xᵀw_i)₊`` per class c.  Solver and recovery in
:mod:`robustbench_lite.defenses._convex`.  Multiclass data goes one-vs-rest (class c against the rest);
prediction is the argmax over the K binary scores.  Changed from the paper: hinge loss (so
it is the ε = 0 case of the robust program), no bias.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_lite import register_defense, setting

from ._convex import ConvexDefense


@register_defense("convex-standard")
@dataclass(frozen=True, kw_only=True)
class ConvexStandard(ConvexDefense):
    """The ε = 0 program; ``certify_eps`` (0.1) is the radius its certificate is reported at."""

    eps: float = setting(0.0, low=0.0, high=0.0)
    certify_eps: float = setting(0.1, low=0.0, high=1.0)
