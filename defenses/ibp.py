"""IBP training (Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann & Kohli,
"On the effectiveness of interval bound propagation for training verifiably robust models",
2018): ``κ·CE(z, y) + (1 − κ)·CE(ẑ_ε, y)`` with ``ẑ_ε`` the worst-case logits from the
interval bounds of the margins (the margin matrix folded into the last layer, the paper's
elision).  Schedule as in the paper: a natural warm-up, then eps ramped linearly to its training
value while κ goes from 1 to ``kappa_end`` (0.5); train eps may exceed the test eps
(``train_eps_factor``; the paper trains MNIST at 0.4 for 0.3 and CIFAR-10 at 1.1×).
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_lite import register_defense

from ._certified import CertifiedDefense, ibp_bounds


@register_defense("ibp")
@dataclass(frozen=True, kw_only=True)
class IBPTraining(CertifiedDefense):
    """Natural warm-up, linear eps ramp, κ: 1 → 0.5."""

    def margin_lower(self, net, inset, y, r):
        return ibp_bounds(net, inset, y)[1]
