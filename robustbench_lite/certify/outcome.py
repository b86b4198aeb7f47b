"""Per-point verification outcomes: ``verified``, ``falsified`` (with a re-checked adversarial
example) or ``undecided``.

A sound incomplete verifier (interval bounds, Gowal et al. 2018; CROWN, Zhang et al. 2018;
alpha-CROWN, Xu et al. 2021) proves some points robust and leaves every other point undecided.  A
complete verifier (branch and bound: Bunel et al., "A unified view of piecewise linear neural
network verification", 2018; beta-CROWN, Wang et al. 2021) also *falsifies* points: it returns an
input inside the threat ball ∩ [0, 1] that the model misclassifies.  A falsified point is a proof
that the point is not robust, so the benchmark's attacked worst case (an upper bound on robust
accuracy) drops it, and the row's bracket ``certified ≤ robust accuracy ≤ worst case`` narrows.

:class:`Verification` holds one run over ``B`` points; :meth:`Verification.from_certified` maps an
incomplete verifier's certified mask to it.  :meth:`Verification.recheck` is the forward-pass check
every counterexample goes through before anyone trusts it (the verifier base runs it, and so does
the harness): a counterexample outside the ball or the box, non-finite, or classified correctly is
rejected and its point counted undecided, never falsified.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor, nn

from ..core.threat import ThreatModel

__all__ = ["BOX_TOL", "Status", "Verification"]

#: slack on the [0, 1] box when re-checking a counterexample (float rounding; the point is then clamped)
BOX_TOL = 1e-5


class Status(str, Enum):
    """What a verifier concluded about one point."""

    VERIFIED = "verified"  # proven robust: no input in the threat ball ∩ [0, 1] is misclassified
    FALSIFIED = "falsified"  # proven not robust: a re-checked adversarial example is attached
    UNDECIDED = "undecided"  # neither (an incomplete verifier's bound was loose, or a budget ran out)


def _bool_vector(value: object, name: str, n: int | None) -> Tensor:
    if not isinstance(value, Tensor) or value.dtype != torch.bool or value.dim() != 1:
        got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"Verification.{name} must be a 1-d bool tensor (one entry per point), got {got}")
    if n is not None and value.shape[0] != n:
        raise ValueError(f"Verification.{name} has {value.shape[0]} entries for {n} points; give one per point")
    return value.cpu()


@dataclass(frozen=True)
class Verification:
    """One verifier run over ``B`` points.

    ``verified`` and ``falsified`` are disjoint bool ``[B]`` masks; every other point is undecided.
    ``counterexamples`` has the shape of the points (``[B, C, H, W]``): row ``b`` is an adversarial
    example for ``x[b]`` wherever ``falsified[b]`` (other rows are ignored; ``None`` when nothing is
    falsified).  ``subdomains`` counts the branch-and-bound subdomains explored per point (0 for an
    incomplete verifier), ``seconds`` the time spent per point.  ``rejected`` marks points whose
    claimed counterexample failed :meth:`recheck` (they are undecided).  All tensors live on the CPU.
    """

    verified: Tensor
    falsified: Tensor
    counterexamples: Tensor | None = None
    subdomains: Tensor | None = None  # int64 [B]; None: zeros
    seconds: Tensor | None = None  # float64 [B]; None: zeros
    rejected: Tensor | None = None  # bool [B]; None: none rejected

    def __post_init__(self) -> None:
        verified = _bool_vector(self.verified, "verified", None)
        n = verified.shape[0]
        falsified = _bool_vector(self.falsified, "falsified", n)
        if bool((verified & falsified).any()):
            raise ValueError("a point cannot be both verified and falsified: the verifier is unsound; fix it")
        cex = self.counterexamples
        if cex is not None:
            if not isinstance(cex, Tensor) or cex.dim() < 2 or cex.shape[0] != n or not cex.is_floating_point():
                got = tuple(cex.shape) if isinstance(cex, Tensor) else type(cex).__name__
                raise TypeError(f"Verification.counterexamples must be a float tensor [B, ...] with B={n}, got {got}")
            cex = cex.detach().cpu()
        elif bool(falsified.any()):
            raise ValueError("falsified points need their adversarial examples: pass counterexamples (shape of the points)")
        subdomains = torch.zeros(n, dtype=torch.int64) if self.subdomains is None else self.subdomains
        seconds = torch.zeros(n, dtype=torch.float64) if self.seconds is None else self.seconds
        for name, value in (("subdomains", subdomains), ("seconds", seconds)):
            if not isinstance(value, Tensor) or value.shape != (n,):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"Verification.{name} must be a tensor of shape ({n},) (one entry per point), got {got}")
        rejected = torch.zeros(n, dtype=torch.bool) if self.rejected is None else _bool_vector(self.rejected, "rejected", n)
        object.__setattr__(self, "verified", verified)
        object.__setattr__(self, "falsified", falsified)
        object.__setattr__(self, "counterexamples", cex)
        object.__setattr__(self, "subdomains", subdomains.detach().cpu().to(torch.int64))
        object.__setattr__(self, "seconds", seconds.detach().cpu().to(torch.float64))
        object.__setattr__(self, "rejected", rejected & ~falsified)

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_certified(cls, certified: Tensor, seconds: float = 0.0) -> Verification:
        """An incomplete verifier's outcome: its certified points verified, the rest undecided
        (``seconds``, the run's time, spread evenly over the points)."""
        certified = _bool_vector(certified, "verified", None)
        n = certified.shape[0]
        per_point = torch.full((n,), float(seconds) / n if n else 0.0, dtype=torch.float64)
        return cls(certified, torch.zeros(n, dtype=torch.bool), seconds=per_point)

    # -- views --------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.verified.shape[0])

    @property
    def undecided(self) -> Tensor:
        """Bool ``[B]``: neither verified nor falsified."""
        return ~(self.verified | self.falsified)

    def status(self) -> list[Status]:
        """The status of every point, in order."""
        return [
            Status.VERIFIED if v else Status.FALSIFIED if f else Status.UNDECIDED
            for v, f in zip(self.verified.tolist(), self.falsified.tolist(), strict=True)
        ]

    def counts(self) -> dict[Status, int]:
        """How many points have each status."""
        return {
            Status.VERIFIED: int(self.verified.sum()),
            Status.FALSIFIED: int(self.falsified.sum()),
            Status.UNDECIDED: int(self.undecided.sum()),
        }

    def adversarial(self) -> tuple[Tensor, Tensor]:
        """``(index, x_adv)``: the falsified points' indices (int64 ``[F]``) and their adversarial
        examples ``[F, ...]``."""
        index = self.falsified.nonzero()[:, 0]
        if self.counterexamples is None:
            return index, torch.zeros(0)
        return index, self.counterexamples[index]

    # -- the check every counterexample goes through ---------------------------------------------------
    @torch.no_grad()
    def recheck(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, chunk: int = 1000) -> Verification:
        """This outcome with every counterexample checked by a forward pass of ``model`` (in eval
        mode, the caller's job) at the point itself: finite, inside ``[0, 1]`` (within
        ``BOX_TOL``, then clamped), inside the threat ball around ``x`` (the norm's float
        slack, as for attacks) and misclassified (argmax ≠ ``y``, or a non-finite output, as the
        evaluation counts it).  A point that fails is moved to undecided and marked ``rejected``;
        the kept counterexamples are the clamped points that were judged."""
        if x.shape[0] != self.n or y.shape[0] != self.n:
            raise ValueError(f"recheck needs the {self.n} points the verification is about, got {x.shape[0]}")
        idx = self.falsified.nonzero()[:, 0]
        cex = self.counterexamples
        if idx.numel() == 0 or cex is None:  # (__post_init__: falsified points have counterexamples)
            return self
        if cex.shape[1:] != x.shape[1:]:
            raise ValueError(f"counterexamples have shape {tuple(cex.shape[1:])} per point, the points {tuple(x.shape[1:])}")
        ref = x[idx.to(x.device)]
        cand = cex[idx].to(device=x.device, dtype=x.dtype)
        flat = cand.flatten(1)
        ok = torch.isfinite(flat).all(1) & (flat.min(1).values >= -BOX_TOL) & (flat.max(1).values <= 1 + BOX_TOL)
        cand = torch.where(torch.isfinite(cand), cand, ref).clamp(0.0, 1.0)
        ok &= threat.geometry.inside(cand - ref, threat.eps)
        labels = y[idx.to(y.device)].to(x.device)
        broken = torch.zeros_like(ok)
        for i in range(0, idx.numel(), chunk):
            out = model(cand[i : i + chunk])
            finite = torch.isfinite(out).all(1)
            broken[i : i + chunk] = ~(finite & (out.argmax(1) == labels[i : i + chunk]))
        ok = (ok & broken).cpu()
        falsified = self.falsified.clone()
        falsified[idx[~ok]] = False
        rejected = self.rejected.clone()
        rejected[idx[~ok]] = True
        kept = cex.clone()
        kept[idx] = cand.cpu().to(cex.dtype)
        return replace(self, falsified=falsified, rejected=rejected, counterexamples=kept)
