"""The wasserstein kind: WRM's certificate of distributional robustness beside a Wasserstein attack
(Sinha, Namkoong & Duchi, "Certifying some distributional robustness with principled adversarial
training", ICLR 2018, Proposition 1 / Theorem 3 on the test points).

A wasserstein cell names ``wrm-certificate`` (settings: :class:`WassersteinCertificateSettings`) and
an L2 threat whose ``eps`` is the radius of a Wasserstein-2 ball: the transport budget on the mean
squared L2 cost is ``ρ = eps²``.  On the first ``n`` test points of the group's model it reports the
certified worst-case loss ``γρ̂ + E[φ_γ]`` at the transport cost ``ρ̂`` the Lagrangian ascent reaches
and ``γρ + E[φ_γ]`` at the cell's ``ρ``, beside the mean loss the Wasserstein attack (the same ascent
run longer, with restarts, over a range of multipliers) reaches within each budget
(:func:`robustbench_lite.eval.wasserstein.wasserstein_certificate`).  The certificate must be at
least the attacked loss; when it is not, the row gets ``wasserstein-bound-broken``.  The numbers
are losses (cross-entropy), not accuracies, so the kind has its own table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...core.config import MAX_SEED, Plugin, setting
from ...core.threat import Norm
from ...eval.flags import wasserstein_bound_broken
from ...eval.wasserstein import wasserstein_certificate
from ..plan import Cell
from ..rows import Row
from . import CellKind, Group, register_kind


@dataclass(frozen=True, kw_only=True)
class WassersteinCertificateSettings(Plugin):
    """The certificate's ascent (``steps`` of size ``step/√t``, the paper's T_adv = 15) and the attack
    beside it (``attack_steps`` × ``restarts``, multipliers searched by ``expansions`` ×4 steps and
    ``bisections``).  ``gamma = 0`` takes the γ the model was trained with (a WRM model's)."""

    gamma: float = setting(0.0, low=0.0)
    steps: int = setting(15, low=1)
    step: float = setting(1.0, low=0.0, low_open=True)
    clip: bool = setting(True)
    attack_steps: int = setting(100, low=1)
    restarts: int = setting(3, low=1)
    bisections: int = setting(4, low=0)
    expansions: int = setting(8, low=0)
    seed: int = setting(0, low=0, high=MAX_SEED)
    batch_size: int = setting(500, low=1)

    registry_name = "wrm-certificate"

    def gamma_for(self, trained_params: dict[str, Any]) -> float:
        """γ of the certificate: the setting, else the model's training γ; a ValueError naming the fix."""
        gamma = self.gamma or trained_params.get("gamma", 0.0)
        if not (isinstance(gamma, int | float) and gamma > 0 and math.isfinite(gamma)):
            raise ValueError("wrm-certificate: set gamma > 0 (the model was not trained with a WRM gamma)")
        return float(gamma)


@dataclass(frozen=True)
class WassersteinRow:
    norm: str
    eps: float  # the Wasserstein-2 radius: rho = eps^2
    n: int
    gamma: float
    clean_acc: float
    clean_loss: float  # mean CE on the clean points (the attack's floor)
    rho_hat: float  # mean squared transport cost of the ascent's points
    phi: float  # mean robust surrogate phi_gamma at the ascent's points
    bound_at_rho_hat: float  # gamma rho_hat + E[phi]
    attack_at_rho_hat: float  # mean loss of the strongest attack found within rho_hat
    attack_cost_at_rho_hat: float
    rho: float  # the cell's budget, eps^2
    bound_at_rho: float  # gamma rho + E[phi]
    attack_at_rho: float
    attack_cost_at_rho: float
    phi_gap: float  # attack's E[phi] at the same gamma minus the ascent's: > 0 means the ascent missed the sup
    holds: bool  # both bounds at least the attacked loss
    seconds: float


@register_kind("wasserstein")
class Wasserstein(CellKind):
    """WRM's certified worst-case loss over a Wasserstein ball vs the Wasserstein attack's."""

    row: ClassVar[type] = WassersteinRow
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (("eps", True), ("model", True), ("defense", True))

    def knows(self, method: str) -> bool:
        return method == WassersteinCertificateSettings.registry_name

    def build(self, cell: Cell) -> Any:
        if cell.threat.norm is not Norm.L2:
            raise ValueError(f"the wasserstein kind takes an l2 threat (eps: the W2 radius), not {cell.threat.norm.value}")
        if cell.attack.name != WassersteinCertificateSettings.registry_name:
            raise ValueError(f"wasserstein cells run 'wrm-certificate', not {cell.attack.name!r}")
        return WassersteinCertificateSettings(**cell.attack.params)

    def key_fields(self, cell: Cell) -> dict[str, Any]:
        return {"kind": self.name, "threat": cell.threat.label}

    def measure(self, cell: Cell, group: Group) -> Row:
        settings = cell.build()
        gamma = settings.gamma_for(group.trained.sidecar.get("params", {}))
        points = group.data.test.head(cell.n)
        x, y = group.policy.batch_to(points.x), group.policy.batch_to(points.y).long()
        model, rho = group.trained.model, cell.threat.eps**2
        start = time.perf_counter()
        c = wasserstein_certificate(
            model, x, y, gamma=gamma, rho=rho, steps=settings.steps, step=settings.step, clip=settings.clip,
            attack_steps=settings.attack_steps, restarts=settings.restarts, bisections=settings.bisections,
            expansions=settings.expansions, seed=settings.seed, batch_size=settings.batch_size,
        )
        seconds = time.perf_counter() - start
        values = WassersteinRow(
            cell.threat.norm.value, cell.threat.eps, cell.n, gamma, _clean_acc(model, x, y), c.clean_loss, c.rho_hat,
            c.phi, c.bound_at_rho_hat, c.attack_at_rho_hat[0], c.attack_at_rho_hat[1], rho, c.bound_at_rho,
            c.attack_at_rho[0], c.attack_at_rho[1], c.attack_phi - c.phi, c.holds, seconds,
        )
        flag = wasserstein_bound_broken((c.bound_at_rho_hat, c.bound_at_rho), (c.attack_at_rho_hat[0], c.attack_at_rho[0]))
        return self.result(cell, group, values, method=settings, robust_acc=None, flags=flag or ""), None


def _clean_acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
