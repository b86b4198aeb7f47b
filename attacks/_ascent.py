"""The projected gradient-ascent loop shared by I-FGSM, iterative least-likely and PGD.

``x_{k+1} = Π(x_k + step · d(∇ loss(x_k)))`` with ``d = sign`` (Linf) or ``g / ||g||_2`` (L2)
and Π the projection onto the eps ball ∩ [0, 1] (Kurakin et al. 2017; Madry et al. 2018).
Each point's first successful iterate is kept and the point leaves the active batch, so
finished points cost nothing; points never broken return their last iterate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustbench_lite import EvasionAttack, LossFn, Norm

SuccessFn = Callable[[Tensor, Tensor], Tensor]


def misclassified(logits: Tensor, label: Tensor) -> Tensor:
    """Untargeted success: the prediction differs from the true label."""
    return logits.argmax(dim=1) != label


def hits_target(logits: Tensor, target: Tensor) -> Tensor:
    """Targeted success: the prediction is the target class."""
    return logits.argmax(dim=1) == target


def projected_ascent(
    model: nn.Module,
    x: Tensor,
    label: Tensor,
    loss_fn: LossFn,
    *,
    norm: Norm,
    eps: float,
    step: float,
    steps: int,
    x_start: Tensor,
    success: SuccessFn = misclassified,
) -> tuple[Tensor, Tensor]:
    """Run ``steps`` ascent steps on ``loss_fn(logits, label)``; return ``(x_adv, succeeded)``.

    ``succeeded`` marks points whose returned iterate was seen to succeed at some evaluated
    step (the last iterate is returned unevaluated for the others).
    """
    geo = norm.geometry
    out = x_start.clone()
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    active = torch.arange(x.shape[0], device=x.device)
    x_a, lab_a, adv_a = x, label, x_start
    for _ in range(steps):
        logits, _, grad = EvasionAttack.loss_grad(model, adv_a, lab_a, loss_fn)
        hit = success(logits, lab_a)
        if hit.any():
            done = active[hit]
            out[done] = adv_a[hit]
            found[done] = True
            keep = ~hit
            active, x_a, lab_a, adv_a, grad = active[keep], x_a[keep], lab_a[keep], adv_a[keep], grad[keep]
            if active.numel() == 0:
                return out, found
        adv_a = geo.project(adv_a + step * geo.ascent(grad), x_a, eps)
    out[active] = adv_a
    return out, found
