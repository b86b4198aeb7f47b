"""HopSkipJump (Chen, Jordan & Wainwright, "HopSkipJumpAttack: a query-efficient decision-based
attack", IEEE S&P 2020, Algorithm 2), in L2 and Linf: a decision-based attack, which sees only
the model's predicted label (``needs_scores = False``), so it also runs on a
:class:`~robustbench_lite.core.access.LabelOnly` model.

* Start: uniform random images until one is misclassified (at most ``init_trials`` draws).
* Each iteration ``t``:

  1. bisection between ``x`` and the current adversarial point ``x̃`` onto the boundary: the
     point of the ball of radius ``r`` around ``x`` closest to ``x̃`` (a blend ``x + r/‖x̃ − x‖·(x̃ − x)``
     for L2, a clip to ``[x − r, x + r]`` for Linf; the norm's projection), ``r`` bisected until the
     bracket is below ``θ·‖x̃ − x‖`` with ``θ = γ·d^{−3/2}``;
  2. the gradient direction at the boundary point from ``B_t = min(init_evals·√t, max_evals)``
     label queries at ``x_t + δ_t·u_b`` (``u_b`` the norm's noise on the unit L2 sphere, clipped to
     the box), ``δ_t = γ·‖x_t − x‖/d`` (0.1 at ``t = 1``): ``v = mean((φ_b − φ̄)·u_b)`` with
     ``φ_b = ±1`` for adversarial or not (eq. 9, the baseline ``φ̄`` dropped when every ``φ_b`` is
     equal), stepped along the norm's steepest direction (``v/‖v‖₂``, or ``sign(v)`` for Linf);
  3. geometric step-size search: ``ξ = ‖x_t − x‖/√t``, halved until ``x_t + ξ·dir`` is
     adversarial; that point is the next ``x̃``.

``queries`` is the budget of model queries per point, the first one (is ``x`` misclassified
already?) included; it is never exceeded: a point stops where it cannot afford the next step
(its gradient estimate shrinks to what is left after a bisection's worth of queries).  The
smallest adversarial point seen is kept (every point kept is a queried adversarial).
``max_evals`` caps ``B_t`` (10,000 in the paper); ``γ`` (1) sets the bisection precision and the
probe radius as in the authors' code.

Minimum-norm attack: the run returns each point's smallest adversarial example when it lies
within ``eps``, else ``x``, and ``AttackOutput.distances`` holds its size (``inf`` where no
random start was adversarial; 0 for points misclassified already).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustbench_lite import EvasionAttack, Norm, ops, register_attack, setting

from ._min_norm import Smallest

_CHUNK = 4096  # images per model call


class _Oracle:
    """The model as a decision oracle: is each image misclassified?  Counts the queries per point
    and answers only points with budget left (callers ask only those)."""

    def __init__(self, model: nn.Module, y: Tensor, budget: int) -> None:
        self.model, self.y, self.budget = model, y, budget
        self.used = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)

    def left(self) -> Tensor:
        return self.budget - self.used

    def ask(self, idx: Tensor, images: Tensor) -> Tensor:
        """Adversarial or not, for ``images[i]`` as a query of point ``idx[i]``."""
        if idx.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.y.device)
        preds = torch.cat([self.model(part).argmax(dim=1) for part in images.split(_CHUNK)])
        self.used.index_add_(0, idx, torch.ones_like(idx))
        return preds != self.y[idx]


@register_attack("hsj")
@dataclass(frozen=True, kw_only=True)
class HopSkipJump(EvasionAttack):
    """HopSkipJump (untargeted, decision-based): each point's smallest adversarial example
    within a budget of label queries."""

    norms = (Norm.L2, Norm.LINF)
    min_norm: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    randomized: ClassVar[bool] = True
    queries: int = setting(1000, low=1)
    init_evals: int = setting(100, low=2)
    max_evals: int = setting(10000, low=2)
    gamma: float = setting(1.0, low=0.0, low_open=True)
    init_trials: int = setting(100, low=1)

    @property
    def grad_budget(self) -> float:
        return self.queries / 3.0  # no gradients; a query is about a third of a forward+backward pass

    def _perturb(self, model, x, y, target, gen):
        geo = self.geometry
        b, d = x.shape[0], x[0].numel()
        oracle = _Oracle(model, y, self.queries)
        track = Smallest(x, geo)
        every = torch.arange(b, device=x.device)
        clean = oracle.ask(every, x)
        track.offer(every, x, clean)
        cur, start = self._start(oracle, x, ~clean, gen)
        track.offer(every[start], cur[start], torch.ones_like(start[start]))
        theta = self.gamma / d**1.5
        rounds = math.ceil(math.log2(1 / theta))  # queries of one full bisection
        active = start.clone()
        t = 0
        while True:
            idx = (active & (oracle.left() > 0)).nonzero().flatten()
            if idx.numel() == 0:
                break
            cur[idx] = self._bisect(oracle, x[idx], cur[idx], idx, theta)
            track.offer(idx, cur[idx], torch.ones_like(idx, dtype=torch.bool))
            t += 1
            evals = min(int(self.init_evals * math.sqrt(t)), self.max_evals)
            n = torch.clamp(oracle.left()[idx] - rounds - 1, max=evals)
            go = n >= 2  # points that cannot afford a gradient estimate and a step stop here
            active[idx[~go]] = False
            idx, n = idx[go], n[go]
            if idx.numel() == 0:
                continue
            dist = geo.distance(cur[idx] - x[idx])
            probe = torch.full_like(dist, 0.1) if t == 1 else self.gamma * dist / d
            direction = self._direction(oracle, cur[idx], idx, n, probe, gen)
            self._step(oracle, cur, idx, direction, dist / math.sqrt(t))
            track.offer(idx, cur[idx], torch.ones_like(idx, dtype=torch.bool))
        return track.result(self.eps)

    def _start(self, oracle: _Oracle, x: Tensor, todo: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Uniform random images until one is adversarial: the starting points and which points have one."""
        cur, have = x.clone(), torch.zeros_like(todo)
        for _ in range(self.init_trials):
            idx = (todo & ~have & (oracle.left() > 0)).nonzero().flatten()
            if idx.numel() == 0:
                break
            noise = torch.rand(x[idx].shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
            hit = oracle.ask(idx, noise)
            cur[idx[hit]], have[idx[hit]] = noise[hit], True
        return cur, have

    def _bisect(self, oracle: _Oracle, x: Tensor, adv: Tensor, idx: Tensor, theta: float) -> Tensor:
        """The boundary point between ``x`` and ``adv`` (adversarial): the ball's point closest to
        ``adv`` at the smallest radius found adversarial, the radius bisected while budget lasts."""
        geo = self.geometry
        dist = geo.distance(adv - x)
        lo, hi = torch.zeros_like(dist), torch.ones_like(dist)
        while True:
            can = ((hi - lo) > theta) & (oracle.left()[idx] > 0)
            if not can.any():
                break
            sel = can.nonzero().flatten()
            mid = (lo[sel] + hi[sel]) / 2
            hit = oracle.ask(idx[sel], geo.project(adv[sel], x[sel], mid * dist[sel]))
            hi[sel[hit]] = mid[hit]
            lo[sel[~hit]] = mid[~hit]
        inside = hi < 1
        out = adv.clone()
        out[inside] = geo.project(adv[inside], x[inside], hi[inside] * dist[inside])
        return out

    def _direction(self, oracle: _Oracle, at: Tensor, idx: Tensor, n: Tensor, probe: Tensor,
                   gen: torch.Generator) -> Tensor:
        """The estimated ascent direction of "adversarial" at the boundary points ``at``, from
        ``n[i]`` label queries around point ``i`` at radius ``probe[i]`` (eq. 9 with its baseline)."""
        geo = self.geometry
        out = torch.empty_like(at)
        for count in n.unique().tolist():
            group = (n == count).nonzero().flatten()
            per = max(1, _CHUNK // count)
            for part in group.split(per):
                base, r = at[part], ops.per_sample(probe[part], at[part]).unsqueeze(1)
                u = geo.noise((part.numel(), count, *at.shape[1:]), gen, at.dtype).to(at.device)
                u = u / u.flatten(2).norm(dim=2).clamp_min(1e-12).view(*u.shape[:2], *[1] * (at.dim() - 1))
                probes = (base.unsqueeze(1) + r * u).clamp(0.0, 1.0)
                u = (probes - base.unsqueeze(1)) / r  # the directions the box let through
                phi = oracle.ask(idx[part].repeat_interleave(count), probes.flatten(0, 1)).view(-1, count).float() * 2 - 1
                mean = phi.mean(dim=1, keepdim=True)
                weight = torch.where(mean.abs() == 1, phi, phi - mean)
                v = (weight.view(*weight.shape, *[1] * (at.dim() - 1)) * u).mean(dim=1)
                out[part] = geo.ascent(v)
        return out

    def _step(self, oracle: _Oracle, cur: Tensor, idx: Tensor, direction: Tensor, xi: Tensor,
              halvings: int = 30) -> None:
        """Geometric step-size search: ``cur[idx]`` moves to ``cur + ξ·direction`` with ``ξ`` halved
        until adversarial (a point that never gets there keeps its boundary point)."""
        pending = torch.ones_like(idx, dtype=torch.bool)
        for _ in range(halvings):
            sel = (pending & (oracle.left()[idx] > 0)).nonzero().flatten()
            if sel.numel() == 0:
                break
            cand = (cur[idx[sel]] + ops.per_sample(xi[sel], direction[sel]) * direction[sel]).clamp(0.0, 1.0)
            hit = oracle.ask(idx[sel], cand)
            cur[idx[sel[hit]]] = cand[hit]
            pending[sel[hit]] = False
            xi[sel[~hit]] = xi[sel[~hit]] / 2
