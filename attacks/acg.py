"""ACG: Auto Conjugate Gradient attack (Yamamura et al., "Diversified adversarial attacks based on
conjugate gradient method", ICML 2022, arXiv 2206.09628, Algorithm 1).

APGD's skeleton (checkpoints ``⌈p_j N⌉``, ``ρ = 0.75``, ``η_0 = 2ε``, halving, best point kept)
without momentum; the step follows a conjugate direction ``s_k = g_k + β_k s_{k−1}``,
``x_{k+1} = Π(x_k + η_k·sign(s_k))``, with ``β_k = ⟨g_k, y⟩/⟨s_{k−1}, y⟩``, ``y = g_k − g_{k−1}``,
clamped to ``β ≥ 0`` with a guarded denominator (as in the authors' published code; the paper's text leaves
the sign convention of β open).  A halving moves to ``x_max`` with the gradient
and direction stored there.  See :mod:`robustbench_lite.attacks._apgd`.

Losses: ``ce`` (the default, as in the paper's comparison with APGD-CE), ``dlr``, and ``cw``
(the authors' own configuration, margin ``max_{i≠y} Z_i − Z_y``; the ``full`` preset runs ACG
with it, because APGD already covers CE and a different loss finds different points).  The
first run starts at the centre of the ball (``x`` itself); restarts start uniformly in it.
Linf only.  The Diversity Index lives in :mod:`robustbench_lite.eval.diversity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_lite import EvasionAttack, Norm, ops, register_attack, setting

from ._apgd import auto_search

LOSSES = {"cw": ops.cw_loss, "ce": ops.ce, "dlr": ops.dlr}


@register_attack("acg")
@dataclass(frozen=True, kw_only=True)
class ACG(EvasionAttack):
    """Auto Conjugate Gradient, Linf.  Defaults: CE loss, 100 iterations, 1 restart."""

    norms = (Norm.LINF,)
    steps: int = setting(100, low=1)
    restarts: int = setting(1, low=1)
    rho: float = setting(0.75, low=0.0, high=1.0)
    loss: str = setting("ce", choices=tuple(LOSSES))

    @property
    def grad_budget(self) -> float:
        return float((self.steps + 1) * self.restarts)

    def _perturb(self, model, x, y, target, gen):
        out = x.clone()
        todo = torch.arange(x.shape[0], device=x.device)
        for r in range(self.restarts):
            xs, ys = x[todo], y[todo]
            start = xs.clone() if r == 0 else self.geometry.random_start(xs, self.eps, gen)
            res = auto_search(
                model, xs, ys, LOSSES[self.loss], norm=self.norm, eps=self.eps, steps=self.steps,
                x_start=start, method="acg", rho=self.rho,
            )
            out[todo] = res.x_adv
            todo = todo[~res.found]
            if todo.numel() == 0:
                break
        return out
