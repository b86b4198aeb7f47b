"""Minimum-norm APGD: APGD (Croce & Hein, ICML 2020, Algorithm 1) inside a per-point bisection
on eps, the way AttackBench (Cinà et al., AAAI 2025, arXiv 2404.19460) turns a
fixed-budget attack into a minimum-norm one.

Each point first gets APGD at the full budget ``eps``.  A point broken there has its smallest
adversarial size in ``(0, ‖δ‖]``; ``search_steps`` bisection steps then halve that bracket: APGD at
the bracket's middle, the upper end moves down on success (and the example is kept when it is
smaller than the best so far), the lower end moves up on failure.  The bracket ends are dyadic
fractions of ``eps`` (``eps·k/2^S``), so the points that share a middle run as one batch (at most
``2^(s-1)`` batches at step ``s``).  The search assumes success is monotone in eps, which holds
for the exact minimum and nearly so for APGD; its answers are only ever real examples.

Minimum-norm attack: like ``cw-l2``, the run returns each point's smallest example when it lies
within ``eps`` (every example found here does) and ``AttackOutput.distances`` holds its size
(``inf`` where APGD found nothing at ``eps``, 0 for points misclassified already).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustbench_lite import EvasionAttack, create_attack, register_attack, setting

_LOSSES = {"ce": "apgd-ce", "dlr": "apgd-dlr"}


@register_attack("apgd-mn")
@dataclass(frozen=True, kw_only=True)
class APGDMinNorm(EvasionAttack):
    """APGD (CE or DLR loss) with a per-point bisection on eps: each point's smallest example."""

    min_norm: ClassVar[bool] = True
    loss: str = setting("ce", choices=tuple(_LOSSES))
    steps: int = setting(50, low=1)
    search_steps: int = setting(6, low=0)

    @property
    def grad_budget(self) -> float:
        return float((self.steps + 1) * (1 + self.search_steps))

    def _apgd(self, eps: float):
        return create_attack(_LOSSES[self.loss], norm=self.norm, eps=eps, steps=self.steps, seed=self.seed)

    def _probe(self, model, x, y, eps, gen):
        """APGD at ``eps`` on ``(x, y)``: its examples, which of them are adversarial, their sizes."""
        adv = self._apgd(eps)._perturb(model, x, y, None, gen)
        fooled = model(adv).argmax(dim=1) != y
        return adv, fooled, self.geometry.distance(adv - x)

    def _perturb(self, model, x, y, target, gen):
        b = x.shape[0]
        scale = 2**self.search_steps  # bracket ends are integers k: eps * k / scale
        best_d = torch.full((b,), float("inf"), device=x.device, dtype=x.dtype)
        best_x = x.clone()
        misclassified = model(x).argmax(dim=1) != y
        best_d[misclassified] = 0.0
        todo = (~misclassified).nonzero().flatten()
        if todo.numel():
            adv, fooled, size = self._probe(model, x[todo], y[todo], self.eps, gen)
            hit = todo[fooled]
            best_x[hit], best_d[hit] = adv[fooled], size[fooled].clamp(max=self.eps)
        lo = torch.zeros(b, dtype=torch.long, device=x.device)
        hi = torch.full((b,), scale, dtype=torch.long, device=x.device)
        active = torch.isfinite(best_d) & (best_d > 0)
        for _ in range(self.search_steps):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            # start from the example's own size when it is below the bracket's top
            top = torch.minimum(hi[idx], torch.ceil(best_d[idx] / self.eps * scale).long().clamp(min=1))
            hi[idx] = top
            mid = (lo[idx] + hi[idx]) // 2
            for k in mid.unique().tolist():
                sel = idx[mid == k]
                if k == 0:  # nothing below the bracket's resolution
                    active[sel] = False
                    continue
                adv, fooled, size = self._probe(model, x[sel], y[sel], self.eps * k / scale, gen)
                win, lose = sel[fooled], sel[~fooled]
                better = size[fooled] < best_d[win]
                best_x[win[better]] = adv[fooled][better]
                best_d[win[better]] = size[fooled][better]
                hi[win] = k
                lo[lose] = k
            active &= (hi - lo) > 1
        return best_x, best_d
