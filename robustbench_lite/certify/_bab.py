"""Branch and bound for one point (the search of the ``bab`` verifier).

The pool holds the open subdomains of every specification ``f_y − f_c`` still undecided, as
tensors with a leading subdomain dimension (split signs, α, β, bound, next neuron to split).
Each round takes the subdomains with the lowest bounds, splits each on its chosen neuron
(both phases), bounds all children in one batched β-CROWN pass (:mod:`._beta`), and then:

* a child whose bound is positive is verified and leaves the pool;
* every child's worst input under its bound (the box minimiser of its linear bound) is run
  through the model, and PGD runs from the lowest ones: any candidate that passes the
  counterexample check (:mod:`._falsify`) falsifies the point;
* a child with every unstable neuron split is a leaf, solved exactly as a linear program
  (:mod:`._leaf`); one the program can neither verify nor falsify is a stuck leaf;
* the others get their next neuron (FSB over BaBSR and relaxation-gap candidates, or BaBSR
  alone; :mod:`._beta`) and return to the pool.

The point is verified when the pool empties with no stuck leaf, falsified at the first checked
counterexample, and undecided when the time limit or the subdomain cap is reached first (or a
leaf is stuck).  Every bound is sound, so the minimum over the subdomains of a specification,
open and closed, is a lower bound of its margin over the ball.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ._beta import Layout, babsr, fsb, gap_scores, optimize
from ._falsify import Checker, pgd_targeted
from ._leaf import solve_leaf

log = logging.getLogger(__name__)


@dataclass
class Settings:
    timeout: float
    max_subdomains: int
    batch: int
    iterations: int
    root_iterations: int
    lr_alpha: float
    lr_beta: float
    use_beta: bool
    lp_leaves: bool
    attack_steps: int
    attack_points: int
    candidates: int  # FSB's candidates per filter and subdomain (0: BaBSR alone)
    dtype: torch.dtype  # of the α, β iterations
    clock: Callable[[], float]  # process CPU time on CPU, wall time on an accelerator


@dataclass
class Pool:
    spec: Tensor  # [N] the class c of f_y − f_c
    signs: Tensor  # [N, U] int8: 0 unsplit, +1 active, −1 inactive
    alpha: Tensor  # [N, U]
    beta: Tensor  # [N, U]
    lower: Tensor  # [N]
    branch: Tensor  # [N] the neuron to split next (−1: none left)
    lam: Tensor  # [N] the bound's coefficient of that neuron's output (for the children's β)

    def take(self, idx: Tensor) -> Pool:
        return Pool(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def cat(self, other: Pool) -> Pool:
        return Pool(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)})

    def __len__(self) -> int:
        return self.spec.shape[0]


@dataclass
class Outcome:
    status: str  # "verified", "falsified" or "undecided"
    example: Tensor | None
    lower: Tensor  # [K] per class
    subdomains: int
    rounds: int


class Search:
    """The branch and bound of one point; :meth:`run` decides it."""

    def __init__(self, layout: Layout, x: Tensor, y: int, eps: Tensor, root_lower: Tensor, checker: Checker,
                 settings: Settings, gen: torch.Generator) -> None:
        self.layout, self.x, self.y, self.eps = layout, x, y, eps
        self.checker, self.cfg, self.gen = checker, settings, gen
        self.lower = root_lower.clone()  # [K]: per class, min over closed subdomains (root bound to start)
        self.root_lower = root_lower.clone()
        self.eye = torch.eye(root_lower.shape[0], dtype=layout.inset.x.dtype, device=x.device)
        self.bias = layout.preact_bias()
        self.lo_u, self.hi_u = layout.root_interval()
        self.count, self.rounds, self.stuck = 0, 0, False
        self.example: Tensor | None = None

    def run(self) -> Outcome:
        start = self.cfg.clock()
        todo = [c for c in range(self.lower.shape[0]) if c != self.y and float(self.lower[c]) <= 0]
        spec = torch.tensor(todo, dtype=torch.long, device=self.x.device)
        n, u = len(todo), self.layout.size
        signs = torch.zeros(n, u, dtype=torch.int8, device=self.x.device)
        alpha = self.layout.root_alpha().expand(n, u)
        self.lower[spec] = float("inf")
        root = self.root_lower[spec]
        pool = self._bound(spec, signs, alpha, torch.zeros_like(alpha), self.cfg.root_iterations, root)
        while self.example is None and pool is not None and len(pool):
            if self.cfg.clock() - start > self.cfg.timeout or self.count >= self.cfg.max_subdomains:
                break
            self.rounds += 1
            pool = pool.take(pool.lower.argsort())
            pick, rest = pool.take(slice(0, max(1, self.cfg.batch // 2))), pool.take(slice(max(1, self.cfg.batch // 2), None))
            children = self._split(pick)
            pool = self._bound(children.spec, children.signs, children.alpha, children.beta, self.cfg.iterations,
                               children.lower)
            pool = rest if pool is None else rest.cat(pool)
            if log.isEnabledFor(logging.DEBUG) and pool is not None and len(pool):
                log.debug("round %d: %d subdomains bounded, %d open, lowest bound %.5f, %.1f s", self.rounds,
                          self.count, len(pool), float(pool.lower.min()), self.cfg.clock() - start)
        open_ = pool if pool is not None else None
        lower = self.lower.clone()
        if open_ is not None and len(open_):
            lower.scatter_reduce_(0, open_.spec, open_.lower.to(lower.dtype), "amin")
        if self.example is not None:
            status = "falsified"
        elif (open_ is None or not len(open_)) and not self.stuck:
            status = "verified"
        else:
            status = "undecided"
        return Outcome(status, self.example, lower, self.count, self.rounds)

    # -- one batch of subdomains -----------------------------------------------------------------
    def _split(self, pool: Pool) -> Pool:
        """Both phases of each subdomain's branching neuron (inherits α and β).  Where the
        neuron's output has a coefficient ``λ ≥ 0`` (its lower line ``αz`` in the bound), the new
        multiplier starts at ``λ(1 − α)`` (active) or ``λα`` (inactive): then the child's bound
        starts exactly at its parent's, and the optimisation only climbs from there."""
        both = pool.take(torch.arange(len(pool), device=self.x.device).repeat(2))
        rows = torch.arange(len(both), device=self.x.device)
        phase = torch.ones(len(both), dtype=torch.int8, device=self.x.device)
        phase[len(pool):] = -1
        signs = both.signs.clone()
        signs[rows, both.branch] = phase
        beta = both.beta.clone()
        a = both.alpha[rows, both.branch].to(beta.dtype)
        lam = both.lam.to(beta.dtype).clamp(min=0)
        beta[rows, both.branch] = torch.where(phase > 0, lam * (1 - a), lam * a)
        return Pool(both.spec, signs, both.alpha, beta, both.lower, both.branch, both.lam)

    def _bound(self, spec: Tensor, signs: Tensor, alpha: Tensor, beta: Tensor, steps: int, parent: Tensor) -> Pool | None:
        """Bound a batch, try its candidates, close what is decided; the open rest as a pool.
        A child's region lies in its parent's, so the parent's bound holds for it too."""
        rows = self.eye[self.y][None] - self.eye[spec]
        lower, alpha, beta, a_in, record = optimize(self.layout, rows, signs, alpha, beta, steps, self.cfg.lr_alpha,
                                                    self.cfg.lr_beta, self.cfg.use_beta, self.cfg.dtype)
        lower = torch.maximum(lower, parent.to(lower.dtype))
        self.count += len(spec)
        inset = self.layout.inset
        worst = torch.where(a_in > 0, inset.lo, inset.hi)  # the box minimiser of each linear bound
        if self._falsify(worst, spec, lower):
            self._close(spec, lower)  # the batch's bounds stay part of the partition's minimum
            return None
        verified = lower > 0
        self._close(spec[verified], lower[verified])
        keep = ~verified
        if not bool(keep.any()):
            return None
        spec, signs, alpha, beta, lower = spec[keep], signs[keep], alpha[keep], beta[keep], lower[keep]
        record = {k: v[keep] for k, v in record.items()}
        scores = babsr(self.layout, record, signs, self.bias, self.lo_u, self.hi_u)
        if self.cfg.candidates > 0:
            gaps = gap_scores(self.layout, record, signs, alpha, worst[keep])
            branch = fsb(self.layout, self.eye[self.y][None] - self.eye[spec], signs, alpha, beta, [scores, gaps],
                         self.cfg.candidates, self.cfg.use_beta, self.cfg.dtype)
        else:
            free = (signs == 0).any(1)
            branch = torch.where(free, scores.argmax(1), -1) if scores.shape[1] else torch.full_like(spec, -1)
        leaf = branch < 0
        lam_all = self.layout.compact({k: record[k][:, 0] for k in self.layout.relus})
        lam = lam_all.gather(1, branch.clamp(min=0)[:, None])[:, 0] if lam_all.shape[1] else torch.zeros_like(lower)
        for i in leaf.nonzero()[:, 0].tolist():
            self._leaf(int(spec[i]), signs[i], float(lower[i]))
            if self.example is not None:
                self._close(spec, lower)
                return None
        keep = ~leaf
        return Pool(spec[keep], signs[keep], alpha[keep], beta[keep], lower[keep], branch[keep], lam[keep])

    def _leaf(self, c: int, signs: Tensor, bound: float) -> None:
        value, point = solve_leaf(self.layout, self.eye[self.y] - self.eye[c], signs) if self.cfg.lp_leaves \
            else (bound, None)
        if value > 0:
            self._close(torch.tensor([c], device=self.x.device), torch.tensor([value], dtype=self.lower.dtype))
            return
        if point is not None and self._check(point[None], torch.tensor([c], device=self.x.device)):
            return
        self.stuck = True
        self._close(torch.tensor([c], device=self.x.device), torch.tensor([max(value, bound)], dtype=self.lower.dtype))

    def _close(self, spec: Tensor, lower: Tensor) -> None:
        if spec.numel():
            self.lower.scatter_reduce_(0, spec, lower.to(self.lower.dtype).to(self.lower.device), "amin")

    # -- counterexamples ------------------------------------------------------------------------
    def _falsify(self, worst: Tensor, spec: Tensor, lower: Tensor) -> bool:
        """Check the bound minimisers whose margin is negative, then PGD from the lowest ones."""
        logits = self.checker.logits(worst)
        margin = logits[:, self.y] - logits.gather(1, spec[:, None])[:, 0]
        bad = (margin < 0).nonzero()[:, 0]
        if bad.numel() and self._check(worst[bad], spec[bad]):
            return True
        k = min(self.cfg.attack_points, len(spec))
        if k == 0 or self.cfg.attack_steps == 0:
            return False
        idx = lower.argsort()[:k]
        xs = self.x.expand(k, *self.x.shape[1:])
        found = pgd_targeted(self.checker, xs, torch.full((k,), self.y, device=self.x.device), spec[idx],
                             self.eps.expand(k), worst[idx], self.cfg.attack_steps, self.gen)
        return self._check(found, spec[idx])

    def _check(self, cand: Tensor, spec: Tensor) -> bool:
        k = cand.shape[0]
        ok, ex = self.checker.check(self.x.expand(k, *self.x.shape[1:]), torch.full((k,), self.y, device=self.x.device),
                                    self.eps.expand(k), cand)
        if bool(ok.any()):
            self.example = ex[ok.nonzero()[0, 0]]
            return True
        return False
