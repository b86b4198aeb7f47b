"""Interval bound propagation (Gowal et al., "On the effectiveness of interval bound propagation
for training verifiably robust models", 2018): elementwise bounds pushed through each
layer, an affine map in centre/radius form ``(Wμ + b, |W| r)``, monotone ReLU and max-pooling
by their endpoints.  The margins ``f_y − f_c`` are bounded with ``e_y − e_c`` folded into the
last linear layer (the paper's "elision" of the last layer), tighter than subtracting the logit
intervals.  Input: the Linf box ∩ [0, 1] exactly; an L2 (L1) ball by the box that contains it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import (
    BoundVerifier,
    ibp_margins,
    layer_bounds,
    register_verifier,
)


@register_verifier("ibp")
@dataclass(frozen=True, kw_only=True)
class IBP(BoundVerifier):
    """Interval bounds; the cheapest verifier (two forward passes per layer)."""

    def _net_bounds(self, net, inset, y):
        _, last_in = layer_bounds(net, inset, "ibp")
        return ibp_margins(net, last_in, y)
