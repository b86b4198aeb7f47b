"""FAB, the fast adaptive boundary attack (Croce & Hein, "Minimally distorted adversarial examples
with a fast adaptive boundary attack", ICML 2020, Algorithm 1), in Linf, L2 and L1.

A minimum-norm attack: each run walks along the linearised decision boundary towards the original
point (:mod:`._fab` has the projection onto hyperplane ∩ box and the run itself) and keeps each
point's closest adversarial.  ``AttackOutput.distances`` holds that distance (``inf`` where none
was found, 0 for points misclassified already), and the returned images are the adversarials that
lie within ``eps`` (the others are returned unchanged), so the harness reads a robust accuracy at
``eps`` from them.

* ``fab``: every other class's boundary is linearised at each step (one backward pass per class)
  and the closest one is followed.
* ``fab-t``: targeted at the ``n_targets`` classes with the highest clean logits other than ``y``
  (AutoAttack's FAB-T), one after the other: each step linearises only the boundary between ``y``
  and the target (one backward pass), so it costs about a tenth of ``fab`` per step on ten classes.
  Any misclassification counts as success, as in AutoAttack.  Where few points are left, several
  targets run side by side as one batch (as APGD-T's, :func:`~._apgd.target_group`).

Restarts (``restarts``): the first run of each target starts at ``x``; later ones at a random point
at half of ``min(eps, the closest distance found)`` from ``x`` (the norm's own noise direction).
Defaults are AutoAttack's standard version: 100 steps, 1 restart, ``α_max = 0.1``, ``η = 1.05``,
``β = 0.9`` (the paper's values).  With ``early_stop`` a point stops as soon as it has an
adversarial within ``eps``, and later targets and restarts skip it: the robust accuracy at ``eps``
is the one a full run gives on the same path, at a fraction of the cost, but its distance is then
an upper bound on the closest one rather than the closest found (the attack sets use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustbench_lite import EvasionAttack, Norm, register_attack, setting

from ._apgd import target_group
from ._fab import fab_run

#: classes ``fab``'s ordering assumes (one backward pass each): the budget of a ten-class model
_ASSUMED_CLASSES = 10


@dataclass(frozen=True, kw_only=True)
class FABBase(EvasionAttack):
    """Settings of FAB and the restarts around its runs; subclasses choose the boundaries."""

    norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2, Norm.L1)
    min_norm: ClassVar[bool] = True
    steps: int = setting(100, low=1)
    restarts: int = setting(1, low=1)
    alpha_max: float = setting(0.1, low=0.0, high=1.0)
    eta: float = setting(1.05, low=1.0)
    beta: float = setting(0.9, low=0.0, high=1.0)
    early_stop: bool = setting(False)

    def _runs(self, model, x, y, group, best_x, best_d, gen):
        """The restarts of the boundary sets ``group`` (a list of ``[B, m]`` class columns, run side
        by side as one batch) on the points still worth attacking; ``best_x``/``best_d`` keep each
        point's closest adversarial over the group (updated in place)."""
        geo, g, view = self.geometry, len(group), (-1, *([1] * (x.dim() - 1)))
        for r in range(self.restarts):
            todo = (best_d > self.eps) if self.early_stop else (best_d > 0)
            idx = todo.nonzero().flatten()
            if idx.numel() == 0:
                return
            m = idx.numel()
            xs = x[idx].repeat(g, *([1] * (x.dim() - 1)))
            start = xs
            if r > 0:  # a random start at half the smaller of eps and the closest distance so far
                t = geo.noise(tuple(xs.shape), gen, xs.dtype).to(xs.device)
                t = t / geo.distance(t).clamp_min(1e-12).view(view)
                radius = 0.5 * best_d[idx].clamp(max=self.eps).repeat(g)
                start = (xs + radius.view(view) * t).clamp(0.0, 1.0)
            adv, dist = fab_run(
                model, xs, y[idx].repeat(g), torch.cat([c[idx] for c in group]), start, norm=self.norm,
                steps=self.steps, alpha_max=self.alpha_max, eta=self.eta, beta=self.beta,
                stop_at=self.eps if self.early_stop else None,
            )
            dist, k = dist.view(g, m).min(0)  # the closest over the group (the first on a tie)
            adv = adv.view(g, m, *x.shape[1:])[k, torch.arange(m, device=x.device)]
            better = dist < best_d[idx]
            best_d[idx[better]] = dist[better]
            best_x[idx[better]] = adv[better]

    def _columns(self, logits, y):
        """The classes whose boundaries each run linearises, per target (a list of ``[B, m]``)."""
        raise NotImplementedError

    def _perturb(self, model, x, y, target, gen):
        logits = model(x)
        best_d = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        best_d[logits.argmax(1) != y] = 0.0
        best_x = x.clone()
        sets = self._columns(logits, y)
        done = 0
        while done < len(sets):  # several boundary sets side by side where few points are left
            todo = int(((best_d > self.eps) if self.early_stop else (best_d > 0)).sum())
            if todo == 0:
                break
            g = target_group(todo, len(sets) - done)
            self._runs(model, x, y, sets[done : done + g], best_x, best_d, gen)
            done += g
        inside = (best_d <= self.eps).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(inside, best_x, x), best_d


def _others(logits, y):
    """Every class but ``y``, most likely first: ``[B, K − 1]``."""
    return logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)[:, : logits.shape[1] - 1]


@register_attack("fab")
@dataclass(frozen=True, kw_only=True)
class FAB(FABBase):
    """Untargeted FAB: the closest linearised boundary among all other classes at each step."""

    @property
    def grad_budget(self) -> float:
        # one backward pass per other class and step (the model's classes are not known here)
        return float(self.steps * self.restarts * (_ASSUMED_CLASSES - 1))

    def _columns(self, logits, y):
        return [_others(logits, y)]


@register_attack("fab-t")
@dataclass(frozen=True, kw_only=True)
class FABTargeted(FABBase):
    """Targeted FAB over the ``n_targets`` most likely wrong classes (needs ``n_targets + 1``
    classes)."""

    targeted: ClassVar[bool] = True
    n_targets: int = setting(9, low=1)

    @property
    def grad_budget(self) -> float:
        # a step costs one backward and, for the points pulled back, a second forward and backward
        return float(self.steps * self.restarts * self.n_targets) * 4 / 3

    def _ranked(self, logits, y):
        if logits.shape[1] < self.n_targets + 1:
            raise ValueError(
                f"{self.name} with n_targets={self.n_targets} needs at least {self.n_targets + 1} classes, the model "
                f"has {logits.shape[1]}; lower n_targets"
            )
        return _others(logits, y)[:, : self.n_targets]

    def _choose_target(self, model, x, y, gen):
        return self._ranked(model(x), y)[:, 0]

    def _columns(self, logits, y):
        ranked = self._ranked(logits, y)
        return [ranked[:, t : t + 1] for t in range(self.n_targets)]
