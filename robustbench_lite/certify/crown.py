"""CROWN (Zhang, Weng, Chen, Hsieh & Daniel, "Efficient neural network robustness
certification with general activation functions", NeurIPS 2018: the explicit output bounds of
Theorem 3.2 with the adaptive ReLU bounds, "CROWN-Ada"): the margins ``f_y − f_c`` are bounded
by one backward pass of linear bounds started from the margin matrix.  An unstable ReLU
(``l < 0 < u``) gets the upper line ``u(z − l)/(u − l)`` and the lower line ``αz`` with ``α = 1``
if ``u ≥ −l`` else 0; stable ReLUs are exact.  Max-pooling uses the relaxation in
:func:`robustbench_lite.certify._bounds.maxpool_back` (the paper has no max-pooling).

``intermediate``: the pre-activation bounds the relaxations need come from ``crown`` (layer by
layer back-substitution, the paper's method, intersected with the interval bounds, which is
also sound; only unstable ReLU inputs are refined) or ``ibp`` (interval bounds: the
"CROWN-IBP" bound of Zhang et al., ICLR 2020).  Concretization: exact over the Linf box ∩
[0, 1]; ``Λx₀ − ε‖Λ‖₂`` (L2) and ``Λx₀ − ε‖Λ‖∞`` (L1) over the ball, ignoring the box.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import setting
from . import BoundVerifier, crown_margins, layer_bounds, register_verifier


@register_verifier("crown")
@dataclass(frozen=True, kw_only=True)
class CROWN(BoundVerifier):
    """Backward linear bounds with CROWN's adaptive lower slopes."""

    intermediate: str = setting("crown", choices=("crown", "ibp"))

    def _net_bounds(self, net, inset, y):
        bounds, _ = layer_bounds(net, inset, self.intermediate)
        return crown_margins(net, bounds, inset, y)
