"""Counterexamples for the complete verifier: a projected-gradient search in the Linf ball and
the check every claimed adversarial example passes.

A point is falsified only with a concrete example ``x'`` that

* lies in the ball ∩ [0, 1] exactly: ``x'`` is a float32 tensor (what the model is fed) and
  ``|x' − x| ≤ eps``, ``0 ≤ x' ≤ 1`` hold in float64 arithmetic on the stored values;
* is misclassified by forward passes of the real model (not the parsed graph) in float32 *and*
  in float64: ``f_c(x') > f_y(x')`` for some ``c ≠ y`` in both.

The search is PGD (Madry et al., ICLR 2018) on the margin ``f_y − f_t`` towards a target class
(the specification being searched), with signed steps and random starts, started from given
points (the bound's minimisers, an evasion attack's examples).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def float32_box(x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The float32 box inside the ball ∩ [0, 1]: the smallest float32 values ``≥ max(0, x − eps)``
    and the largest ``≤ min(1, x + eps)`` (``x``: ``[B, ...]``, ``eps``: ``[B]``)."""
    e = eps.to(torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
    lo64, hi64 = (x.double() - e).clamp(min=0.0), (x.double() + e).clamp(max=1.0)
    lo, hi = lo64.float(), hi64.float()
    lo = torch.where(lo.double() < lo64, torch.nextafter(lo, torch.full_like(lo, 2.0)), lo)
    hi = torch.where(hi.double() > hi64, torch.nextafter(hi, torch.full_like(hi, -1.0)), hi)
    return lo, hi


class Checker:
    """Float32 and float64 copies of a model (eval mode) that re-check candidate examples."""

    def __init__(self, model: nn.Module) -> None:
        self.m32 = copy.deepcopy(model).float().eval()
        self.m64 = copy.deepcopy(model).double().eval()

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Float32 logits (the search's objective)."""
        return self.m32(x.float())

    @torch.no_grad()
    def check(self, x: Tensor, y: Tensor, eps: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """``(ok [B] bool, examples [B, ...] float32)``: each candidate clipped into the float32
        box of its point's ball, and whether it is a verified counterexample (see module doc)."""
        lo, hi = float32_box(x, eps)
        ex = torch.minimum(torch.maximum(cand.float(), lo), hi)
        e = eps.to(torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
        inside = ((ex.double() - x.double()).abs() <= e).flatten(1).all(1) & (ex >= 0).flatten(1).all(1) \
            & (ex <= 1).flatten(1).all(1) & (lo <= hi).flatten(1).all(1)
        wrong = _misclassified(self.m32(ex), y) & _misclassified(self.m64(ex.double()), y)
        return inside & wrong, ex


def _misclassified(logits: Tensor, y: Tensor) -> Tensor:
    own = logits.gather(1, y[:, None])
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(1) > own[:, 0]


def pgd_targeted(
    checker: Checker, x: Tensor, y: Tensor, target: Tensor, eps: Tensor, starts: Tensor,
    steps: int, gen: torch.Generator,
) -> Tensor:
    """PGD on ``f_y − f_target`` (minimised) in the float32 box of each ball, from ``starts``
    (``[B, ...]``; NaN rows: a random start); returns the final iterates (float32).  The step
    size decays from ``eps/2`` to ``eps/40`` (a cosine schedule), a choice for short runs."""
    lo, hi = float32_box(x, eps)
    cur = starts.float()
    if bool(torch.isnan(cur).any()):
        noise = lo + (hi - lo) * torch.rand(lo.shape, generator=gen, device=gen.device).to(lo.device)
        cur = torch.where(torch.isnan(cur), noise, cur)
    cur = torch.minimum(torch.maximum(cur, lo), hi)
    e = eps.float().reshape(-1, *([1] * (x.dim() - 1)))
    best, best_val = cur.clone(), torch.full((x.shape[0],), float("inf"), device=x.device)
    for i in range(steps + 1):
        cur = cur.detach().requires_grad_(True)
        with torch.enable_grad():
            out = checker.m32(cur)
            margin = out.gather(1, y[:, None])[:, 0] - out.gather(1, target[:, None])[:, 0]
            grad = torch.autograd.grad(margin.sum(), cur)[0] if i < steps else None
        better = margin.detach() < best_val
        best_val = torch.where(better, margin.detach(), best_val)
        best = torch.where(better.reshape(-1, *([1] * (x.dim() - 1))), cur.detach(), best)
        if grad is None:
            break
        step = e * (0.0125 + 0.2375 * (1 + torch.cos(torch.tensor(torch.pi * i / max(1, steps)))))
        cur = torch.minimum(torch.maximum(cur.detach() - step * grad.sign(), lo), hi)
    return best
