"""Inner maximization for adversarial training, shared by the defenses (pure functions).

Every function returns a *detached* point: by Danskin's theorem the gradient of
``max_δ L(θ, x + δ)`` w.r.t. θ is the gradient of ``L`` at the maximizer, so the defense
backpropagates its loss at the returned point and never through the search (Madry et al. 2018).

* :func:`maximize` — projected sign ascent (Linf) on any per-sample loss of the logits, with a
  uniform random start (Madry; FGSM-RS with one step of 1.25·ε, Wong et al. 2020), a small
  Gaussian start (TRADES' ``x + 0.001·N(0, I)``) or none.
* :func:`vat_direction` — one or more power iterations for VAT's ``r_adv`` (Miyato et al. 2018).
* :func:`local_linearity_error` — ELLE's ``E_lin`` on uniform points of the ball (Rocamora et al. 2024).

The search runs with the model in ``eval()`` by default (BatchNorm uses running statistics and
is not updated by adversarial batches); ``train_mode=True`` searches in train mode as Madry did,
with BatchNorm momentum set to 0 so the search still leaves the running statistics untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustbench_lite import Defense, Norm, TrainState, ops, setting

LogitLoss = Callable[[Tensor], Tensor]  # logits -> per-sample loss to maximize
STARTS = ("uniform", "gaussian", "none")


@contextmanager
def frozen_bn(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep their running statistics (momentum 0) inside the block."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in saved:
            m.momentum = mom


@contextmanager
def search_mode(model: nn.Module, train_mode: bool = False) -> Iterator[None]:
    """Put ``model`` in the mode the inner search runs in; restore every module's flag after."""
    flags = [m.training for m in model.modules()]
    model.train(train_mode)
    try:
        with frozen_bn(model):
            yield
    finally:
        for m, flag in zip(model.modules(), flags, strict=True):
            m.training = flag


def start_point(x: Tensor, eps: float, start: str, gen: torch.Generator) -> Tensor:
    """The search's first point inside the Linf ``eps`` ball ∩ [0, 1]."""
    if start == "uniform":
        return Norm.LINF.geometry.random_start(x, eps, gen)
    if start == "gaussian":
        noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
        return Norm.LINF.geometry.project(x + 1e-3 * noise, x, eps)
    if start == "none":
        return x.clone()
    raise ValueError(f"start must be one of {STARTS}, got {start!r}")


def maximize(
    model: nn.Module,
    x: Tensor,
    loss_fn: LogitLoss,
    *,
    eps: float,
    step: float,
    steps: int,
    gen: torch.Generator,
    start: str = "uniform",
    train_mode: bool = False,
) -> Tensor:
    """``steps`` projected sign-ascent steps on ``loss_fn(model(x'))`` in the Linf ball; detached."""
    x = x.detach()
    x_adv = start_point(x, eps, start, gen)
    with search_mode(model, train_mode):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(loss_fn(model(x_adv)).sum(), x_adv)
            x_adv = Norm.LINF.geometry.project(x_adv.detach() + step * grad.sign(), x, eps)
    return x_adv.detach()


def vat_direction(
    model: nn.Module,
    x: Tensor,
    logits_clean: Tensor,
    *,
    xi: float,
    eps: float,
    gen: torch.Generator,
    power_iterations: int = 1,
) -> Tensor:
    """VAT's ``r_adv = ε · g/‖g‖₂`` (Miyato et al. 2018, eq. 12–13): ``d`` random unit, then
    ``g = ∇_r KL(p(·|x) ‖ p(·|x + r))`` at ``r = ξ·d``, ``d ← g/‖g‖₂``, repeated; detached.

    ``p(·|x)`` is detached.  Runs in the model's current mode with BatchNorm frozen.
    """
    p_logits = logits_clean.detach()
    d = ops.normalize_l2(torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device))
    with frozen_bn(model):
        for _ in range(power_iterations):
            r = (xi * d).requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(ops.kl_div(p_logits, model(x.detach() + r)).sum(), r)
            d = ops.normalize_l2(g.detach())
    return (eps * d).detach()


def ball_samples(x: Tensor, eps: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ELLE's triplet: ``x_a, x_b ~ U(B∞(x, ε)) ∩ [0, 1]``, ``α ~ U[0, 1]`` per point and
    ``x_c = (1 − α) x_a + α x_b``; returns ``(x_a, x_b, x_c, α)``."""
    x_a = Norm.LINF.geometry.random_start(x, eps, gen)
    x_b = Norm.LINF.geometry.random_start(x, eps, gen)
    alpha = torch.rand(x.shape[0], generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
    a = ops.per_sample(alpha, x)
    return x_a, x_b, (1 - a) * x_a + a * x_b, alpha


def local_linearity_error(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, gen: torch.Generator, loss: Callable = ops.ce
) -> Tensor:
    """Per-sample ``(ℓ(x_c) − (1 − α) ℓ(x_a) − α ℓ(x_b))²`` (Rocamora et al. 2024, eq. 5); the
    mean over the batch is ``E_lin``.  Differentiable in the model's parameters (one forward of
    the three points together, no double backprop)."""
    x_a, x_b, x_c, alpha = ball_samples(x.detach(), eps, gen)
    n = x.shape[0]
    losses = loss(model(torch.cat([x_a, x_b, x_c])), y.repeat(3))
    l_a, l_b, l_c = losses[:n], losses[n : 2 * n], losses[2 * n :]
    return (l_c - (1 - alpha) * l_a - alpha * l_b) ** 2


@dataclass(frozen=True, kw_only=True)
class AdversarialDefense(Defense):
    """Settings of the Linf inner search shared by PGD-AT, TRADES, MART and ARoW.

    ``step = 0`` means ``2.5 · eps / steps`` (Madry's rule); ``attack_mode`` is the mode the
    model is in during the search (``eval``: BatchNorm uses running statistics; ``train``: as
    Madry et al.; the search never updates running statistics either way).
    """

    eps: float = setting(0.1, low=0.0, low_open=True, high=1.0)
    steps: int = setting(10, low=1)
    step: float = setting(0.0, low=0.0)
    start: str = setting("uniform", choices=("uniform", "gaussian", "none"))
    attack_mode: str = setting("eval", choices=("eval", "train"))

    @property
    def step_size(self) -> float:
        return self.step or 2.5 * self.eps / self.steps

    def adversarial(self, model: nn.Module, x: Tensor, loss_fn, state: TrainState) -> Tensor:
        """The detached maximizer of ``loss_fn(model(x'))`` over the ball (:func:`maximize`)."""
        return maximize(
            model, x, loss_fn, eps=self.eps, step=self.step_size, steps=self.steps, gen=self.generator(state),
            start=self.start, train_mode=self.attack_mode == "train",
        )
