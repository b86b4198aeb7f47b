"""SGA: stochastic gradient aggregation for universal perturbations (Liu, Feng, Zhang, Hu, Zhuang,
"Enhancing generalization of universal adversarial perturbation through gradient aggregation",
ICCV 2023), following the authors' published code.

Per outer batch of ``batch_size`` (250) images: copy ``δ_in ← δ`` and take inner sign steps on
minibatches of ``minibatch`` (10) images, ``δ_in ← clip_ε(δ_in + α · sign g_j)``, collecting the
gradients ``g_j``; then one outer step ``δ ← clip_ε(δ + α · sign(mean_j g_j))`` (the aggregation
that reduces gradient noise and avoids the inner iterate's overfitting).  The loss is
``min(CE(f(clip(x + δ)), ŷ), β)`` with ``ŷ`` the clean prediction and ``β = 9`` (the bounded loss
of Shafahi et al., AAAI 2020); ``δ₀ = 0``, ``α = 0.1 · ε``, 20 epochs.

L2 (our extension, not in the paper): the sign steps become ``α · g / ||g||₂`` and ``clip_ε`` the
projection onto the L2 ball.  ``inner=False`` gives the baseline SGA beats: sign-SGD UAP with one
step per batch (Shafahi et al. 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_lite import UniversalAttack, ops, register_attack, setting


def bounded_ce_grad(model, x: Tensor, delta: Tensor, y: Tensor, beta: float) -> Tensor:
    """Gradient w.r.t. ``delta`` of ``mean min(CE(f(clip(x + delta)), y), beta)``."""
    d = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model((x + d).clamp(0, 1)), y, reduction="none").clamp(max=beta).mean()
        (g,) = torch.autograd.grad(loss, d)
    return g


@register_attack("sga")
@dataclass(frozen=True, kw_only=True)
class SGA(UniversalAttack):
    """Universal perturbation by stochastic gradient aggregation (Linf as in the paper, or L2)."""

    epochs: int = setting(20, low=1, high=10_000)
    batch_size: int = setting(250, low=1)
    minibatch: int = setting(10, low=1)
    step: float = setting(0.0, low=0.0)  # 0 means 0.1 * eps
    beta: float = setting(9.0, low=0.0, low_open=True)
    inner: bool = setting(True)

    @property
    def step_size(self) -> float:
        return self.step or 0.1 * self.eps

    @property
    def grad_budget(self) -> float:
        return float(self.epochs)

    def _ascend(self, d: Tensor, g: Tensor) -> Tensor:
        return self.geometry.project_ball(d + self.step_size * self.geometry.ascent(g), self.eps)

    def _fit(self, model, x, y, gen):
        pred = ops.predictions(model, x)
        delta = torch.zeros_like(x[:1])
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=gen, device=gen.device).to(x.device)
            for i in range(0, len(x), self.batch_size):
                sel = order[i : i + self.batch_size]
                if not self.inner:
                    delta = self._ascend(delta, bounded_ce_grad(model, x[sel], delta, pred[sel], self.beta))
                    continue
                d_in, total = delta.clone(), torch.zeros_like(delta)
                chunks = sel.split(self.minibatch)
                for j in chunks:
                    g = bounded_ce_grad(model, x[j], d_in, pred[j], self.beta)
                    total += g
                    d_in = self._ascend(d_in, g)
                delta = self._ascend(delta, total / len(chunks))
        return delta
