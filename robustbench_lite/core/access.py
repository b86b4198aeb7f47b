"""What a model lets an attacker see: its gradients, its scores, or only its predicted label.

A model behind an API may answer a query with its logits (a score-based attacker, such as Square,
can use them) or with the predicted class alone (only a decision-based attacker, such as
HopSkipJump, can work with that).  :class:`Access` names the three levels, ordered
``LABELS < SCORES < GRADIENTS``.

* Each attack says what it needs by its capability tags (``needs_grad``, ``needs_scores``; see
  :attr:`robustbench_lite.core.attack.Attack.access`).
* A model says what it gives by an ``output_access`` attribute on any of its modules;
  ``model_access`` reads the most restrictive one (a model without any gives gradients).
  :class:`LabelOnly` and :class:`ScoresOnly` wrap a network to give less, so a white-box network
  can be evaluated as the black box it will be deployed as.

The attack base class refuses an attack that needs more than the model gives, with one line
naming the fix; the evaluation skips such an attack with a note in its row instead of running it
on outputs it should not see.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Access", "LabelOnly", "ModelView", "ScoresOnly", "access_note", "model_access", "restrict"]


class Access(str, Enum):
    """How much of a model an attacker sees, from least to most."""

    LABELS = "labels"
    SCORES = "scores"
    GRADIENTS = "gradients"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def covers(self, needed: Access) -> bool:
        """This access is enough for an attack that needs ``needed``."""
        return self.rank >= needed.rank

    @classmethod
    def parse(cls, value: Access | str) -> Access:
        if isinstance(value, Access):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for a in cls:
                if key in (a.value, a.value.rstrip("s")):
                    return a
        raise ValueError(f"unknown model access {value!r}; use one of {[a.value for a in cls]}")

    def __str__(self) -> str:
        return self.value


_RANK = {Access.LABELS: 0, Access.SCORES: 1, Access.GRADIENTS: 2}


def restrict(model: nn.Module, access: Access | str) -> nn.Module:
    """``model`` as seen with ``access``: wrapped in :class:`LabelOnly` or :class:`ScoresOnly`, or
    itself for gradients."""
    wrapper = {Access.LABELS: LabelOnly, Access.SCORES: ScoresOnly}.get(Access.parse(access))
    return model if wrapper is None else wrapper(model)


def model_access(model: nn.Module) -> Access:
    """The least access any module of ``model`` declares by its ``output_access`` attribute
    (``Access.GRADIENTS`` when none does): a wrapper anywhere in the stack limits the whole."""
    found = [Access.parse(a) for m in model.modules() if (a := getattr(m, "output_access", None)) is not None]
    return min(found, key=lambda a: a.rank, default=Access.GRADIENTS)


def access_note(attack_name: str, needed: Access, given: Access) -> str:
    """The one line that says why ``attack_name`` cannot run on a model that gives ``given``."""
    what = {Access.GRADIENTS: "input gradients", Access.SCORES: "output scores", Access.LABELS: "predicted labels"}
    fix = "a decision-based attack such as hsj" if given is Access.LABELS else "a score-based attack such as square"
    return (f"{attack_name} needs the model's {what[needed]}, but the model gives only its {what[given]} "
            f"({given.value} access); use {fix}")


class ModelView(nn.Module):
    """A model seen through an API that gives less than the model (see the subclasses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} wraps a torch.nn.Module, got {type(model).__name__}")
        self.wrapped = model


class LabelOnly(ModelView):
    """``model`` seen through an API that returns only the predicted class.

    The output is the one-hot row of the argmax of ``model``'s logits (so ``argmax`` and accuracy
    work unchanged) and carries no gradient: a score or gradient attack learns nothing from it,
    and the evaluation skips those attacks instead (see ``model_access``)."""

    output_access: ClassVar[Access] = Access.LABELS

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self.wrapped(x)
        top = logits.argmax(dim=1, keepdim=True)
        return torch.zeros_like(logits).scatter_(1, top, 1.0)


class ScoresOnly(ModelView):
    """``model`` seen through an API that returns its scores (logits) but no gradient."""

    output_access: ClassVar[Access] = Access.SCORES

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.wrapped(x)
