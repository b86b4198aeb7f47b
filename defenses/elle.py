"""ELLE: efficient local linearity regularization (Rocamora, Liu, Chrysos, Olmos & Cevher,
"Efficient local linearity regularization to overcome catastrophic overfitting", CVPR 2024).

Loss (eq. 6): ``CE(f(x_adv), y) + λ · E_lin`` with ``x_adv`` a single-step FGSM-RS point (step
``alpha · ε``) and ``E_lin = E[(ℓ(x_c) − (1 − a) ℓ(x_a) − a ℓ(x_b))²]`` (eq. 5), ``x_a, x_b ~
U(B∞(x, ε))``, ``a ~ U[0, 1]``, ``x_c = (1 − a) x_a + a x_b``, ℓ the per-sample CE.  No double
backpropagation: E_lin costs three forward passes.  λ = 1000 is the paper's CIFAR-10 value for
ε ≤ 8/255; the sampled points are clipped to [0, 1] (so they stay valid images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from robustbench_lite import Defense, ops, register_defense, setting

from ._inner_max import local_linearity_error, maximize


@register_defense("elle")
@dataclass(frozen=True, kw_only=True)
class ELLE(Defense):
    """FGSM-RS cross-entropy + ``lam`` · E_lin."""

    eps: float = setting(0.1, low=0.0, low_open=True, high=1.0)
    alpha: float = setting(1.25, low=0.0, low_open=True)  # FGSM-RS step as a multiple of eps
    lam: float = setting(1000.0, low=0.0)

    def adversarial_ce(self, model, x, y, state):
        x_adv = maximize(
            model, x, lambda logits: ops.ce(logits, y), eps=self.eps, step=self.alpha * self.eps, steps=1,
            gen=self.generator(state), start="uniform",
        )
        return F.cross_entropy(model(x_adv), y)

    def e_lin(self, model, x, y, state):
        e = local_linearity_error(model, x, y, eps=self.eps, gen=self.generator(state)).mean()
        _running_mean(state, "e_lin", float(e.detach()))
        return e

    def regularization_weight(self, e_lin: float, state) -> float:
        return self.lam

    def batch_loss(self, model, x, y, state):
        e = self.e_lin(model, x, y, state)
        lam = self.regularization_weight(float(e.detach()), state)
        return self.adversarial_ce(model, x, y, state) + lam * e


def _running_mean(state, key: str, value: float) -> None:
    """Keep the epoch's mean of ``value`` in ``state.metrics[key]`` (reset by the loop each epoch)."""
    n = state.extra.get(f"{key}_n", 0) if state.extra.get(f"{key}_epoch") == state.epoch else 0
    mean = state.metrics.get(key, 0.0) if n else 0.0
    state.metrics[key] = mean + (value - mean) / (n + 1)
    state.extra[f"{key}_n"], state.extra[f"{key}_epoch"] = n + 1, state.epoch
