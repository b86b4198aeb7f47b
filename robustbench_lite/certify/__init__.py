"""Certificates: verifiers that prove a model robust at a point, in a registry.

A verifier is a frozen dataclass of its settings (a :class:`~robustbench_lite.core.config.Plugin`)
plus one method.  The base class :class:`Verifier` owns the checks (model, images in ``[0, 1]``
NCHW, labels, the threat's norm against the verifier's ``norms``), puts the model in eval mode for
the call and restores every submodule's mode after (a BatchNorm model is certified with its running
statistics, the function it computes in eval mode) and offers:

* ``margin_bounds(model, x, y, threat) -> [B, K]`` (float64): sound lower bounds of ``f_y − f_c``
  over the threat ball ∩ [0, 1] for every class (``+inf`` at ``c = y``);
* ``certify(model, x, y, threat) -> bool [B]``: every bound positive and the clean point
  classified correctly: such a point has no adversarial example in the ball;
* ``radius(model, x, y, norm, hi, tol) -> [B]``: per point, a certified radius found by bisection
  on eps (0 for misclassified points), for certified-accuracy-versus-eps curves;
* ``verify(model, x, y, threat, starts=None) -> Verification``: per point ``verified``,
  ``falsified`` (with an adversarial example, re-checked by a forward pass) or ``undecided``
  (:mod:`~robustbench_lite.certify.outcome`).  Incomplete verifiers get it for free (their
  certified points verified, the rest undecided); a complete verifier (``bab``) implements
  ``_verify`` and decides every point given the time.  ``starts`` are candidate adversarial
  examples (an evasion attack's, NaN rows where there is none) that a verifier with
  ``takes_starts`` tries first; the others ignore them.

Plugins implement ``_margin_bounds(model, x, y, threat)``, or ``_bounds(model, x, y, norm, eps)``
with a radius per point (what the bisection calls; by default once per distinct radius).  Verifiers that work on
the layers of the network derive from :class:`BoundVerifier`, which traces the model into a
computation graph of supported operations (:func:`parse_network`, ``torch.fx``: residual
additions, batch norms folded; an unsupported node is a ``ValueError`` naming it, the supported
layers and the zoo models that parse), casts the points to float64, runs ``_net_bounds(net,
inset, y)`` in chunks of ``batch_size`` points and folds the margin matrix into the last layer.

Built-in verifiers: ``ibp`` (Gowal et al. 2018), ``crown`` (Zhang et al. 2018), ``alpha-crown``
(Xu et al. 2021), ``bab`` (β-CROWN branch and bound, Wang et al. 2021: complete) and
``stable-relu`` (the fixed-pattern certificate of the convex pair).  The bound
functions (:func:`layer_bounds`, :func:`ibp_margins`, :func:`crown_margins`) are exported for the
certified-training defenses.  Third-party verifiers arrive by the entry-point group
``robustbench_lite.verifiers``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.attack import check_images, check_labels, check_model, eval_mode
from ..core.config import Plugin, setting
from ..core.registry import Registry
from ..core.threat import Norm, ThreatModel
from ._bounds import InputSet, crown_margins, ibp_margins, layer_bounds, logit_interval
from ._graph import SUPPORTED, Network, parse_network
from .outcome import Status, Verification

__all__ = [
    "VERIFIERS",
    "BoundVerifier",
    "InputSet",
    "Network",
    "SUPPORTED",
    "Status",
    "Verification",
    "Verifier",
    "create_verifier",
    "crown_margins",
    "ibp_margins",
    "layer_bounds",
    "list_verifiers",
    "logit_interval",
    "parse_network",
    "register_verifier",
]

VERIFIERS = Registry("verifier", "robustbench_lite.certify", "robustbench_lite.verifiers", base="robustbench_lite.certify:Verifier")
register_verifier = VERIFIERS.register
create_verifier = VERIFIERS.create
list_verifiers = VERIFIERS.list

#: the balls the bound propagators handle (intersected with the [0, 1] box)
BALL_NORMS: tuple[Norm, ...] = (Norm.LINF, Norm.L2, Norm.L1)


@dataclass(frozen=True, kw_only=True)
class Verifier(Plugin):
    """The checks and public methods every verifier shares; plugins implement :meth:`_bounds`."""

    norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF,)
    #: whether :meth:`_verify` takes ``starts=`` (candidate counterexamples; a complete verifier's)
    takes_starts: ClassVar[bool] = False

    # -- what plugins implement (one of the two) --------------------------------------------------
    def _margin_bounds(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Sound lower bounds ``[B, K]`` of ``f_y − f_c`` over the threat ball around each point
        ∩ [0, 1], any value at ``c = y``.  Runs under ``no_grad``, model in eval mode."""
        raise NotImplementedError(f"verifier {self.name} must implement _margin_bounds or _bounds")

    def _bounds(self, model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: Tensor) -> Tensor:
        """The same with a radius per point (``eps[b]``), which the bisection of :meth:`radius`
        needs; by default :meth:`_margin_bounds` once per distinct radius."""
        out = torch.empty(x.shape[0], 0, dtype=torch.float64, device=x.device)
        for e in eps.unique():
            idx = (eps == e).nonzero()[:, 0]
            part = self._margin_bounds(model, x[idx], y[idx], ThreatModel(norm, float(e))).to(torch.float64)
            if out.shape[1] != part.shape[1]:
                out = torch.full((x.shape[0], part.shape[1]), float("nan"), dtype=torch.float64, device=x.device)
            out[idx] = part.to(x.device)
        return out

    # -- public API -------------------------------------------------------------------------------
    def margin_bounds(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Lower bounds ``[B, K]`` (float64) of ``f_y(x') − f_c(x')`` over the threat ball ∩ [0, 1]
        (``+inf`` at ``c = y``)."""
        threat = self._check_threat(threat)
        model, x, y = self._check(model, x, y)
        with eval_mode(model), torch.no_grad():
            return self._checked_bounds(model, x, y, threat.norm, self._eps(x, threat.eps))

    def certify(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """``bool [B]``: proven robust under ``threat`` and correctly classified at ``x``."""
        threat = self._check_threat(threat)
        model, x, y = self._check(model, x, y)
        with eval_mode(model), torch.no_grad():
            return self._certified(model, x, y, threat)

    def verify(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
               starts: Tensor | None = None) -> Verification:
        """Per point ``verified``, ``falsified`` or ``undecided``; every counterexample the plugin
        returns is re-checked by a forward pass (:meth:`Verification.recheck
        <robustbench_lite.certify.outcome.Verification.recheck>`: one outside the ball or classified
        correctly leaves its point undecided and ``rejected``).  ``starts``: candidate adversarial
        examples ``[B, *x]`` (NaN rows where there is none, e.g. an evasion attack's), handed to
        ``_verify`` by verifiers with ``takes_starts``."""
        threat = self._check_threat(threat)
        model, x, y = self._check(model, x, y)
        starts = self._check_starts(starts, x)
        with eval_mode(model), torch.no_grad():
            if self.takes_starts:
                out = self._verify(model, x, y, threat, starts=starts)
            else:
                out = self._verify(model, x, y, threat)
            if not isinstance(out, Verification) or out.n != x.shape[0]:
                got = f"{out.n} points" if isinstance(out, Verification) else type(out).__name__
                raise RuntimeError(f"verifier {self.name} returned {got} from _verify for {x.shape[0]} points")
            return out.recheck(model, x, y, threat)

    def _verify(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Verification:
        """A complete verifier's per-point outcome (runs under ``no_grad``, model in eval mode,
        inputs checked); by default an incomplete verifier's: :meth:`certify`'s points verified,
        every other point undecided."""
        start = time.perf_counter()
        certified = self._certified(model, x, y, threat)
        return Verification.from_certified(certified, seconds=time.perf_counter() - start)

    def _certified(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        correct = _correct(model, x, y)
        idx = correct.nonzero()[:, 0]  # a misclassified point is never certified: skip its bounds
        certified = torch.zeros_like(correct)
        if idx.numel():
            bounds = self._checked_bounds(model, x[idx], y[idx], threat.norm, self._eps(x[idx], threat.eps))
            certified[idx] = (bounds > 0).all(dim=1)
        return certified.cpu()

    def radius(
        self, model: nn.Module, x: Tensor, y: Tensor, norm: Norm | str = Norm.LINF,
        hi: float | None = None, tol: float = 1e-3, *, known: tuple[float, Tensor] | None = None,
    ) -> Tensor:
        """Per point, a certified radius found by bisection on ``[0, hi]`` to ``tol``: the point is
        certified at the returned eps (0: misclassified, or not certified at ``tol``).  ``hi``
        defaults to the largest distance inside ``[0, 1]^d`` (1 for Linf, ``√d`` for L2).
        ``known = (eps, mask)``: what :meth:`certify` already returned at ``eps`` (< ``hi``), so the
        search starts in ``[eps, hi]`` where ``mask`` holds and in ``[0, eps]`` elsewhere.
        Certification need not be monotone in eps, so this is a certified radius, not necessarily
        the largest one."""
        norm = self._check_threat(Norm.parse(norm))
        model, x, y = self._check(model, x, y)
        d = x[0].numel()
        hi = float(hi) if hi is not None else norm.geometry.diameter(d)
        if not (math.isfinite(hi) and hi > 0 and math.isfinite(tol) and tol > 0):
            raise ValueError(f"radius needs finite hi > 0 and tol > 0, got hi={hi}, tol={tol}")
        with eval_mode(model), torch.no_grad():
            correct = _correct(model, x, y)
            lo = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            up = torch.full_like(lo, hi)
            if known is not None:
                at, mask = float(known[0]), known[1].to(x.device, torch.bool)
                if not (0 < at < hi) or mask.shape != correct.shape:
                    raise ValueError(f"known must be (eps in (0, hi)={hi}, a mask of {x.shape[0]} points), got eps {at}")
                lo = torch.where(mask, at, lo)
                up = torch.where(mask, up, at)
            while True:
                idx = (correct & (up - lo > tol)).nonzero()[:, 0]
                if idx.numel() == 0:
                    return lo.cpu()
                mid = (lo[idx] + up[idx]) / 2
                ok = (self._radius_bounds(model, x[idx], y[idx], norm, mid) > 0).all(dim=1)
                lo[idx] = torch.where(ok, mid, lo[idx])
                up[idx] = torch.where(ok, up[idx], mid)

    # -- machinery --------------------------------------------------------------------------------
    def _radius_bounds(self, model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: Tensor) -> Tensor:
        """The bounds the radius bisection certifies with (the verifier's own by default; a
        complete verifier may use a cheaper sound bound, since every step is a full decision)."""
        return self._checked_bounds(model, x, y, norm, eps)

    def _checked_bounds(self, model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: Tensor) -> Tensor:
        bounds = self._bounds(model, x, y, norm, eps).to(torch.float64)
        if bounds.shape[0] != x.shape[0] or bounds.dim() != 2:
            raise RuntimeError(f"verifier {self.name} returned bounds of shape {tuple(bounds.shape)} for {x.shape[0]} points")
        return bounds.scatter(1, y[:, None].to(bounds.device), float("inf"))

    @staticmethod
    def _check_starts(starts: object, x: Tensor) -> Tensor | None:
        if starts is None:
            return None
        if not isinstance(starts, Tensor) or starts.shape != x.shape or not starts.is_floating_point():
            got = tuple(starts.shape) if isinstance(starts, Tensor) else type(starts).__name__
            raise ValueError(f"starts must be a float tensor of the points' shape {tuple(x.shape)} (NaN rows: none), got {got}")
        return starts.to(x.device)

    @staticmethod
    def _eps(x: Tensor, eps: float) -> Tensor:
        return torch.full((x.shape[0],), float(eps), dtype=torch.float64, device=x.device)

    def _check_threat(self, threat: ThreatModel | Norm) -> ThreatModel | Norm:
        if not isinstance(threat, (ThreatModel, Norm)):
            raise TypeError(f"threat must be a ThreatModel, e.g. ThreatModel('linf', 0.1), got {type(threat).__name__}")
        norm = threat.norm if isinstance(threat, ThreatModel) else threat
        if norm not in self.norms:
            allowed = ", ".join(n.value for n in self.norms)
            raise ValueError(f"verifier {self.name} bounds {allowed} balls, not {norm.value}; pick one of those norms")
        return threat

    def _check(self, model: object, x: object, y: object) -> tuple[nn.Module, Tensor, Tensor]:
        model = check_model(model)
        x = check_images(x)
        y = check_labels(y, x.shape[0]).to(x.device)
        self._check_network(model, x)
        return model, x, y

    def _check_network(self, model: nn.Module, x: Tensor) -> None:
        """Refuse a network this verifier cannot handle before any point is skipped (a batch
        the model misclassifies entirely must not pass an unsupported layer silently)."""


@dataclass(frozen=True, kw_only=True)
class BoundVerifier(Verifier):
    """A verifier that propagates bounds through the parsed layers of the network in float64;
    plugins implement :meth:`_net_bounds`."""

    norms: ClassVar[tuple[Norm, ...]] = BALL_NORMS
    batch_size: int = setting(200, low=1)  # points per chunk (memory); results do not depend on it

    def _net_bounds(self, net: Network, inset: InputSet, y: Tensor) -> Tensor:
        """Sound lower bounds ``[B, K]`` of ``f_y − f_c`` over ``inset`` (float64; any value at
        ``c = y``)."""
        raise NotImplementedError

    def _check_network(self, model: nn.Module, x: Tensor) -> None:
        if x.shape[0]:
            with eval_mode(model), torch.no_grad():
                parse_network(model, x[:1])  # a ValueError naming an unsupported layer

    def _bounds(self, model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: Tensor) -> Tensor:
        net = parse_network(model, x[:1])
        if x.shape[0] and int(y.max()) >= net.num_classes:
            raise ValueError(f"labels must be < {net.num_classes} (the model's number of logits), got {int(y.max())}")
        out = [torch.zeros(0, net.num_classes, dtype=torch.float64, device=x.device)]
        for i in range(0, x.shape[0], self.batch_size):
            xs = x[i : i + self.batch_size].to(torch.float64)
            inset = InputSet.make(xs, norm, eps[i : i + self.batch_size])
            out.append(self._net_bounds(net, inset, y[i : i + self.batch_size]).detach().to(torch.float64))
        return torch.cat(out)


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Which points the model classifies correctly (in chunks of 1000)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    logits = [model(x[i : i + 1000]) for i in range(0, x.shape[0], 1000)]
    k = logits[0].shape[1]
    if int(y.max()) >= k:
        raise ValueError(f"labels must be < {k} (the model's number of logits), got {int(y.max())}")
    return torch.cat([out.argmax(1) for out in logits]).to(y.device) == y
