"""APGD-CE, APGD-DLR and APGD-T-DLR (Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020, Algorithm 1, eq. 2 and 6).

The search (checkpoints, step-size halving, momentum 0.75, best point kept) lives in
:mod:`robustbench_lite.attacks._apgd`; this file picks the loss and the restarts.

* ``apgd-ce``: cross-entropy.  ``apgd-dlr``: the difference of logits ratio (eq. 6), which is
  invariant to shifting and scaling the logits.
* ``apgd-t-dlr``: targeted DLR ``−(Z_y − Z_t)/(Z_π1 − ½(Z_π3 + Z_π4))``, run once per target class,
  the ``n_targets`` classes with the highest clean logits other than ``y`` (AutoAttack's APGD-T),
  each on the points the earlier targets did not break.  For robust accuracy any
  misclassification counts; ``AttackOutput.target`` is the first target tried.

Start: ``x + ε·t/‖t‖`` (``t ~ U[−1,1]`` for Linf, ``N(0, I)`` for L2); restarts run on the points
no earlier restart broke.  Defaults: 100 iterations, 1 restart (the paper's settings per run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from robustbench_lite import EvasionAttack, LossFn, ops, register_attack, setting

from ._apgd import auto_search


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

    loss_fn: ClassVar[LossFn] = staticmethod(ops.ce)

    @property
    def grad_budget(self) -> float:
        return float((self.steps + 1) * self.restarts)

    def _search(self, model, x, label, loss_fn, gen, success=None):
        """Restarts of the core search; returns (x_adv, found)."""
        out = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)
        kw = {} if success is None else {"success": success}
        for _ in range(self.restarts):
            xs, ls = x[todo], label[todo]
            res = auto_search(
                model, xs, ls, loss_fn, norm=self.norm, eps=self.eps, steps=self.steps,
                x_start=self.geometry.sphere_start(xs, self.eps, gen), method="apgd",
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
        return float((self.steps + 1) * self.restarts * self.n_targets)

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
        for r in range(self.n_targets):
            label = torch.stack([y[todo], ranked[todo, r]], dim=1)
            adv, found = self._search(model, x[todo], label, _dlr_targeted, gen, success=_not_true_class)
            out[todo] = adv
            todo = todo[~found]
            if todo.numel() == 0:
                break
        return out
