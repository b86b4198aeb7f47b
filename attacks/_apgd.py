"""The step-size-controlled search shared by APGD (Croce & Hein, ICML 2020, Algorithm 1) and
ACG (Yamamura et al., ICML 2022, Algorithm 1).

Both run ``N`` iterations from ``x_0`` with a per-point step size ``η``, starting at ``η_0 = 2ε``,
and keep the best point ``x_max`` (highest loss).  At the checkpoints ``w_j = ⌈p_j N⌉``
(``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``) a point's
``η`` is halved and its search restarts from ``x_max`` when

1. the loss increased in fewer than ``ρ · (w_j − w_{j−1})`` of the steps since ``w_{j−1}``, or
2. ``η`` was not halved at ``w_{j−1}`` and ``f_max`` did not improve since ``w_{j−1}``.

The step differs:

* APGD (eq. 2): ``z = Π(x_k + η·d(∇f(x_k)))``, ``x_{k+1} = Π(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))``
  with momentum ``α = 0.75`` (the first step, and the first step after a restart, without momentum).
* ACG (eq. 6-8): ``s_0 = g_0``, ``s_k = g_k + β_k s_{k−1}``, ``x_{k+1} = Π(x_k + η·sign(s_k))``, with
  ``y = g_k − g_{k−1}`` and ``β_k = ⟨g_k, y⟩ / ⟨s_{k−1}, y⟩`` per point, clamped to ``β ≥ 0`` and set
  to 0 where ``|⟨s_{k−1}, y⟩|`` is tiny (as in the authors' published code).  A restart
  moves to ``x_max`` together with the gradient and direction stored when ``x_max`` was found.

``d`` is ``sign`` (Linf) or ``g/‖g‖₂`` (L2).  Points that succeed leave the active batch (their
successful iterate is returned); the others return ``x_max``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustbench_lite import EvasionAttack, LossFn, Norm
from robustbench_lite.core.ops import per_sample

from ._ascent import SuccessFn, misclassified

TraceFn = Callable[[Tensor, Tensor], None]  # (indices of the active points, their new iterate)


def checkpoint_fractions() -> list[float]:
    """``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` while ``p_j ≤ 1``."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1.0 + 1e-12:
            return p
        p.append(nxt)


def checkpoints(steps: int) -> list[int]:
    """Iterations ``w_j = ⌈p_j · N⌉`` at which the step size may be halved (``w_0 = 0``).

    ``p_j`` is rounded to 10 decimals first, so float noise (0.41 · 100 = 41.000000000000004)
    does not push a checkpoint one step late.  Duplicates (small ``N``) are dropped.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out: list[int] = []
    for p in checkpoint_fractions():
        w = math.ceil(round(p * steps, 10))
        if w <= steps and (not out or w > out[-1]):
            out.append(w)
    return out


@dataclass(frozen=True)
class SearchResult:
    x_adv: Tensor  # the successful iterate, or x_max where none succeeded
    found: Tensor  # bool [B]: an iterate succeeded
    best_loss: Tensor  # f_max per point (at the successful iterate's stop for found points)


class ActiveSet:
    """The points of a batch whose search still runs: their state tensors ``st`` (pruned together
    when points succeed) and the whole batch's results (the search's returned buffers).  ``st``
    must hold ``xk`` and ``loss`` (the iterate and loss a succeeding point stops at) and ``xmax``
    and ``fmax`` (the best point and loss the others end with)."""

    def __init__(self, x_start: Tensor, st: dict[str, Tensor]) -> None:
        b, dev = x_start.shape[0], x_start.device
        self.out = x_start.clone()
        self.found = torch.zeros(b, dtype=torch.bool, device=dev)
        self.best_loss = torch.full((b,), float("-inf"), device=dev, dtype=x_start.dtype)
        self.idx = torch.arange(b, device=dev)
        self.st = st

    def drop(self, hit: Tensor) -> bool:
        """Record the points ``hit`` marks as found and stop them; True when none is left."""
        if hit.any():
            done = self.idx[hit]
            self.out[done] = self.st["xk"][hit]
            self.found[done] = True
            self.best_loss[done] = self.st["loss"][hit]
            keep = ~hit
            self.idx = self.idx[keep]
            for k in self.st:
                self.st[k] = self.st[k][keep]
        return self.idx.numel() == 0

    def result(self) -> SearchResult:
        """The batch's result: the points still running end at their best iterate."""
        self.out[self.idx] = self.st["xmax"]
        self.best_loss[self.idx] = self.st["fmax"]
        return SearchResult(self.out, self.found, self.best_loss)


def track_best(st: dict[str, Tensor], x_new: Tensor, g: Tensor, loss: Tensor) -> Tensor:
    """One step's bookkeeping shared by every APGD-style search: count the points whose loss rose
    (``inc``, against the previous ``loss``) and keep each point's best iterate, gradient and loss
    (``xmax``, ``gmax``, ``fmax``).  Returns the improved points' mask, shaped to broadcast over
    ``x_new``.  Call it before the iterate and loss in ``st`` move on."""
    st["inc"] = st["inc"] + (loss > st["loss"]).float()
    better = loss > st["fmax"]
    bv = per_sample(better, x_new)
    st["xmax"] = torch.where(bv, x_new, st["xmax"])
    st["gmax"] = torch.where(bv, g, st["gmax"])
    st["fmax"] = torch.where(better, loss, st["fmax"])
    return bv


def restart_at_best(st: dict[str, Tensor], rho: float, height: int) -> Tensor:
    """APGD's checkpoint rule (Croce & Hein, ICML 2020, section 3.1): a point whose loss rose in
    fewer than ``rho · height`` of the last ``height`` steps, or whose best loss did not improve
    since the previous checkpoint where it was not restarted, goes back to its best iterate,
    gradient and loss; the rise counter restarts for all.  Returns the restarted points' mask
    (1-D); the search applies its own consequences (APGD halves the step)."""
    restart = (st["inc"] < rho * height) | (~st["restart_last"] & (st["fmax"] <= st["fmax_last"]))
    st["restart_last"], st["fmax_last"] = restart, st["fmax"]
    rv = per_sample(restart, st["xk"])
    st["xk"] = torch.where(rv, st["xmax"], st["xk"])
    st["g"] = torch.where(rv, st["gmax"], st["g"])
    st["loss"] = torch.where(restart, st["fmax"], st["loss"])
    st["inc"] = torch.zeros_like(st["inc"])
    return restart


def eot_loss_grad(model: nn.Module, x: Tensor, label: Tensor, loss_fn: LossFn, draws: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`EvasionAttack.loss_grad` averaged over ``draws`` passes: the mean logits, loss and
    input gradient (EOT, Athalye et al., ICML 2018, §4.3; AutoAttack's ``rand`` version averages
    APGD's gradient over 20 passes of a randomized model).  ``draws = 1`` is one plain pass."""
    logits, loss, grad = EvasionAttack.loss_grad(model, x, label, loss_fn)
    for _ in range(draws - 1):
        more = EvasionAttack.loss_grad(model, x, label, loss_fn)
        logits, loss, grad = logits + more[0], loss + more[1], grad + more[2]
    return (logits / draws, loss / draws, grad / draws) if draws > 1 else (logits, loss, grad)


#: rows a batch of several targets side by side may fill (see :func:`target_group`)
GROUP_ROWS = 256


def target_group(points: int, left: int) -> int:
    """How many of the ``left`` remaining targets run side by side as one batch of ``points`` rows
    each: one at a time for a batch of more than ``GROUP_ROWS / 2`` points (each target only on
    the points the earlier ones left, as AutoAttack runs them), several where the survivors are few
    and a pass over them alone would cost mostly fixed overhead."""
    return max(1, min(left, GROUP_ROWS // max(points, 1)))


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(dim=1)


def conjugate_beta(g: Tensor, g_prev: Tensor, s_prev: Tensor, tiny: float = 1e-12) -> Tensor:
    """ACG's ``β = ⟨g, y⟩ / ⟨s_prev, y⟩``, ``y = g − g_prev``, per point, clamped to ``β ≥ 0``; 0 where
    the denominator is smaller than ``tiny`` in magnitude or the ratio is not finite."""
    y = g - g_prev
    num, den = _bdot(g, y), _bdot(s_prev, y)
    ok = den.abs() > tiny
    beta = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    beta = torch.nan_to_num(beta, nan=0.0, posinf=0.0, neginf=0.0)
    return beta.clamp_min(0.0)


def auto_search(
    model: nn.Module,
    x: Tensor,
    label: Tensor,
    loss_fn: LossFn,
    *,
    norm: Norm,
    eps: float,
    steps: int,
    x_start: Tensor,
    method: str = "apgd",
    rho: float = 0.75,
    alpha: float = 0.75,
    success: SuccessFn = misclassified,
    stop_on_success: bool = True,
    trace: TraceFn | None = None,
    draws: int = 1,
) -> SearchResult:
    """Run APGD (``method="apgd"``) or ACG (``method="acg"``) for ``steps`` iterations.

    ``label`` is passed to ``loss_fn`` and ``success`` and pruned with the batch, so it may hold
    more than one column (e.g. true class and target).  Costs ``steps + 1`` gradients per point
    at most (times ``draws``, the passes each gradient averages, :func:`eot_loss_grad`).
    ``trace`` sees every new iterate (for the diversity index).
    """
    if method not in ("apgd", "acg"):
        raise ValueError(f"method must be 'apgd' or 'acg', got {method!r}")
    geo = norm.geometry
    b = x.shape[0]
    ckpts = checkpoints(steps)
    logits, loss, g = eot_loss_grad(model, x_start, label, loss_fn, draws)
    if trace is not None:
        trace(torch.arange(b, device=x.device), x_start)
    st = {
        "x0": x, "lab": label, "xk": x_start, "xprev": x_start, "g": g, "loss": loss,
        "xmax": x_start, "fmax": loss, "gmax": g,
        "eta": torch.full((b,), 2.0 * eps, device=x.device, dtype=x.dtype),
        "inc": torch.zeros(b, device=x.device), "fmax_last": loss,
        "restart_last": torch.zeros(b, dtype=torch.bool, device=x.device),
        "fresh": torch.ones(b, dtype=torch.bool, device=x.device),  # next step without momentum
    }
    if method == "acg":
        st["s"], st["smax"] = g, g

    active = ActiveSet(x_start, st)
    if stop_on_success:
        active.drop(success(logits, label))
    j = 1
    for k in range(steps):
        if active.idx.numel() == 0:
            break
        xk, x0 = st["xk"], st["x0"]
        eta = per_sample(st["eta"], xk)
        if method == "acg":
            x_new = geo.project(xk + eta * st["s"].sign(), x0, eps)
        else:
            z = geo.project(xk + eta * geo.ascent(st["g"]), x0, eps)
            mom = xk + alpha * (z - xk) + (1 - alpha) * (xk - st["xprev"])
            x_new = torch.where(per_sample(st["fresh"], xk), z, geo.project(mom, x0, eps))
        logits, loss, g = eot_loss_grad(model, x_new, st["lab"], loss_fn, draws)
        if trace is not None:
            trace(active.idx, x_new)
        bv = track_best(st, x_new, g, loss)
        if method == "acg":
            st["s"] = g + per_sample(conjugate_beta(g, st["g"], st["s"]), g) * st["s"]
            st["smax"] = torch.where(bv, st["s"], st["smax"])
        st["xprev"], st["xk"], st["g"], st["loss"] = xk, x_new, g, loss
        st["fresh"] = torch.zeros_like(st["fresh"])
        if stop_on_success and active.drop(success(logits, st["lab"])):
            break
        if j < len(ckpts) and k + 1 == ckpts[j]:
            halve = restart_at_best(st, rho, ckpts[j] - ckpts[j - 1])
            st["eta"] = torch.where(halve, st["eta"] / 2, st["eta"])
            hv = per_sample(halve, st["xk"])
            st["xprev"] = torch.where(hv, st["xmax"], st["xprev"])
            st["fresh"] = halve
            if method == "acg":
                st["s"] = torch.where(hv, st["smax"], st["s"])
            j += 1
    return active.result()


def search_points(
    model: nn.Module,
    x: Tensor,
    label: Tensor,
    loss_fn: LossFn,
    *,
    method: str,
    eps: float,
    steps: int,
    x_start: Tensor,
    last: int = 10,
    norm: Norm = Norm.LINF,
) -> Tensor:
    """The last ``last`` search points of every image, ``[B, last, d]`` (no early stop), for
    :func:`robustbench_lite.eval.diversity.diversity_index`."""
    if steps + 1 < last:
        raise ValueError(f"need steps + 1 >= last search points, got steps={steps}, last={last}")
    hist: list[Tensor] = []

    def keep(active: Tensor, pts: Tensor) -> None:
        hist.append(pts.detach().flatten(1).clone())
        if len(hist) > last:
            hist.pop(0)

    with torch.no_grad():
        auto_search(
            model, x, label, loss_fn, norm=norm, eps=eps, steps=steps, x_start=x_start,
            method=method, stop_on_success=False, trace=keep,
        )
    return torch.stack(hist, dim=1)
