"""UAP: universal adversarial perturbations (Moosavi-Dezfooli, Fawzi, Fawzi, Frossard, CVPR 2017).

Algorithm 1 of the paper: start from ``v = 0`` and sweep the attacker's points in a random order;
for every point ``x`` with ``k(x + v) = k(x)`` take the minimal L2 perturbation ``Δv`` that sends
``x + v`` across the decision boundary (DeepFool, Moosavi-Dezfooli et al. 2016, eq. 6-7 with
overshoot) and update ``v ← P_{p,ξ}(v + Δv)`` (projection onto the Linf or L2 ball of radius
``ξ = eps``).  Stop when the fooling rate on the attacker's set reaches ``1 − δ`` or after
``passes`` sweeps.  Fooling is measured against the clean prediction ``k(x)``.

Changed from the paper (for speed, and said so): DeepFool steps are computed for ``batch_size``
points at once at the same ``v`` and then added to ``v`` one after another, each followed by the
projection; ``batch_size=1`` is the paper's exact sequential sweep.  Inputs are ``clip(x + v)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustbench_lite import UniversalAttack, apply_delta, ops, register_attack, setting


def deepfool(model: nn.Module, x: Tensor, label: Tensor, steps: int, overshoot: float) -> Tensor:
    """Batched multi-class DeepFool (L2): the perturbation ``r`` with ``k(x + r) != label``.

    Each step linearizes ``f_k = Z_k − Z_label`` and moves to the nearest linearized boundary,
    ``r_i = (|f_l| + 1e-4) / ||w_l||² · w_l`` with ``l = argmin_k |f_k| / ||w_k||``.  Points
    already fooled stop moving; the total is scaled by ``1 + overshoot``.
    """
    r_tot = torch.zeros_like(x)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(steps):
        xa = (x + (1 + overshoot) * r_tot).clamp(0, 1).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xa)
            n_cls = logits.shape[1]
            grads = torch.stack(
                [torch.autograd.grad(logits[:, k].sum(), xa, retain_graph=k < n_cls - 1)[0] for k in range(n_cls)], 1
            )  # [B, K, C, H, W]
        logits = logits.detach()
        active &= logits.argmax(1) == label
        if not active.any():
            break
        idx = torch.arange(x.shape[0], device=x.device)
        w = grads - grads[idx, label].unsqueeze(1)
        f = logits - logits[idx, label].unsqueeze(1)
        w_norm = w.flatten(2).norm(dim=2) + 1e-8
        ratio = f.abs() / w_norm
        ratio[idx, label] = float("inf")
        best = ratio.argmin(1)
        w_best = w[idx, best]
        step = (f[idx, best].abs() + 1e-4) / w_norm[idx, best] ** 2
        r = step.view(-1, 1, 1, 1) * w_best
        r_tot = r_tot + r * active.view(-1, 1, 1, 1)
    return (1 + overshoot) * r_tot


@register_attack("uap")
@dataclass(frozen=True, kw_only=True)
class UAP(UniversalAttack):
    """Universal perturbation by DeepFool steps and projection (Linf or L2 ball of radius eps)."""

    passes: int = setting(5, low=1)
    delta: float = setting(0.2, low=0.0, high=1.0)  # stop once the fooling rate reaches 1 - delta
    df_steps: int = setting(10, low=1)
    overshoot: float = setting(0.02, low=0.0)
    batch_size: int = setting(16, low=1)

    @property
    def grad_budget(self) -> float:
        return float(self.passes * self.df_steps * 10)

    def _project(self, v: Tensor) -> Tensor:
        return self.geometry.project_ball(v, self.eps)

    def _fit(self, model, x, y, gen):
        clean = ops.predictions(model, x)
        v = torch.zeros_like(x[:1])
        for _ in range(self.passes):
            order = torch.randperm(len(x), generator=gen, device=gen.device).to(x.device)
            for i in range(0, len(x), self.batch_size):
                sel = order[i : i + self.batch_size]
                xs = apply_delta(x[sel], v)
                keep = model(xs).argmax(1) == clean[sel]
                if not keep.any():
                    continue
                r = deepfool(model, xs[keep], clean[sel][keep], self.df_steps, self.overshoot)
                for dv in r:
                    v = self._project(v + dv.unsqueeze(0))
            fooled = ops.predictions(model, apply_delta(x, v)) != clean
            if float(fooled.float().mean()) >= 1 - self.delta:
                break
        return v
