"""Robustness curves: robust accuracy as a function of eps, per attack, in one pass over a grid;
and AttackBench's optimality score of each attack against the best of all of them.

Every attack's outcome is one number per point: ``d_i``, the size (in the threat's norm) of the
smallest adversarial example it found for point ``i``; 0 where the clean point is already
misclassified, ``inf`` where it found none within the grid's largest eps.  Then robust accuracy
at any eps is ``RA(eps) = share of points with d_i > eps``.

* A fixed-budget attack walks the grid upwards.  A point broken at eps stays broken at every
  larger eps (its adversarial example lies in every larger ball), so at each eps the attack runs
  only on the points it has not broken yet: that is where a curve costs less than one run per
  eps.  A point broken at eps gets ``d_i`` = the actual size of the example found (at most eps).
* A minimum-norm attack (CW-L2, the APGD bisection search ``apgd-mn``) runs once, at the grid's
  largest eps, and its examples' sizes are the ``d_i``.

Every example is judged on the model (its prediction must differ from the label) and measured
here, so a curve never trusts an attack's own claim.

Optimality (Cinà et al., "AttackBench: Evaluating gradient-based attacks for adversarial
examples", AAAI 2025, arXiv 2404.19460, section 3): with the per-point best
``d*_i = min_a d_i^a`` over all attacks run, areas under the RA curves between 0 and ``eps_max``
are ``A = mean_i min(d_i, eps_max)`` (the integral of ``RA``) and ``A*`` for ``d*``; with clean
accuracy ``c`` an attack that finds nothing has area ``c·eps_max``, so
``optimality = 1 − (A − A*) / (c·eps_max − A*)`` lies in [0, 1] and is 1 for an attack that is the
best on every point.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..core.attack import EvasionAttack
from ..core.data import DataSplit
from ..core.device import DevicePolicy, halving_on_oom

INF = float("inf")


@dataclass(frozen=True)
class CurveRecord:
    """One attack's curve over a grid: per-point smallest adversarial sizes and the cost."""

    distances: Tensor  # float32 [n]: 0 misclassified, inf none found within the largest eps
    seconds: float
    grad_evals: int
    forward_evals: int
    attacked: int  # points attacked, summed over the grid's steps

    def robust_acc(self, eps: float) -> float:
        return robust_at(self.distances, eps)


def robust_at(distances: Tensor, eps: float) -> float:
    """Share of points whose smallest adversarial example is larger than ``eps``."""
    return float((distances > eps).float().mean()) if distances.numel() else float("nan")


def robust_curve(distances: Tensor, grid: Sequence[float]) -> list[float]:
    """``RA(eps)`` at each eps of ``grid`` (``RA(0)`` is the clean accuracy)."""
    return [robust_at(distances, e) for e in grid]


def attack_curve(
    model: nn.Module,
    attack_at: Callable[[float], EvasionAttack],
    grid: Sequence[float],
    split: DataSplit,
    correct: Tensor,
    *,
    policy: DevicePolicy,
    batch_size: int = 500,
) -> CurveRecord:
    """The curve of the attack ``attack_at(eps)`` over the positive eps of ``grid`` on ``split``
    (``correct``: the clean-correct points, the only ones attacked)."""
    steps = sorted({float(e) for e in grid if e > 0})
    if not steps:
        raise ValueError("a curve needs at least one eps > 0")
    d = torch.where(correct, torch.full(correct.shape, INF), torch.zeros(correct.shape))
    largest = attack_at(steps[-1])
    if largest.min_norm:  # one run gives every point's distance
        steps = steps[-1:]
    seconds, grads, fwds, attacked = 0.0, 0, 0, 0
    for eps in steps:
        attack = largest if eps == steps[-1] else attack_at(eps)
        todo = torch.isinf(d).nonzero().flatten()
        if todo.numel() == 0:
            break
        (found, stats), _ = halving_on_oom(
            lambda b, attack=attack, todo=todo: _distances(model, attack, split, todo, policy, b), batch_size
        )
        d[todo] = torch.where(torch.isfinite(found), found.clamp(max=eps), d[todo])
        seconds, grads, fwds = seconds + stats[0], grads + stats[1], fwds + stats[2]
        attacked += int(todo.numel())
    return CurveRecord(d, seconds, grads, fwds, attacked)


def _distances(
    model: nn.Module, attack: EvasionAttack, split: DataSplit, idx: Tensor, policy: DevicePolicy, batch_size: int
) -> tuple[Tensor, tuple[float, int, int]]:
    """Size of each example ``attack`` finds on the points ``idx`` (``inf`` where the model still
    classifies it correctly), judged on ``model``; and (seconds, gradients, forwards)."""
    gen = torch.Generator(device=policy.device).manual_seed(attack.seed)
    out_d = torch.full((idx.numel(),), INF)
    seconds, grads, fwds = 0.0, 0, 0
    geo = attack.geometry
    for i in range(0, idx.numel(), batch_size):
        sel = idx[i : i + batch_size]
        x, y = policy.batch_to(split.x[sel]), policy.batch_to(split.y[sel])
        with policy.autocast("attack"):
            out = attack.run(model, x, y, gen)
        t0 = time.perf_counter()
        with torch.no_grad(), policy.autocast("eval"):
            broken = model(out.x_adv).argmax(1) != y
        size = geo.distance((out.x_adv - x).float())
        out_d[i : i + sel.numel()] = torch.where(broken, size, torch.full_like(size, INF)).cpu()
        seconds += out.seconds + time.perf_counter() - t0
        grads += out.grad_evals
        fwds += out.forward_evals + sel.numel()
    return out_d, (seconds, grads, fwds)


# -- comparing attacks -----------------------------------------------------------------------------
def best_distances(distances: Sequence[Tensor]) -> Tensor:
    """The per-point smallest distance over attacks (the empirical optimum ``d*``)."""
    if not distances:
        raise ValueError("best_distances needs at least one attack's distances")
    return torch.stack([d.float() for d in distances]).amin(dim=0)


def area(distances: Tensor, eps_max: float) -> float:
    """The area under ``RA(eps)`` on [0, eps_max]: ``mean_i min(d_i, eps_max)``."""
    return float(distances.float().clamp(max=eps_max).mean())


def optimality(distances: Tensor, best: Tensor, eps_max: float) -> float:
    """AttackBench's optimality of one attack against the per-point best ``best`` (both from the
    same points): ``1 − (A − A*) / (c·eps_max − A*)``, in [0, 1]; 1 when no attack broke any
    point (every attack equals the best)."""
    if distances.shape != best.shape:
        raise ValueError(f"distances {tuple(distances.shape)} and best {tuple(best.shape)} must cover the same points")
    if eps_max <= 0:
        raise ValueError(f"eps_max must be > 0, got {eps_max}")
    a, a_star = area(distances, eps_max), area(best, eps_max)
    worst = float((best > 0).float().mean()) * eps_max  # c·eps_max: the area of an attack that finds nothing
    if worst - a_star <= 1e-12 * max(eps_max, 1.0):
        return 1.0
    return float(min(1.0, max(0.0, 1.0 - (a - a_star) / (worst - a_star))))


def pointwise_optimality(distances: Tensor, best: Tensor, eps_max: float) -> Tensor:
    """The same score per point: ``1 − (min(d_i, ε) − min(d*_i, ε)) / (ε − min(d*_i, ε))`` where
    some attack broke point ``i`` within ``ε = eps_max``; 1 elsewhere (no attack found anything,
    or the point was misclassified already)."""
    d, b = distances.float().clamp(max=eps_max), best.float().clamp(max=eps_max)
    room = eps_max - b
    score = 1.0 - (d - b) / torch.where(room > 0, room, torch.ones_like(room))
    return torch.where((room > 0) & (best > 0), score.clamp(0.0, 1.0), torch.ones_like(score))


# -- storage ---------------------------------------------------------------------------------------
def encode(distances: Tensor) -> str:
    """Distances as base64 of little-endian float32 (``inf`` kept): compact, exact, JSON-safe."""
    return base64.b64encode(distances.detach().cpu().float().numpy().astype("<f4").tobytes()).decode("ascii")


def decode(text: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32).copy())
