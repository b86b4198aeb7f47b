"""The bracket of an evasion row: what is proven about each point, between the two bounds.

Attacks give an upper bound on robust accuracy (the per-point worst case: a point an attack broke
is not robust); sound verifiers give a lower bound (a certified point has no adversarial example in
the ball).  On the same ``n`` points and threat, every point is one of

* *certified*: proven robust by some verifier;
* *broken*: an attack found an adversarial example, or a complete verifier returned one that a
  forward pass re-checked (a point a verifier breaks is broken, whatever the attacks found);
* *undecided*: neither, so the true robust accuracy lies in ``[certified, worst case]`` and the
  row is *exact* when no point is left undecided.

A point both certified and broken is a soundness bug (``certified-broken``), never noise.  The
formulation follows the complete-verification view of Tjeng, Xiao & Tedrake, "Evaluating
robustness of neural networks with mixed integer programming" (ICLR 2019), who report for each
point verified / adversarial / timed out, and Bunel et al. (2018/2020) for branch and bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.threat import ThreatModel
from .flags import CERTIFIED_BROKEN

__all__ = ["COLUMNS", "Bracket", "Proof", "attacked_part", "bracket", "columns", "on_row"]

#: the bracket's leaderboard columns, in order (from a worst case's metrics: :func:`columns`)
COLUMNS = ("certified", "undecided", "exact", "falsified_by")
#: the metrics key of the points only a proof broke (the attacks' own worst case is recovered with it)
PROOF_BROKEN = "_proof_broken"
#: every metrics key a bracket writes
KEYS = frozenset({*COLUMNS, "verifiers", PROOF_BROKEN})


@dataclass(frozen=True)
class Proof:
    """What one source (a verifier, named by ``source``) proved about the first ``n`` test points
    under ``threat``: ``robust`` points (bool ``[n]``, certified in the whole ball) and ``broken``
    ones (bool ``[n]``, an adversarial example re-checked by a forward pass)."""

    source: str
    threat: ThreatModel
    robust: Tensor
    broken: Tensor

    def __post_init__(self) -> None:
        if self.robust.shape != self.broken.shape or self.robust.dim() != 1:
            raise ValueError(f"a proof needs robust and broken masks of one shape [n], got {tuple(self.robust.shape)} "
                             f"and {tuple(self.broken.shape)}")

    @property
    def n(self) -> int:
        return int(self.robust.shape[0])


@dataclass(frozen=True)
class Bracket:
    """One row's points: ``robust`` (the worst case after the proofs: attacked and not falsified),
    ``certified`` (proven robust by any source), ``attacked`` (the attacks' worst case alone) and,
    per source that broke points, how many of them the attacks had left robust."""

    attacked: Tensor
    robust: Tensor
    certified: Tensor
    sources: tuple[str, ...]
    falsified_by: dict[str, int]

    @property
    def undecided(self) -> Tensor:
        """Bool ``[n]``: neither certified nor broken."""
        return self.robust & ~self.certified

    @property
    def certified_broken(self) -> Tensor:
        """Bool ``[n]``: certified by a source yet broken (an unsound certificate or counterexample)."""
        return self.certified & ~self.robust

    @property
    def exact(self) -> bool:
        """Nothing is undecided and nothing contradicts: the worst case is the robust accuracy."""
        return not bool(self.undecided.any()) and not bool(self.certified_broken.any())

    def share(self, mask: Tensor) -> float:
        return float(mask.float().mean()) if mask.numel() else float("nan")

    def metrics(self) -> dict[str, Any]:
        """The bracket as a worst case's metrics (JSON values)."""
        return {
            "certified": self.share(self.certified), "undecided": self.share(self.undecided), "exact": self.exact,
            "verifiers": "+".join(self.sources), "falsified_by": self.falsified_by,
            PROOF_BROKEN: (self.attacked & ~self.robust).nonzero()[:, 0].tolist(),
        }


def bracket(attacked: Tensor, proofs: Iterable[Proof]) -> Bracket:
    """The bracket of ``attacked`` (bool ``[n]``: robust to every attack) given ``proofs`` on the
    same ``n`` points: their broken points removed, their robust points ORed (whatever order they
    come in)."""
    attacked = attacked.cpu().bool()
    robust, certified = attacked.clone(), torch.zeros_like(attacked)
    broken_by: dict[str, Tensor] = {}
    for p in proofs:
        if p.n != attacked.shape[0]:
            raise ValueError(f"a proof by {p.source} covers {p.n} points, the row {attacked.shape[0]}: pass proofs on the same points")
        broken = p.broken.cpu().bool()
        broken_by[p.source] = broken_by.get(p.source, torch.zeros_like(attacked)) | broken
        certified |= p.robust.cpu().bool()
        robust &= ~broken
    found = {s: int((b & attacked).sum()) for s, b in sorted(broken_by.items()) if bool(b.any())}
    return Bracket(attacked, robust, certified, tuple(sorted(broken_by)), found)


def on_row(attacked: Tensor, threat: ThreatModel, proofs: Sequence[Proof]) -> tuple[Tensor, dict[str, Any], set[str]]:
    """A worst case (``attacked``, under ``threat``) after the proofs on its points (same threat and
    number of points): its robust mask, the bracket's metrics, and ``certified-broken`` where a
    certified point is broken; the mask unchanged, no metrics and no flag when no proof covers it."""
    mine = [p for p in proofs if p.threat == threat and p.n == attacked.numel()]
    if not mine:
        return attacked, {}, set()
    b = bracket(attacked, mine)
    return b.robust, b.metrics(), {CERTIFIED_BROKEN} if bool(b.certified_broken.any()) else set()


def attacked_part(robust: Tensor, metrics: Mapping[str, Any]) -> Tensor:
    """The attacks' own worst case behind a stored, bracketed one: its robust points plus those only
    a proof broke."""
    index = metrics.get(PROOF_BROKEN) or []
    out = robust.clone().bool()
    if index:
        out[torch.as_tensor(list(index), dtype=torch.long)] = True
    return out


def columns(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A bracketed worst case's leaderboard columns (:data:`COLUMNS`): ``falsified_by`` names each
    source that broke points the attacks had left robust, with their count (``bab:3``)."""
    found = metrics.get("falsified_by") or {}
    return {
        "certified": metrics["certified"], "undecided": metrics.get("undecided"), "exact": bool(metrics.get("exact")),
        "falsified_by": ";".join(f"{name}:{count}" for name, count in sorted(found.items()) if count),
    }
