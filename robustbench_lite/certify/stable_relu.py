"""The fixed-pattern certificate of a one-hidden-layer ReLU network without biases (the
architecture of the convex training programs: Pilanci & Ergen 2020; Bai, Gautam & Sojoudi 2022).

When every hidden neuron keeps its sign over the Linf ball, ``|w_jᵀx| ≥ ε‖w_j‖₁``, the network is
linear there, and the worst case of each margin is exact:
``min_δ (f_y − f_c)(x + δ) = (f_y − f_c)(x) − ε‖∇(f_y − f_c)‖₁``.  Points with an unstable neuron get
``−inf`` (not certified).  Sound: the box [0, 1] is ignored, which only enlarges the set searched.
Computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.threat import Norm
from . import Verifier, register_verifier


def one_hidden_layer(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two bias-free ``nn.Linear`` layers of a one-hidden-layer ReLU network."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    others = [m for m in model.modules() if not isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten, nn.Sequential))]
    if len(layers) != 2 or any(lay.bias is not None for lay in layers) or others:
        raise ValueError(
            "the stable-relu certificate needs a one-hidden-layer ReLU network without biases "
            "(Flatten, Linear, ReLU, Linear; the zoo's 'one-hidden-relu'); use another verifier for other models"
        )
    return layers[0], layers[1]


@register_verifier("stable-relu")
@dataclass(frozen=True, kw_only=True)
class StableReLU(Verifier):
    """Exact margins where every hidden neuron is stable over the Linf ball (one-hidden-relu only)."""

    norms = (Norm.LINF,)

    def _bounds(self, model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: Tensor) -> Tensor:
        first, second = one_hidden_layer(model)
        w1, w2 = first.weight.double(), second.weight.double()
        eps = eps.to(w1.device, torch.float64)[:, None]  # [n, 1]: per-point radii
        z = x.flatten(1).double().to(w1.device) @ w1.T  # [n, h]
        radius = eps * w1.abs().sum(1)  # [n, h]
        fixed = ((z - radius >= 0) | (z + radius <= 0)).all(1)
        active = (z > 0).double()
        logits = z.clamp_min(0) @ w2.T  # [n, K]
        y = y.to(w1.device)
        diff = w2[y][:, None, :] - w2[None, :, :]  # [n, K, h]: f_y - f_c in the hidden space
        grads = torch.einsum("nch,nh,hd->ncd", diff, active, w1)
        worst = logits.gather(1, y[:, None]) - logits - eps * grads.abs().sum(-1)
        return torch.where(fixed[:, None], worst, torch.full_like(worst, float("-inf")))
