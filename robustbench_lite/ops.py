"""Pure tensor functions: losses, norms, projections and random starts.

Every function here is stateless, works per sample on a batch (first dimension) and takes any
randomness as an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .threat import Norm

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
# norms and projections
# ---------------------------------------------------------------------------------------------


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def lp_norm(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample norm of a perturbation: Linf, L2, or L0 (number of changed pixels)."""
    flat = delta.flatten(1)
    if norm is Norm.LINF:
        return flat.abs().amax(dim=1)
    if norm is Norm.L2:
        return flat.norm(p=2, dim=1)
    if norm is Norm.L0:
        # pixels = spatial positions; a pixel counts once however many channels changed
        return (delta.abs().amax(dim=1) > 0).flatten(1).sum(dim=1).to(delta.dtype)
    raise ValueError(f"unsupported norm {norm!r}")


def normalize_l2(g: Tensor, tiny: float = 1e-12) -> Tensor:
    """``g / ||g||_2`` per sample (zero where ``g`` is zero)."""
    return g / _view(g.flatten(1).norm(p=2, dim=1).clamp_min(tiny), g)


def project_linf(delta: Tensor, eps: float) -> Tensor:
    """Clamp every coordinate of ``delta`` to ``[-eps, eps]``."""
    return delta.clamp(-eps, eps)


def project_l2(delta: Tensor, eps: float) -> Tensor:
    """``delta * min(1, eps / ||delta||_2)`` per sample."""
    norms = delta.flatten(1).norm(p=2, dim=1)
    factor = (eps / norms.clamp_min(1e-12)).clamp(max=1.0)
    return delta * _view(factor, delta)


def project_ball(delta: Tensor, norm: Norm, eps: float) -> Tensor:
    """Project a perturbation onto the Linf or L2 ball of radius ``eps`` (no box)."""
    if norm is Norm.LINF:
        return project_linf(delta, eps)
    if norm is Norm.L2:
        return project_l2(delta, eps)
    raise ValueError(f"project_ball supports Linf and L2, not {norm}")


def predictions(model, x: Tensor, chunk: int = 1000) -> Tensor:
    """``argmax`` of ``model`` over ``x`` in chunks of ``chunk`` images (call under ``no_grad``)."""
    return torch.cat([model(x[i : i + chunk]).argmax(1) for i in range(0, len(x), chunk)])


def project(x_adv: Tensor, x: Tensor, norm: Norm, eps: float) -> Tensor:
    """Project ``x_adv`` onto the ``eps`` ball around ``x`` intersected with the box [0, 1].

    For Linf the result is the exact Euclidean projection.  For L2 it projects onto the ball and
    then clips to the box, which stays inside both sets (clipping toward ``x`` never increases
    the distance to ``x``).
    """
    if norm is Norm.LINF:
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    if norm is Norm.L2:
        return (x + project_l2(x_adv - x, eps)).clamp_(0.0, 1.0)
    raise ValueError(f"project supports Linf and L2, not {norm}")


def random_start(x: Tensor, norm: Norm, eps: float, gen: torch.Generator) -> Tensor:
    """A random point of the ``eps`` ball around ``x``, clipped to [0, 1].

    Linf: ``x + U(-eps, eps)`` per coordinate (Madry et al. 2018).  L2: a uniform random
    direction at radius ``eps * u``, ``u ~ U(0, 1)``.  (A volume-uniform radius ``eps * u^(1/d)``
    puts nearly every start on the sphere in high dimension; on Fashion-MNIST that cost PGD-L2
    about 0.01 robust accuracy at 10-20 steps, so we spread starts over the radius instead.)
    """
    if norm is Norm.LINF:
        noise = torch.rand(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
        return (x + (2 * noise - 1) * eps).clamp_(0.0, 1.0)
    if norm is Norm.L2:
        direction = normalize_l2(torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype))
        radius = torch.rand(x.shape[0], generator=gen, device=gen.device, dtype=x.dtype)
        delta = direction * _view(radius * eps, x)
        return (x + delta.to(x.device)).clamp_(0.0, 1.0)
    raise ValueError(f"random_start supports Linf and L2, not {norm}")


def ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """Steepest-ascent direction of unit norm: ``sign(g)`` for Linf, ``g / ||g||_2`` for L2."""
    if norm is Norm.LINF:
        return grad.sign()
    if norm is Norm.L2:
        return normalize_l2(grad)
    raise ValueError(f"ascent_direction supports Linf and L2, not {norm}")
