"""The escalation ladder: stronger and stronger evaluations for a model whose gradients lie.

When a masking check fires (``robustbench_lite.eval.evasion.MASKING``) and the adaptive rerun
through wrappers (:mod:`~robustbench_lite.eval.adaptive`) is done, each threat's worst case goes
through these steps in order, each only on the points no earlier attack or step broke, while
there are such points and the per-point budget lasts (a masking flag is never cleared: the checks
have margins of several points, so smoothed gradients that pass them again can still miss what a
5000-query black box finds):

1. ``noise-eot``: APGD-CE and APGD-DLR (Croce & Hein 2020) on the noise-smoothed model
   (:class:`~robustbench_lite.eval.adaptive.NoiseEOT`: the mean logits over Gaussian input noise
   of a few percent of eps, the same adaptive wrappers inside).  Smoothing averages away a
   high-frequency term that shatters the gradient (Athalye et al. 2018, §4.2 and §4.3: EOT over
   a transformation the attacker chooses) while the function the attack follows stays close.
2. ``transfer``: a surrogate (the same architecture trained by the plain ``standard`` recipe on
   the same data, supplied by the caller) is attacked with fixed-step PGD-CE without early
   stopping (high-loss points transfer better; Papernot et al. 2016, Tramèr et al. 2018), every
   iterate judged on the model; a point counts as broken by the first iterate that fools it.
   Training the surrogate is bounded by the evaluation it serves (:meth:`Escalation.surrogate_limit`,
   ``surrogate_schedule``): a 40-point check does not pay for a full training run.
3. ``square``: Square Attack (Andriushchenko et al. 2020) with AutoAttack's budget (5000
   queries; Croce & Hein 2020's standard version runs one restart): it queries only scores, so
   no gradient can mislead it.

Every step is recorded per point (its robust mask over the evaluated points), and the worst case
keeps the per-point AND of every run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.attack import EvasionAttack
from ..core.config import setting, validate_settings
from ..core.ops import ce
from ..core.registry import ATTACKS
from ..core.threat import ThreatModel
from .adaptive import NoiseEOT

STEPS = ("noise-eot", "transfer", "square")


@dataclass(frozen=True, kw_only=True)
class Escalation:
    """Settings of the ladder (its cost per attacked point is :meth:`cost`)."""

    noise_fraction: float = setting(0.04, low=0.0, high=1.0, low_open=True)  # σ as a share of eps (see NoiseEOT)
    noise_samples: int = setting(8, low=1)
    noise_steps: int = setting(50, low=1)
    transfer_steps: int = setting(100, low=1)
    transfer_check_every: int = setting(10, low=1)  # judge the iterate on the model every this many steps
    square_queries: int = setting(5000, low=2)
    square_restarts: int = setting(1, low=1)
    square_p_init: float = setting(0.3, low=0.0, high=1.0, low_open=True)
    budget: float = setting(6000.0, low=0.0)  # gradient-evaluation equivalents per attacked point, all steps
    # the surrogate's training (images seen, counting each pass over an image as one gradient evaluation) may cost at
    # most this share of the ladder's budget over the evaluated points: see surrogate_limit
    surrogate_share: float = setting(0.1, low=0.0)
    steps: tuple[str, ...] = STEPS

    def __post_init__(self) -> None:
        validate_settings(self, "escalation")
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ValueError(f"escalation steps must be among {list(STEPS)}, got {unknown}")

    def surrogate_limit(self, points: int) -> int:
        """How many training images (summed over epochs) the transfer surrogate may see for an
        evaluation of ``points`` points: ``surrogate_share · budget · points``.  One image seen once
        costs about one gradient evaluation (a forward and a backward pass), so by default the
        surrogate costs at most a tenth of what the ladder may spend on those points: 24,000 images
        for 40 points (one epoch on 24,000 Fashion-MNIST images), the full ``standard`` recipe
        (5 epochs on 60,000) from 500 points on."""
        return int(self.surrogate_share * self.budget * max(0, int(points)) + 1e-6)  # no float rounding down

    def cost(self, step: str) -> float:
        """Gradient-evaluation equivalents per attacked point (a forward query counts a third)."""
        if step == "noise-eot":
            return 2.0 * (self.noise_steps + 1) * self.noise_samples
        if step == "transfer":
            return self.transfer_steps + self.transfer_steps / self.transfer_check_every / 3.0
        return self.square_queries * self.square_restarts / 3.0


#: fewer training images per class than this make no useful surrogate: the transfer step is skipped
SURROGATE_MIN_PER_CLASS = 10


def surrogate_schedule(epochs: int, train_points: int, limit: int) -> tuple[int, int]:
    """``(epochs, images)`` for a surrogate whose recipe asks for ``epochs`` over ``train_points``
    images, within ``limit`` images seen in all: the recipe when it fits; else fewer epochs over
    every image; else one epoch over the first ``limit`` images.  ``epochs · images <= limit``
    whenever ``limit >= 1``."""
    if epochs < 1 or train_points < 0 or limit < 0:
        raise ValueError(f"surrogate_schedule needs epochs >= 1, train_points >= 0, limit >= 0; got {epochs}, "
                         f"{train_points}, {limit}")
    if epochs * train_points <= limit:
        return epochs, train_points
    if train_points <= limit:
        return max(1, limit // train_points), train_points
    return 1, limit


@dataclass(frozen=True)
class StepRecord:
    """One ladder step on one threat: the robust mask over the evaluated points after it."""

    step: str
    robust: Tensor  # bool [n]: correct and unbroken by every run so far
    attacked: int
    broke: int
    seconds: float
    grad_evals: int
    forward_evals: int
    error: str = ""

    def as_payload(self) -> dict[str, Any]:
        return {
            "step": self.step, "attacked": self.attacked, "broke": self.broke, "seconds": self.seconds,
            "grad_evals": self.grad_evals, "forward_evals": self.forward_evals, "error": self.error,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], robust: Tensor) -> StepRecord:
        return cls(
            str(payload["step"]), robust, int(payload["attacked"]), int(payload["broke"]), float(payload["seconds"]),
            int(payload["grad_evals"]), int(payload["forward_evals"]), str(payload.get("error", "")),
        )


@dataclass(frozen=True)
class Escalated:
    """The ladder's outcome on one threat."""

    robust: Tensor  # bool [n]: the worst case after every step
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.step for s in self.steps if not s.error]


@dataclass(frozen=True, kw_only=True)
class TransferPGD(EvasionAttack):
    """Fixed-step PGD-CE on the model it is given (the surrogate), no early stop; with a judge
    (:meth:`judged_by`, the model under test), each ``check_every``-th iterate is judged on it
    and a point keeps the first iterate that fools it.  Not registered: the ladder's own."""

    steps: int = setting(100, low=1)
    check_every: int = setting(10, low=1)

    @property
    def grad_budget(self) -> float:
        return float(self.steps)

    def judged_by(self, judge: nn.Module) -> TransferPGD:
        """This attack with ``judge`` (not a setting: it is not part of the attack's params)."""
        object.__setattr__(self, "_judge", judge)
        return self

    def _perturb(self, model, x, y, target, gen):
        judge = self.__dict__.get("_judge")
        geo, step = self.geometry, 2.5 * self.eps / self.steps
        adv = geo.random_start(x, self.eps, gen)
        best = adv.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for k in range(1, self.steps + 1):
            _, _, grad = self.loss_grad(model, adv, y, ce)
            adv = geo.project(adv + step * geo.ascent(grad), x, self.eps)
            if judge is not None and (k % self.check_every == 0 or k == self.steps):
                hit = (judge(adv).argmax(1) != y) & ~fooled
                best[hit] = adv[hit]
                fooled |= hit
        best[~fooled] = adv[~fooled]
        return best


def smoothed(wrapped: nn.Module, threat: ThreatModel, like: Tensor, cfg: Escalation) -> NoiseEOT:
    """``wrapped`` under step 1's Gaussian input noise."""
    return NoiseEOT(wrapped, noise_sigma(threat, like, cfg.noise_fraction), cfg.noise_samples)


def noise_sigma(threat: ThreatModel, like: Tensor, fraction: float) -> float:
    """Per-pixel σ whose uniform perturbation has norm ``fraction · eps`` (Linf: ``fraction · eps``;
    L2: ``fraction · eps / sqrt(d)``), so the noise is small beside the threat ball in every norm."""
    ones = torch.ones(1, *like.shape[1:], dtype=torch.float32)
    return float(fraction * threat.eps / threat.geometry.distance(ones)[0])


def ladder_attacks(threat: ThreatModel, cfg: Escalation, step: str, seed: int = 0) -> list[EvasionAttack]:
    """The attacks one step runs (gradient steps: APGD-CE and APGD-DLR; square: its restarts), less
    those whose ``norms`` leave out the threat's norm (e.g. the transfer PGD and Square under L1)."""
    if step == "noise-eot":
        plan = [(ATTACKS.get(name), {"steps": cfg.noise_steps, "seed": seed}) for name in ("apgd-ce", "apgd-dlr")]
    elif step == "transfer":
        plan = [(TransferPGD, {"steps": cfg.transfer_steps, "check_every": cfg.transfer_check_every, "seed": seed})]
    else:
        plan = [(ATTACKS.get("square"), {"queries": cfg.square_queries, "p_init": cfg.square_p_init, "seed": seed + r})
                for r in range(cfg.square_restarts)]
    return [cls(norm=threat.norm, eps=threat.eps, **kw) for cls, kw in plan if threat.norm in cls.norms]


RunOne = Callable[[EvasionAttack, Tensor, "nn.Module | None"], Any]  # (attack, mask, attack_model) -> AttackRecord


def run_step(
    step: str, threat: ThreatModel, alive: Tensor, cfg: Escalation, *, run_one: RunOne, wrapped: nn.Module,
    judge: nn.Module, surrogate: nn.Module | None, like: Tensor, num_classes: int,
) -> StepRecord:
    """One step on the points ``alive`` marks; ``run_one(attack, mask, attack_model)`` runs an
    attack as the evaluation does (batches, device, judging on ``judge``, the model under test)
    and returns its record.  ``wrapped`` is the model with the adaptive wrappers other than EOT
    (what gradient steps smooth: the noise samples also sample a randomized model's own
    randomness); without a ``surrogate`` the transfer step records that it could not run."""
    start, grads, fwds = time.perf_counter(), 0, 0
    robust = alive.clone()
    attacked = int(alive.sum())
    attacks = ladder_attacks(threat, cfg, step)
    if not attacks:
        return StepRecord(step, robust, attacked, 0, 0.0, 0, 0, error=f"no {step} attack supports {threat.norm.value}")
    if step == "transfer":
        if surrogate is None:
            return StepRecord(step, robust, attacked, 0, 0.0, 0, 0, error="no surrogate")
        attacks = [a.judged_by(judge) for a in attacks if isinstance(a, TransferPGD)]
    if step == "noise-eot" and num_classes < 3:
        attacks = attacks[:1]  # DLR needs three classes
    for attack in attacks:
        if not robust.any():
            break
        if step == "noise-eot":
            model: nn.Module | None = smoothed(wrapped, threat, like, cfg)
        elif step == "transfer":
            model = surrogate
        else:
            model = None  # square queries the model itself (scores only)
        rec = run_one(attack, robust, model)
        robust = robust & rec.robust
        grads += rec.grad_evals
        fwds += rec.forward_evals
    return StepRecord(step, robust, attacked, attacked - int(robust.sum()), time.perf_counter() - start, grads, fwds)
