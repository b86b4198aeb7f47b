"""CROWN-IBP (Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning & Hsieh, "Towards stable and
efficient training of verifiably robust neural networks", ICLR 2020): the margin lower
bound is ``β·CROWN-IBP + (1 − β)·IBP``, where CROWN-IBP is a CROWN backward pass from the margin
matrix using the IBP bounds of the intermediate layers; β ramps from 1 to ``beta_end`` (0) with
the eps ramp.  Loss ``κ·CE(z, y) + (1 − κ)·CE(−lb, y)``.

From the authors' code and Fashion-MNIST configuration: Adam, lr 1e-3, batch 256, one epoch of
natural warm-up, eps ramped linearly over the next 60 of 100 epochs to the test eps (0.1), Linf
box clipped to [0, 1], PyTorch's default initialization; κ and β linear in ``ε_t/ε_train``.
Their Fashion-MNIST runs train on the bound alone (κ = 0); here κ goes from ``kappa_start`` (1)
to ``kappa_end`` (0), the paper's κ schedule.  Epoch counts are settings; the CPU benchmark uses
far fewer epochs than the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_lite import register_defense, setting
from robustbench_lite.certify import crown_margins

from ._certified import CertifiedDefense, ibp_bounds


@register_defense("crown-ibp")
@dataclass(frozen=True, kw_only=True)
class CROWNIBP(CertifiedDefense):
    """β·CROWN-IBP + (1 − β)·IBP margins; β: 1 → ``beta_end``, κ: 1 → ``kappa_end``."""

    kappa_end: float = setting(0.0, low=0.0, high=1.0)
    beta_end: float = setting(0.0, low=0.0, high=1.0)

    def margin_lower(self, net, inset, y, r):
        bounds, ibp = ibp_bounds(net, inset, y)
        beta = 1.0 + (self.beta_end - 1.0) * r
        if beta < 1e-5:
            return ibp
        return beta * crown_margins(net, bounds, inset, y) + (1 - beta) * ibp
