"""Complete verification by branch and bound with β-CROWN bounds (Wang, Zhang, Xu, Lin, Jana,
Hsieh & Kolter, "Beta-CROWN: efficient bound propagation with per-neuron split constraints for
neural network robustness verification", NeurIPS 2021; the method of the α,β-CROWN verifier).

:meth:`~robustbench_lite.certify.Verifier.verify` returns per point ``verified``, ``falsified``
(with the adversarial example) or ``undecided``, the subdomains bounded and the seconds spent;
:meth:`BaB.decide` returns the same with the search's margin lower bounds.  Per point, in order
(every stage batched over the points it concerns):

1. the clean point, and the ``starts`` (candidate examples: the harness hands over the evasion
   cells' adversarial examples where the run saves them), are checked as counterexamples;
2. CROWN bounds every margin ``f_y − f_c`` (intermediate bounds: ``intermediate``); a point
   whose margins are all positive is verified;
3. targeted PGD (``attack_restarts`` runs of ``attack_steps``, towards the classes with the lowest
   bounds) looks for counterexamples on the rest;
4. branch and bound (:mod:`._bab`) on each remaining point: α-CROWN on its undecided margins
   (``root_iterations``), then rounds that split ``batch / 2`` subdomains and bound the children
   together with optimised ``α`` and the split constraints' multipliers ``β`` (``iterations``
   steps; :mod:`._beta`).  The neuron to split is chosen by FSB (filtered smart branching, De
   Palma et al. 2021: of the ``candidates`` best neurons by the BaBSR score of Bunel et al.,
   JMLR 2020, and the ``candidates`` best by the relaxation gap at the bound's minimiser, the one
   whose children have the best worse bound); ``branching="babsr"`` takes the BaBSR score alone.  Leaves (every unstable ReLU split) are linear programs solved exactly
   (:mod:`._leaf`); the bound minimisers and PGD from the lowest subdomains
   (``search_attack_steps``) search for counterexamples.

A point is ``falsified`` only with an example checked on the model in float32 and float64
inside the ball ∩ [0, 1] (:mod:`._falsify`), ``verified`` when every subdomain is closed, and
``undecided`` when ``timeout`` seconds (CPU time on a CPU, wall time on an accelerator) or
``max_subdomains`` subdomains are spent first.  For a ReLU network (max-pooling is relaxed, not
split) the procedure is complete: without a budget it decides every point.  Bounds and programs
are computed in float64 (the α, β iterations in ``precision``, their best iterate bounded again
in float64); ``beta=False`` and ``lp_leaves=False`` are the ablations (no split multipliers;
leaves left to their bound).

:meth:`margin_bounds` returns the search's lower bounds (per margin, the minimum over its final
subdomains); the radius bisection (:meth:`radius`) uses CROWN's bounds, since every bisection
step would be a full search.  Norm: Linf (the leaves are linear programs over the box).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.attack import eval_mode
from ..core.config import MAX_SEED, setting
from ..core.threat import Norm, ThreatModel
from . import (
    BoundVerifier,
    InputSet,
    Status,
    Verification,
    create_verifier,
    crown_margins,
    layer_bounds,
    register_verifier,
)
from ._bab import Search, Settings
from ._beta import Layout
from ._falsify import Checker, float32_box, pgd_targeted
from ._graph import parse_network


@dataclass(frozen=True)
class Decision:
    """One :meth:`BaB.decide`: the per-point outcome and the search's margin lower bounds
    (``[B, K]`` float64, ``+inf`` at ``c = y``; the minimum over each margin's final subdomains)."""

    verification: Verification
    lower: Tensor


@register_verifier("bab")
@dataclass(frozen=True, kw_only=True)
class BaB(BoundVerifier):
    """β-CROWN branch and bound: verified, falsified (with the example) or undecided per point."""

    norms = (Norm.LINF,)
    takes_starts = True
    timeout: float = setting(30.0, low=0.0, low_open=True)  # seconds of branch and bound per point
    max_subdomains: int = setting(200_000, low=1, high=10**9)  # subdomains bounded per point
    batch: int = setting(64, low=2)  # subdomains bounded together
    iterations: int = setting(10, low=0)  # α, β steps per batch
    root_iterations: int = setting(30, low=0)  # α-CROWN steps at the root
    lr_alpha: float = setting(0.1, low=0.0, low_open=True)
    lr_beta: float = setting(0.05, low=0.0, low_open=True)
    beta: bool = setting(True)  # the split multipliers (False: an ablation)
    lp_leaves: bool = setting(True)  # exact leaves (False: an ablation, incomplete)
    intermediate: str = setting("crown", choices=("crown", "ibp"))
    attack_steps: int = setting(50, low=0)  # PGD before the search
    attack_restarts: int = setting(3, low=0)
    search_attack_steps: int = setting(10, low=0)  # PGD inside the search, each round
    attack_points: int = setting(2, low=0)  # subdomains that PGD starts from, each round
    branching: str = setting("fsb", choices=("fsb", "babsr"))
    candidates: int = setting(4, low=1)  # FSB: the best neurons by each filter score, the split chosen among them
    precision: str = setting("float64", choices=("float32", "float64"))  # of the α, β iterations
    seed: int = setting(0, low=0, high=MAX_SEED)

    def decide(self, model, x: Tensor, y: Tensor, threat: ThreatModel, starts: Tensor | None = None) -> Decision:
        """:meth:`verify` (same checks, same re-check of every counterexample) with the search's
        margin lower bounds beside the outcome."""
        threat = self._check_threat(threat)
        model, x, y = self._check(model, x, y)
        starts = self._check_starts(starts, x)
        with eval_mode(model), torch.no_grad():
            out = self._run(model, x, y, self._eps(x, threat.eps), starts)
            return Decision(out.verification.recheck(model, x, y, threat), out.lower)

    def _verify(self, model, x, y, threat, starts=None):
        return self._run(model, x, y, self._eps(x, threat.eps), starts).verification

    def _bounds(self, model, x, y, norm, eps):
        return self._run(model, x, y, eps, None).lower.to(x.device)

    def _radius_bounds(self, model, x, y, norm, eps):
        crown = create_verifier("crown", intermediate=self.intermediate, batch_size=self.batch_size)
        return crown._checked_bounds(model, x, y, norm, eps)

    # -- the procedure --------------------------------------------------------------------------
    def _run(self, model, x: Tensor, y: Tensor, eps: Tensor, starts: Tensor | None) -> Decision:
        clock = _clock(x.device)
        begin = clock()
        net = parse_network(model, x[:1])
        n, k = x.shape[0], net.num_classes
        if n and int(y.max()) >= k:
            raise ValueError(f"labels must be < {k} (the model's number of logits), got {int(y.max())}")
        checker = Checker(model)
        gens = [torch.Generator(device=x.device).manual_seed(self.seed + _digest(x[i])) for i in range(n)]
        falsified, examples = checker.check(x, y, eps, x)
        if starts is not None:
            given = ~torch.isnan(starts).flatten(1).any(1) & ~falsified
            ok, ex = checker.check(x, y, eps, torch.where(_rows(given, x), starts, x))
            examples = torch.where(_rows(given & ok, x), ex, examples)
            falsified |= given & ok
        lower = torch.full((n, k), float("-inf"), dtype=torch.float64, device=x.device)
        roots = self._roots(net, x, y, eps, ~falsified, lower)
        rest = sorted(roots)
        if rest and self.attack_restarts and self.attack_steps:
            self._attack(checker, x, y, eps, lower, rest, gens, falsified, examples)
        shared = (clock() - begin) / max(1, n)
        status = [Status.FALSIFIED if f else Status.UNDECIDED for f in falsified.tolist()]
        for i in ((lower > 0).all(1) & ~falsified).nonzero()[:, 0].tolist():
            status[i] = Status.VERIFIED
        seconds = torch.full((n,), shared, dtype=torch.float64)
        subdomains = torch.zeros(n, dtype=torch.long)
        settings = Settings(self.timeout, self.max_subdomains, self.batch, self.iterations, self.root_iterations,
                            self.lr_alpha, self.lr_beta, self.beta, self.lp_leaves, self.search_attack_steps,
                            self.attack_points, self.candidates if self.branching == "fsb" else 0,
                            getattr(torch, self.precision), _clock(x.device))
        for i in rest:
            if falsified[i]:
                continue
            start = clock()
            inset = InputSet.make(x[i : i + 1].double(), Norm.LINF, eps[i : i + 1].double())
            layout = Layout.make(net, inset, roots[i])
            out = Search(layout, x[i : i + 1], int(y[i]), eps[i : i + 1], lower[i], checker, settings, gens[i]).run()
            lower[i] = out.lower
            status[i] = Status(out.status)
            if out.example is not None:
                examples[i] = out.example
            subdomains[i] = out.subdomains
            seconds[i] += clock() - start
        lower = lower.scatter(1, y[:, None], float("inf"))
        falsified = torch.tensor([s is Status.FALSIFIED for s in status], dtype=torch.bool)
        verified = torch.tensor([s is Status.VERIFIED for s in status], dtype=torch.bool)
        examples = torch.where(_rows(falsified.to(x.device), x), examples, float("nan")).cpu()
        return Decision(Verification(verified, falsified, examples, subdomains, seconds), lower.cpu())

    def _roots(self, net, x, y, eps, open_: Tensor, lower: Tensor) -> dict[int, dict]:
        """CROWN on every point (in chunks of ``batch_size``), into ``lower``; per point of
        ``open_`` it leaves undecided, its intermediate bounds (batch 1) for the search."""
        roots = {}
        for first in range(0, x.shape[0], self.batch_size):
            idx = torch.arange(first, min(first + self.batch_size, x.shape[0]), device=x.device)
            inset = InputSet.make(x[idx].double(), Norm.LINF, eps[idx].double())
            bounds, _ = layer_bounds(net, inset, self.intermediate)
            bound = crown_margins(net, bounds, inset, y[idx]).scatter(1, y[idx, None], float("inf"))
            lower[idx] = bound
            for j in (open_[idx] & ~(bound > 0).all(1)).nonzero()[:, 0].tolist():
                roots[int(idx[j])] = {key: (lo[j : j + 1], hi[j : j + 1]) for key, (lo, hi) in bounds.items()}
        return roots

    def _attack(self, checker, x, y, eps, lower, rest, gens, falsified, examples) -> None:
        """Targeted PGD on the points ``rest``, each restart towards the next lowest-bound class."""
        r = self.attack_restarts
        pts = torch.tensor(rest, device=x.device).repeat_interleave(r)
        order = lower[pts].scatter(1, y[pts, None], float("inf")).argsort(1)
        targets = order[torch.arange(pts.numel(), device=x.device), torch.arange(r, device=x.device).repeat(len(rest))
                        % max(1, lower.shape[1] - 1)]
        lo, hi = float32_box(x[pts], eps[pts])
        noise = torch.cat([torch.rand((r, *x.shape[1:]), generator=gens[i], device=gens[i].device) for i in rest])
        found = pgd_targeted(checker, x[pts], y[pts], targets, eps[pts], lo + (hi - lo) * noise.to(lo.device),
                             self.attack_steps, gens[rest[0]])
        ok, ex = checker.check(x[pts], y[pts], eps[pts], found)
        for j in ok.nonzero()[:, 0].tolist():
            i = int(pts[j])
            if not falsified[i]:
                falsified[i] = True
                examples[i] = ex[j]


def _clock(device: torch.device):
    """The budget's clock: the process's CPU time on a CPU (what a shared machine does not
    inflate), wall time where an accelerator does the work."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def _digest(x: Tensor) -> int:
    """A seed offset from the point's values, so a point's random draws do not depend on its batch."""
    return int(hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:8], 16)
