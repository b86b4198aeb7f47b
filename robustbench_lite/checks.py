"""Checks that flag unreliable evaluations (Athalye et al. 2018; Carlini et al. 2019).

Each check is a small pure function over numbers the harness already has; it returns a flag
code (a stable string stored in the ``flags`` column) or ``None``.  A flagged cell is kept and
marked, never dropped.  :data:`FLAGS` explains every code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

ZERO_GRAD = "zero-grad"
SINGLE_STEP_WINS = "single-step-beats-iterative"
INCOMPLETE = "incomplete"

FLAGS: dict[str, str] = {
    ZERO_GRAD: "the loss gradient w.r.t. the input is zero or non-finite on a share of the evaluated points: "
    "gradient attacks are blind there (gradient masking, saturated softmax, non-differentiable layer)",
    SINGLE_STEP_WINS: "a single-step attack left lower robust accuracy than an iterative one at the same threat: "
    "the iterative attack is failing, a classic sign of gradient masking",
    INCOMPLETE: "at least one attack of this threat failed with an error, so the worst case covers fewer attacks",
}


def zero_gradients(grad_norms: Tensor, max_share: float = 0.05) -> str | None:
    """Flag when more than ``max_share`` of points have a zero or non-finite input gradient."""
    if grad_norms.numel() == 0:
        return None
    bad = ~torch.isfinite(grad_norms) | (grad_norms <= 1e-30)
    return ZERO_GRAD if float(bad.float().mean()) > max_share else None


def single_step_beats_iterative(
    robust_acc: Mapping[str, float], iterative: Mapping[str, bool], tolerance: float = 0.01
) -> set[str]:
    """The iterative attacks whose robust accuracy exceeds the best single-step attack's by
    more than ``tolerance`` (all of one threat model).  Returns their names."""
    single = [acc for name, acc in robust_acc.items() if not iterative[name]]
    if not single:
        return set()
    best_single = min(single)
    return {name for name, acc in robust_acc.items() if iterative[name] and acc > best_single + tolerance}


def join(flags: Iterable[str | None]) -> str:
    """Flags as the ``flags`` column stores them: sorted, unique, ';'-separated."""
    return ";".join(sorted({f for f in flags if f}))
