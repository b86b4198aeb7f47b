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
  (``order="down"``: AttackBench's search downwards, cheaper, see :func:`attack_curve`.)
* A minimum-norm attack (CW-L2, the APGD bisection search ``apgd-mn``) runs once, at the grid's
  largest eps, and its examples' sizes are the ``d_i``.

Every example is judged on the model (its prediction must differ from the label) and measured
here, so a curve never trusts an attack's own claim.

Optimality (Cinà et al., "AttackBench: Evaluating gradient-based attacks for adversarial
examples", AAAI 2025, arXiv 2404.19460): with the per-point best
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
from ..core.progress import Progress, Task

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


ORDERS = ("up", "down")


def attack_curve(
    model: nn.Module,
    attack_at: Callable[[float], EvasionAttack],
    grid: Sequence[float],
    split: DataSplit,
    correct: Tensor,
    *,
    policy: DevicePolicy,
    batch_size: int = 500,
    order: str = "up",
    progress: Progress | None = None,
    label: str = "",
) -> CurveRecord:
    """The curve of the attack ``attack_at(eps)`` over the positive eps of ``grid`` on ``split``
    (``correct``: the clean-correct points, the only ones attacked).

    ``order="up"`` walks the grid upwards and attacks, at each eps, the points not broken yet:
    every point counted robust at an eps was attacked at that eps.  ``order="down"`` is the search
    AttackBench runs to make a fixed-budget attack minimum-norm: it walks downwards, attacks at
    each eps the points whose smallest example so far is larger than eps, and stops searching a
    point once the attack fails on it, counting it robust at every smaller eps without attacking
    it there (it assumes an attack that fails in a ball fails in every smaller one).  A point then
    costs one failing run instead of one per eps below its distance; and before attacking a point
    at eps, its smallest example so far is projected onto the eps ball: when that still fools the
    model it is the point's example at eps, for one forward pass.

    ``progress`` shows the points left over the whole grid (``label``, default the attack's name
    and norm): each eps counts every clean-correct point, those it does not attack (broken
    already, or given up on) as soon as the eps is done."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    steps = sorted({float(e) for e in grid if e > 0})
    if not steps:
        raise ValueError("a curve needs at least one eps > 0")
    d = torch.where(correct, torch.full(correct.shape, INF), torch.zeros(correct.shape))
    searching = correct.clone()  # order="down": points not yet found robust at some eps
    examples = split.x.clone() if order == "down" else None  # order="down": each point's smallest example
    largest = attack_at(steps[-1])
    if largest.min_norm:  # one run gives every point's distance
        steps = steps[-1:]
    seconds, grads, fwds, attacked = 0.0, 0, 0, 0
    per_eps = int(correct.sum())
    label = label or f"curve {largest.name} {largest.threat.norm.value}"
    with (progress or Progress.off()).task(label, per_eps * len(steps)) as task:
        for k, eps in enumerate(steps if order == "up" else steps[::-1]):
            task.advance_to(k * per_eps)
            attack = largest if eps == steps[-1] else attack_at(eps)
            todo = (torch.isinf(d) if order == "up" else searching & (d > eps)).nonzero().flatten()
            if examples is not None and todo.numel():
                # an example found at a larger eps, projected onto this ball, may still fool the model:
                # then it is this eps's example, for one forward pass instead of an attack
                t0 = time.perf_counter()
                kept, size, shrunk = _shrink(model, examples, split, todo[torch.isfinite(d[todo])], attack, eps, policy)
                d[kept], examples[kept] = size, shrunk
                seconds, fwds = seconds + time.perf_counter() - t0, fwds + int(torch.isfinite(d[todo]).sum())
                todo = todo[d[todo] > eps]
            if todo.numel() == 0:
                if order == "up":
                    break
                continue

            def measure(b: int, attack: EvasionAttack = attack, todo: Tensor = todo, base: int = task.done):
                task.rewind(base)  # a rerun with a smaller batch starts this eps over
                return _distances(model, attack, split, todo, policy, b, task)

            (found, adv, stats), _ = halving_on_oom(measure, batch_size)
            hit = torch.isfinite(found)
            better = hit & (found < d[todo])
            d[todo] = torch.where(better, found.clamp(max=eps), d[todo])
            if examples is not None:
                examples[todo[better]] = adv[better]
            searching[todo[~hit]] = False
            seconds, grads, fwds = seconds + stats[0], grads + stats[1], fwds + stats[2]
            attacked += int(todo.numel())
        task.advance_to(task.total)
        task.close(f"{attacked} points attacked over {len(steps)} eps")
    return CurveRecord(d, seconds, grads, fwds, attacked)


def _shrink(model: nn.Module, examples: Tensor, split: DataSplit, idx: Tensor, attack: EvasionAttack, eps: float,
            policy: DevicePolicy) -> tuple[Tensor, Tensor, Tensor]:
    """The points of ``idx`` whose example, projected onto the ``eps`` ball, still fools the model:
    their indices, sizes and projected examples."""
    if idx.numel() == 0:
        return idx, torch.empty(0), examples[idx]
    geo = attack.geometry
    try:
        shrunk = geo.project(examples[idx], split.x[idx], eps)
    except ValueError:  # a norm without a projection (L0): nothing to reuse
        return idx[:0], torch.empty(0), examples[idx[:0]]
    fooled = torch.zeros(idx.numel(), dtype=torch.bool)
    for i in range(0, idx.numel(), 1000):
        x = policy.batch_to(shrunk[i : i + 1000])
        with torch.no_grad(), policy.autocast("eval"):
            fooled[i : i + 1000] = (model(x).argmax(1) != policy.batch_to(split.y[idx[i : i + 1000]])).cpu()
    size = geo.distance((shrunk - split.x[idx]).float()).clamp(max=eps)
    return idx[fooled], size[fooled], shrunk[fooled]


def _distances(
    model: nn.Module, attack: EvasionAttack, split: DataSplit, idx: Tensor, policy: DevicePolicy, batch_size: int,
    task: Task | None = None,
) -> tuple[Tensor, Tensor, tuple[float, int, int]]:
    """Size of each example ``attack`` finds on the points ``idx`` (``inf`` where the model still
    classifies it correctly), judged on ``model``; the examples; and (seconds, gradients, forwards).
    ``task`` counts the points as each batch is done."""
    gen = torch.Generator(device=policy.device).manual_seed(attack.seed)
    out_d = torch.full((idx.numel(),), INF)
    out_x = torch.empty((idx.numel(), *split.x.shape[1:]), dtype=split.x.dtype)
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
        out_x[i : i + sel.numel()] = out.x_adv.detach().cpu()
        seconds += out.seconds + time.perf_counter() - t0
        grads += out.grad_evals
        fwds += out.forward_evals + sel.numel()
        if task is not None:
            task.update(sel.numel())
    return out_d, out_x, (seconds, grads, fwds)


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


# -- storage ---------------------------------------------------------------------------------------
def encode(distances: Tensor) -> str:
    """Distances as base64 of little-endian float32 (``inf`` kept): compact, exact, JSON-safe."""
    return base64.b64encode(distances.detach().cpu().float().numpy().astype("<f4").tobytes()).decode("ascii")


def decode(text: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32).copy())
