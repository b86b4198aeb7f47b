"""Interval bound propagation (Gowal et al., "On the effectiveness of interval bound propagation
for training verifiably robust models", 2018): elementwise bounds pushed through each
layer, an affine map in centre/radius form ``(Wμ + b, |W| r)``, monotone ReLU and max-pooling
by their endpoints.  The margins ``f_y − f_c`` are bounded with ``e_y − e_c`` folded into the
last linear layer (the paper's "elision" of the last layer), tighter than subtracting the logit
intervals.  Input: the Linf box ∩ [0, 1] exactly; an L2 (L1) ball by the box that contains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.attack import eval_mode
from ..core.threat import ThreatModel
from . import (
    BoundVerifier,
    InputSet,
    ibp_margins,
    layer_bounds,
    logit_interval,
    parse_network,
    register_verifier,
)


@register_verifier("ibp")
@dataclass(frozen=True, kw_only=True)
class IBP(BoundVerifier):
    """Interval bounds; the cheapest verifier (two forward passes per layer)."""

    def _net_bounds(self, net, inset, y):
        _, last_in = layer_bounds(net, inset, "ibp")
        return ibp_margins(net, last_in, y)

    def logit_bounds(self, model: nn.Module, x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
        """The interval of each logit over the threat set, ``([B, K], [B, K])`` float64 (what
        interval libraries report; the margins above are tighter)."""
        threat = self._check_threat(threat)
        model, x, _ = self._check(model, x, torch.zeros(x.shape[0], dtype=torch.long))
        with eval_mode(model), torch.no_grad():
            net = parse_network(model, x[:1])
            eps = torch.full((x.shape[0],), threat.eps, dtype=torch.float64, device=x.device)
            return logit_interval(net, InputSet.make(x.to(torch.float64), threat.norm, eps))
