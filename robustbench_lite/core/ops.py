"""Pure tensor functions: losses and small batch helpers.

Every function here is stateless, works per sample on a batch (first dimension) and takes any
randomness as an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# losses (per sample, shape [B]; larger = more adversarial unless stated otherwise)
# ---------------------------------------------------------------------------------------------


def ce(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per sample."""
    return F.cross_entropy(logits, y, reduction="none")


def max_other(logits: Tensor, y: Tensor) -> Tensor:
    """Largest logit among the classes other than ``y``.

    The true class is masked with ``-inf`` (multiplying by ``1 - onehot`` would be wrong for
    negative logits, Carlini & Wagner 2017).
    """
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.amax(dim=1)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``Z_y - max_{i != y} Z_i``: positive when the point is classified as ``y``."""
    return logits.gather(1, y[:, None]).squeeze(1) - max_other(logits, y)


def cw_loss(logits: Tensor, y: Tensor, kappa: float = float("inf")) -> Tensor:
    """Carlini-Wagner margin loss to maximize: ``min(max_{i != y} Z_i - Z_y, kappa)``."""
    return torch.clamp(-margin(logits, y), max=kappa)


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein, ICML 2020, eq. 6), to maximize.

    ``-(Z_y - max_{i != y} Z_i) / (Z_pi1 - Z_pi3 + 1e-12)``; invariant to shifting and positive
    scaling of the logits, so softmax saturation does not hide its gradient.
    """
    top = logits.sort(dim=1, descending=True).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR (Croce & Hein 2020): ``-(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2)``."""
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def kl_div(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p || q)`` per sample between the softmax distributions of two logit batches."""
    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# helpers that do not depend on a norm (norm-dependent operations live in ``Norm.X.geometry``)
# ---------------------------------------------------------------------------------------------


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample vector ``v`` shaped to broadcast against a batch like ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def normalize_l2(g: Tensor, tiny: float = 1e-12) -> Tensor:
    """``g / ||g||_2`` per sample (zero where ``g`` is zero)."""
    return g / per_sample(g.flatten(1).norm(p=2, dim=1).clamp_min(tiny), g)


def predictions(model, x: Tensor, chunk: int = 1000) -> Tensor:
    """``argmax`` of ``model`` over ``x`` in chunks of ``chunk`` images (call under ``no_grad``)."""
    return torch.cat([model(x[i : i + chunk]).argmax(1) for i in range(0, len(x), chunk)])
