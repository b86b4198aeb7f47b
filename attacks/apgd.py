"""APGD-CE, APGD-DLR and APGD-T-DLR (Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020, Algorithm 1, eq. 2 and 6).

The search (checkpoints, step-size halving, momentum 0.75, best point kept) lives in
:mod:`robustbench_lite.attacks._apgd`; this file picks the loss and the restarts.

* ``apgd-ce``: cross-entropy.  ``apgd-dlr``: the difference of logits ratio (eq. 6), which is
  invariant to shifting and scaling the logits.
* ``apgd-t-dlr``: targeted DLR ``−(Z_y − Z_t)/(Z_π1 − ½(Z_π3 + Z_π4))``, run once per target class,
  the ``n_targets`` classes with the highest clean logits other than ``y`` (AutoAttack's APGD-T),
  each on the points the earlier targets did not break.  For robust accuracy any
  misclassification counts; ``AttackOutput.target`` is the first target tried.  Where few points
  are left, several targets run side by side as one batch (:func:`~._apgd.target_group`): a point is
  broken if any of them breaks it, the same verdict in fewer, fuller passes.

With ``eot > 1`` every gradient (and the loss and logits the search tracks) is the mean over
``eot`` passes of the model: Expectation over Transformation for randomized models (Athalye et al.,
ICML 2018, §4.3), as AutoAttack's ``rand`` version runs APGD-CE and APGD-DLR with 20 passes.

Start: ``x + ε·t/‖t‖`` (``t ~ U[−1,1]`` for Linf, ``N(0, I)`` for L2); restarts run on the points
no earlier restart broke.  Defaults: 100 iterations, 1 restart (the paper's settings per run).

The search each norm runs is the table :data:`SEARCHES`, and ``norms`` is its keys: Algorithm 1 for
Linf and L2; for L1, l1-APGD (Croce & Hein, "Mind the box", ICML 2021; :mod:`._apgd_l1`), with the
same losses, targets and restarts around it.  l1-APGD has no momentum term, so ``momentum`` must keep
its default there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from robustbench_lite import EvasionAttack, LossFn, Norm, ops, register_attack, setting

from ._apgd import SearchResult, auto_search, target_group
from ._apgd_l1 import l1_apgd


def _apgd(model, x, label, loss_fn, *, norm, eps, steps, gen, rho, alpha, **kw) -> SearchResult:
    """One APGD run (Algorithm 1) from ``x + ε·t/‖t‖``, ``t`` the norm's own noise."""
    return auto_search(
        model, x, label, loss_fn, norm=norm, eps=eps, steps=steps,
        x_start=norm.geometry.sphere_start(x, eps, gen), method="apgd", rho=rho, alpha=alpha, **kw,
    )


@dataclass(frozen=True)
class Search:
    """How APGD searches one norm's ball: one run from a fresh random start, and whether the run
    takes APGD's momentum (``alpha``)."""

    run: Callable[..., SearchResult]
    momentum: bool = True


#: the search APGD runs in each norm's ball; a norm APGD supports is one entry here
SEARCHES: dict[Norm, Search] = {
    Norm.LINF: Search(_apgd),
    Norm.L2: Search(_apgd),
    Norm.L1: Search(l1_apgd, momentum=False),
}


def _dlr_targeted(logits, label):
    return ops.dlr_targeted(logits, label[:, 0], label[:, 1])


def _not_true_class(logits, label):
    return logits.argmax(dim=1) != label[:, 0]


@dataclass(frozen=True, kw_only=True)
class APGD(EvasionAttack):
    """Shared settings of the APGD family; subclasses choose the loss."""

    steps: int = setting(100, low=1)
    restarts: int = setting(1, low=1)
    rho: float = setting(0.75, low=0.0, high=1.0)
    momentum: float = setting(0.75, low=0.0, high=1.0)
    eot: int = setting(1, low=1, keep_keys=True)  # passes each gradient averages (EOT; AutoAttack's rand version: 20)

    loss_fn: ClassVar[LossFn] = staticmethod(ops.ce)
    norms: ClassVar[tuple[Norm, ...]] = tuple(SEARCHES)

    def __post_init__(self) -> None:
        super().__post_init__()
        default = next(f.default for f in fields(APGD) if f.name == "momentum")
        if not SEARCHES[self.norm].momentum and self.momentum != default:
            raise ValueError(
                f"momentum={self.momentum:g} does not apply to {self.name} with norm {self.norm.value} (its "
                f"search has no momentum term); leave momentum at its default {default:g}"
            )

    @property
    def grad_budget(self) -> float:
        return float((self.steps + 1) * self.restarts * self.eot)

    def _search(self, model, x, label, loss_fn, gen, success=None):
        """Restarts of the core search; returns (x_adv, found)."""
        out = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)
        kw = {} if success is None else {"success": success}
        if self.eot > 1:
            kw["draws"] = self.eot
        for _ in range(self.restarts):
            xs, ls = x[todo], label[todo]
            res = SEARCHES[self.norm].run(
                model, xs, ls, loss_fn, norm=self.norm, eps=self.eps, steps=self.steps, gen=gen,
                rho=self.rho, alpha=self.momentum, **kw,
            )
            out[todo] = res.x_adv
            found[todo] = res.found
            todo = todo[~res.found]
            if todo.numel() == 0:
                break
        return out, found

    def _perturb(self, model, x, y, target, gen):
        return self._search(model, x, y, type(self).loss_fn, gen)[0]


@register_attack("apgd-ce")
@dataclass(frozen=True, kw_only=True)
class APGDCE(APGD):
    """APGD on the cross-entropy loss."""

    loss_fn: ClassVar[LossFn] = staticmethod(ops.ce)


@register_attack("apgd-dlr")
@dataclass(frozen=True, kw_only=True)
class APGDDLR(APGD):
    """APGD on the DLR loss (needs at least 3 classes)."""

    loss_fn: ClassVar[LossFn] = staticmethod(ops.dlr)


@register_attack("apgd-t-dlr")
@dataclass(frozen=True, kw_only=True)
class APGDTargetedDLR(APGD):
    """APGD on the targeted DLR loss, over the ``n_targets`` most likely wrong classes (needs at
    least ``n_targets + 1`` and 4 classes)."""

    targeted: ClassVar[bool] = True
    n_targets: int = setting(9, low=1)

    @property
    def grad_budget(self) -> float:
        return float((self.steps + 1) * self.restarts * self.n_targets * self.eot)

    def _ranked_targets(self, model, x, y):
        logits = model(x)
        if logits.shape[1] < max(4, self.n_targets + 1):
            raise ValueError(
                f"{self.name} needs at least {max(4, self.n_targets + 1)} classes, the model has "
                f"{logits.shape[1]}; lower n_targets"
            )
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        return ranked[:, : self.n_targets]

    def _choose_target(self, model, x, y, gen):
        return self._ranked_targets(model, x, y)[:, 0]

    def _perturb(self, model, x, y, target, gen):
        ranked = self._ranked_targets(model, x, y)
        out = x.clone()
        todo = torch.arange(x.shape[0], device=x.device)
        r = 0
        while r < self.n_targets and todo.numel():
            g, m = target_group(todo.numel(), self.n_targets - r), todo.numel()
            label = torch.cat([torch.stack([y[todo], ranked[todo, k]], dim=1) for k in range(r, r + g)])
            adv, found = self._search(model, x[todo].repeat(g, 1, 1, 1), label, _dlr_targeted, gen, success=_not_true_class)
            found = found.view(g, m)
            hit = found.any(0)  # per point: the first target that broke it, else the group's last
            pick = torch.where(hit, found.float().argmax(0), torch.full_like(todo, g - 1))
            out[todo] = adv.view(g, m, *x.shape[1:])[pick, torch.arange(m, device=x.device)]
            todo = todo[~hit]
            r += g
        return out
