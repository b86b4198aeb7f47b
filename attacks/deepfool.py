"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool
deep neural networks", CVPR 2016, Algorithm 2, multi-class, in L2 and Linf).

At the current iterate ``x_i`` the classifier is linearised: for each candidate class ``k ≠ y``,
``f'_k = Z_k − Z_y`` and ``w'_k = ∇Z_k − ∇Z_y``.  The closest linearised boundary is
``l = argmin_k |f'_k| / ‖w'_k‖_*`` (the dual norm: L2 for L2, L1 for Linf), and the smallest step
onto it is ``r_i = (|f'_l| + 1e-4) / ‖w'_l‖_* · d_l`` with ``d_l`` the norm's steepest-ascent
direction of unit size (``w'/‖w'‖₂`` for L2, ``sign(w')`` for Linf: the paper's
``|w'|^{q−1} ⊙ sign(w')`` scaled).  The next iterate is ``x_{i+1} = clip(x_i + (1 + η) r_i)`` with
the overshoot η = 0.02: the authors' ``x + (1 + η) Σ r_i``, with the box [0, 1] applied at every
step.  A point stops at its first adversarial iterate, or after ``steps`` steps.  An iterate counts
as adversarial only when its margin ``Z_y − max_{k≠y} Z_k`` is below ``−1e-5 · max(1, max_k |Z_k|)``:
without overshoot a step lands 1e-4 past the linearised boundary, within float32 rounding of large
logits, and such an example can be classified correctly when the model sees it in another batch;
a point short of that margin steps on (each step moves it at least 1e-4 further).

``candidates`` is the number of classes considered, those with the largest logits at ``x`` (the
authors' code's ``num_classes``, 10); each step costs one gradient per candidate other than the
label.

Minimum-norm attack: the run returns each point's adversarial iterate when it lies within
``eps``, else ``x``, and ``AttackOutput.distances`` holds its size (``inf`` where DeepFool did not
cross the boundary; 0 for points misclassified already).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustbench_lite import EvasionAttack, Norm, ops, register_attack, setting

from ._min_norm import Smallest


def misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Misclassified by a margin that float32 rounding of the logits cannot undo (module docstring)."""
    return ops.margin(logits, y) < -1e-5 * logits.abs().amax(dim=1).clamp_min(1.0)


@register_attack("deepfool")
@dataclass(frozen=True, kw_only=True)
class DeepFool(EvasionAttack):
    """DeepFool (untargeted): iterated steps to the closest linearised boundary, with overshoot."""

    norms = (Norm.L2, Norm.LINF)
    min_norm: ClassVar[bool] = True
    steps: int = setting(50, low=1)
    overshoot: float = setting(0.02, low=0.0)
    candidates: int = setting(10, low=2)

    @property
    def grad_budget(self) -> float:
        return float(self.steps * (self.candidates - 1))

    def _perturb(self, model, x, y, target, gen):
        geo = self.geometry
        track = Smallest(x, geo)
        logits = model(x)
        k = min(self.candidates, logits.shape[1])
        # the candidate classes: the label first, then the largest other logits at x
        ranked = logits.scatter(1, y[:, None], float("inf")).argsort(dim=1, descending=True)[:, :k]
        adv = misclassified(logits, y)
        track.offer(None, x, adv)
        idx = (~adv).nonzero().flatten()
        point = x.clone()
        for _ in range(self.steps):
            if idx.numel() == 0:
                break
            xi, classes = point[idx], ranked[idx]
            logits, w = self._differences(model, xi, classes)
            adv = misclassified(logits, y[idx])
            track.offer(idx, xi, adv)
            keep = ~adv
            idx, logits, w, classes = idx[keep], logits[keep], w[keep], classes[keep]
            if idx.numel() == 0:
                break
            z = logits.gather(1, classes)  # [n, k], column 0 is the label
            f = z[:, 1:] - z[:, :1]
            n, m = w.shape[:2]
            dual = geo.dual_norm(w.reshape(n * m, -1)).view(n, m).clamp_min(1e-12)
            dist = f.abs() / dual
            best = dist.argmin(dim=1)
            pick = torch.arange(n, device=x.device)
            w_l = w[pick, best]
            step = geo.ascent(w_l) * ops.per_sample((f[pick, best].abs() + 1e-4) / dual[pick, best], w_l)
            point[idx] = (point[idx] + (1 + self.overshoot) * step).clamp(0.0, 1.0)
        if idx.numel():
            track.offer(idx, point[idx], misclassified(model(point[idx]), y[idx]))
        return track.result(self.eps)

    @staticmethod
    def _differences(model, x, classes):
        """Logits at ``x`` and ``w'_k = ∇(Z_k − Z_y)`` for the candidate classes after the label
        (column 0 of ``classes``): one backward pass each, shape ``[n, k − 1, *x.shape[1:]]``."""
        x = x.detach().requires_grad_(True)
        rows = []
        with torch.enable_grad():
            logits = model(x)
            picked = logits.gather(1, classes)
            last = classes.shape[1] - 1
            for j in range(1, last + 1):
                (g,) = torch.autograd.grad((picked[:, j] - picked[:, 0]).sum(), x, retain_graph=j < last)
                rows.append(g)
        return logits.detach(), torch.stack(rows, dim=1)
