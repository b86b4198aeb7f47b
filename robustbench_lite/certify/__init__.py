"""Certificates: verifiers that prove a model robust at a point, in a registry.

A verifier takes a model, points, labels and a threat and returns per-point lower bounds on the
margins ``f_y − f_c`` over the whole threat ball ∩ [0, 1] (:meth:`Verifier.margin_bounds`); a point
is certified when every bound is positive and the clean point is classified correctly.  Verifiers
are sound by construction: a certified point has no adversarial example in the ball.  The
``certified`` cell kind reports the certified share beside the attacked worst case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.attack import check_images, check_labels, check_model, eval_mode
from ..core.config import Plugin
from ..core.registry import Registry
from ..core.threat import Norm, ThreatModel

VERIFIERS = Registry("verifier", "robustbench_lite.certify", "robustbench_lite.verifiers", base="robustbench_lite.certify:Verifier")
register_verifier = VERIFIERS.register
create_verifier = VERIFIERS.create
list_verifiers = VERIFIERS.list


@dataclass(frozen=True, kw_only=True)
class Verifier(Plugin):
    """Settings of a verifier and the checks every verifier shares; plugins implement
    :meth:`_margin_bounds` only."""

    norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF,)

    def margin_bounds(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Lower bounds ``[B, K]`` of ``f_y(x') − f_c(x')`` over every ``x'`` of the threat ball
        around ``x`` ∩ [0, 1] (``+inf`` at ``c = y``).  The model is evaluated in ``eval()`` mode."""
        check_model(model)
        x = check_images(x)
        y = check_labels(y, x.shape[0]).to(x.device)
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        if threat.norm not in self.norms:
            allowed = ", ".join(n.value for n in self.norms)
            raise ValueError(f"verifier {self.name} supports norm {allowed}, not {threat.norm.value}")
        with eval_mode(model), torch.no_grad():
            return self._margin_bounds(model, x, y, threat)

    def certify(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Bool ``[B]``: the point is classified correctly and every margin bound is positive."""
        bounds = self.margin_bounds(model, x, y, threat)
        with eval_mode(model), torch.no_grad():
            correct = model(x).argmax(1) == y.to(x.device)
        return (correct & (bounds > 0).all(dim=1)).cpu()

    # -- what plugins implement -----------------------------------------------------------------
    def _margin_bounds(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        raise NotImplementedError
