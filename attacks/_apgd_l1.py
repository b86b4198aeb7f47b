"""l1-APGD (Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on image
classifiers", ICML 2021): APGD's search for the threat model ``{x + δ : ‖δ‖₁ ≤ ε, x + δ ∈ [0, 1]^d}``.

What stays from APGD (Croce & Hein, ICML 2020, Algorithm 1): ``steps`` iterations from a random
start, the best point ``x_max`` kept, the checkpoints ``w_j = ⌈p_j N⌉`` and their two conditions
(the loss increased in fewer than ``ρ`` of the steps since the last checkpoint, or no restart there
and no progress since), which send a point back to ``x_max`` with its gradient.

What is new for L1:

* the projection ``Π`` is the exact Euclidean projection onto the L1 ball ∩ [0, 1] (the L1
  geometry's ``project``);
* the step is sparse, ``x_{k+1} = Π(x_k + η·s/‖s‖₁)`` with ``s = sign(∇)`` on the ``k`` largest
  ``|∇ᵢ|`` and 0 elsewhere, ranked only over coordinates that can still move in the ascent
  direction (a pixel at 0 with ``∇ᵢ < 0`` or at 1 with ``∇ᵢ > 0`` is left out; the authors'
  implementation ranks all coordinates and lets the box absorb those).  The steepest-ascent step
  of the L1 ball moves one coordinate, which the box soon stops; the steepest step of the
  ball ∩ box moves many, hence ``k`` at a time;
* the sparsity and the step length start at ``k₀ = 0.2·d`` coordinates and ``η₀ = ε`` (an L1
  length) and then follow the sparsity ``M = ‖x_max − x‖₀`` of the best point, updated every
  ``⌊0.04·N⌋`` iterations (at least 1): ``k = ⌈M / 1.5⌉``; ``η`` goes back to ``η₀`` when ``M`` fell
  below 0.95 of its last value (the search found a sparser region and explores it at full length)
  and is otherwise divided by 1.5, never below ``ε/10``.  The checkpoints therefore only restart;
  they do not halve ``η``;
* the step has no momentum term, as in the authors' implementation, so APGD's ``momentum``
  setting does not apply here;
* the start is sparse: the projection of ``x + N(0, I)`` onto the ball ∩ box
  (:func:`l1_apgd_start`), whose soft threshold keeps the few largest noise coordinates.  The
  authors' implementation takes its first ``k`` from its start's sparsity, which float32 residues
  make dense; ``k₀ = 0.2·d`` makes the dense first steps deliberate.

The constants are the fields of :class:`L1Schedule`.  Points that succeed leave the active batch
with their successful iterate; the others return ``x_max``.  Costs ``steps + 1`` gradients per point
at most, like APGD in the other norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustbench_lite import LossFn, Norm
from robustbench_lite.core.ops import per_sample

from ._apgd import ActiveSet, SearchResult, checkpoints, eot_loss_grad, restart_at_best, track_best
from ._ascent import SuccessFn, misclassified

_GEO = Norm.L1.geometry


@dataclass(frozen=True)
class L1Schedule:
    """The constants of l1-APGD's step length and sparsity (Croce & Hein 2021)."""

    step: float = 1.0  # η₀ = step·ε
    topk: float = 0.2  # k₀ = ⌈topk·d⌉ coordinates on the first steps
    every: float = 0.04  # k and η adapt every max(⌊every·N⌋, 1) iterations of N
    shrink: float = 1.5  # k = ⌈M / shrink⌉; η /= shrink while M does not fall
    sparser: float = 0.95  # "M fell": M < sparser · (its last value); then η = η₀
    min_step: float = 0.1  # η ≥ min_step · η₀


def l1_apgd_start(x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    """A random sparse start: the exact projection of ``x + t``, ``t ~ N(0, I)``, onto the L1 ball ∩
    [0, 1] (on the sphere unless the box binds first)."""
    t = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
    return _GEO.project(x + t, x, eps)


def sparse_step(grad: Tensor, x_k: Tensor, k: Tensor) -> Tensor:
    """``s/‖s‖₁`` with ``s = sign(∇)`` on the ``k`` largest ``|∇ᵢ|`` (per point) among the coordinates
    not pinned at the box in the ascent direction; zero where no coordinate can move.  Ties at the
    ``k``-th value are all kept."""
    g = grad.flatten(1)
    xf = x_k.flatten(1)
    pinned = ((xf <= 0) & (g < 0)) | ((xf >= 1) & (g > 0))
    mag = torch.where(pinned, torch.zeros_like(g), g.abs())
    kth = mag.sort(dim=1, descending=True).values.gather(1, (k.long() - 1).clamp(0, g.shape[1] - 1)[:, None])
    s = torch.where((mag >= kth) & (mag > 0), g.sign(), torch.zeros_like(g))
    s = s / s.abs().sum(dim=1, keepdim=True).clamp_min(1.0)
    return s.view_as(grad)


def l1_apgd_search(
    model: nn.Module,
    x: Tensor,
    label: Tensor,
    loss_fn: LossFn,
    *,
    eps: float,
    steps: int,
    x_start: Tensor,
    rho: float = 0.75,
    schedule: L1Schedule = L1Schedule(),  # noqa: B008 - frozen, so a shared default is safe
    success: SuccessFn = misclassified,
    stop_on_success: bool = True,
    draws: int = 1,
) -> SearchResult:
    """Run l1-APGD for ``steps`` iterations from ``x_start`` (inside the L1 ball ∩ [0, 1]).

    ``label`` is passed to ``loss_fn`` and ``success`` and pruned with the batch (it may hold a
    target column); each gradient averages ``draws`` passes (EOT).  Returns the same :class:`SearchResult` as APGD's search in the other norms.
    """
    b = x.shape[0]
    d = x[0].numel()
    ckpts = checkpoints(steps)
    eta0 = schedule.step * eps
    logits, loss, g = eot_loss_grad(model, x_start, label, loss_fn, draws)
    st = {
        "x0": x, "lab": label, "xk": x_start, "g": g, "loss": loss,
        "xmax": x_start, "fmax": loss, "gmax": g,
        "eta": torch.full((b,), eta0, device=x.device, dtype=x.dtype),
        "k": torch.full((b,), float(max(1, math.ceil(schedule.topk * d))), device=x.device),
        "sp_last": torch.full((b,), float(d), device=x.device),
        "inc": torch.zeros(b, device=x.device), "fmax_last": loss,
        "restart_last": torch.zeros(b, dtype=torch.bool, device=x.device),
    }

    def adapt() -> None:
        """Step length and sparsity from the sparsity M of the best point (``sp_last``: the last M)."""
        sp = (st["xmax"] - st["x0"]).flatten(1).ne(0).sum(dim=1).float()
        sparser = sp < schedule.sparser * st["sp_last"]
        eta = torch.where(sparser, torch.full_like(st["eta"], eta0), st["eta"] / schedule.shrink)
        st["eta"] = eta.clamp(schedule.min_step * eta0, eta0)
        st["k"] = (sp / schedule.shrink).ceil().clamp(1, d)
        st["sp_last"] = sp

    period = max(int(schedule.every * steps), 1)

    active = ActiveSet(x_start, st)
    if stop_on_success:
        active.drop(success(logits, label))
    j = 1
    for it in range(steps):
        if active.idx.numel() == 0:
            break
        xk = st["xk"]
        x_new = _GEO.project(xk + per_sample(st["eta"], xk) * sparse_step(st["g"], xk, st["k"]), st["x0"], eps)
        logits, loss, g = eot_loss_grad(model, x_new, st["lab"], loss_fn, draws)
        track_best(st, x_new, g, loss)
        st["xk"], st["g"], st["loss"] = x_new, g, loss
        if (it + 1) % period == 0:
            adapt()
        if stop_on_success and active.drop(success(logits, st["lab"])):
            break
        if j < len(ckpts) and it + 1 == ckpts[j]:
            restart_at_best(st, rho, ckpts[j] - ckpts[j - 1])
            j += 1
    return active.result()


def l1_apgd(
    model: nn.Module, x: Tensor, label: Tensor, loss_fn: LossFn, *, norm: Norm, eps: float, steps: int,
    gen: torch.Generator, rho: float, alpha: float, **kw,
) -> SearchResult:
    """One l1-APGD run from a fresh sparse start: APGD's search entry for L1, with the signature
    every norm's entry shares (``norm`` is L1; ``alpha``, APGD's momentum, is not used: see the
    module docstring)."""
    return l1_apgd_search(model, x, label, loss_fn, eps=eps, steps=steps, x_start=l1_apgd_start(x, eps, gen),
                          rho=rho, **kw)
