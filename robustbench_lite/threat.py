"""Threat models: which norm, how large a budget, what kind of attack.

Strings are parsed to enums here, at the boundary; everything inside the library works with
the enums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Norm(str, Enum):
    """The distance an evasion budget is measured in. ``L0`` counts changed pixels."""

    LINF = "linf"
    L2 = "l2"
    L0 = "l0"

    @classmethod
    def parse(cls, value: Norm | str) -> Norm:
        if isinstance(value, Norm):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("_", "").replace("-", "")
            aliases = {"linf": "linf", "inf": "linf", "l∞": "linf", "l2": "l2", "2": "l2", "l0": "l0", "0": "l0"}
            if key in aliases:
                return cls(aliases[key])
        raise ValueError(f"unknown norm {value!r}; use one of {[n.value for n in cls]}")

    def __str__(self) -> str:
        return self.value


class AttackKind(str, Enum):
    """How an attack is evaluated: per point, one perturbation for all points, or at training time."""

    EVASION = "evasion"
    UNIVERSAL = "universal"
    POISONING = "poisoning"

    def __str__(self) -> str:
        return self.value


def check_eps(eps: object, norm: Norm) -> float:
    """Return ``eps`` as a float or raise a ``ValueError``/``TypeError`` that says what is allowed."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if norm is Norm.LINF and eps > 1:
        raise ValueError(f"Linf eps on images in [0, 1] must be <= 1, got {eps}; did you mean {eps}/255?")
    if norm is Norm.L0 and eps != int(eps):
        raise ValueError(f"L0 eps counts pixels and must be a whole number, got {eps}")
    return eps


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball: ``ThreatModel(Norm.LINF, 0.1)`` or ``ThreatModel("l2", 1.5)``."""

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        norm = Norm.parse(self.norm)
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", check_eps(self.eps, norm))

    @property
    def label(self) -> str:
        """Short stable label used in file names and tables, e.g. ``linf_0.1``."""
        return f"{self.norm.value}_{self.eps:g}"

    @classmethod
    def parse(cls, text: str) -> ThreatModel:
        """Parse ``"linf:0.1"``, ``"l2:1.5"`` or ``"linf_0.1"``."""
        for sep in (":", "_", "="):
            if sep in text:
                norm, eps = text.split(sep, 1)
                try:
                    value = float(eps)
                except ValueError:
                    break
                return cls(Norm.parse(norm), value)
        raise ValueError(f"cannot parse threat {text!r}; write it as NORM:EPS, e.g. 'linf:0.1' or 'l2:1.5'")
