"""Shared machinery of the certified-training defenses (IBP, CROWN-IBP): the eps / κ / β
schedules and the loss on the worst-case logits.

Schedules are linear in training progress measured in epochs (Gowal et al. 2018; Zhang et al.
2020): eps is 0 for ``warmup_epochs`` (natural training), then ramps linearly to
``eps · train_eps_factor`` over ``ramp_epochs`` and stays there.  κ, the weight of the natural
loss, and β (CROWN-IBP's mixing weight) move linearly with the eps ramp, as in the authors'
code (``κ = 1 − (1 − κ_end)·ε_t/ε_train``).

Progress within an epoch needs the number of steps per epoch, which the training loop does not
hand to a loss; it is read off the loop's counters at the first step of epoch 1
(``state.step / state.epoch``), which is why the warm-up lasts at least one epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustbench_lite import Defense, Norm, ThreatModel, TrainState, create_verifier, ops, setting
from robustbench_lite.certify import InputSet, ibp_margins, layer_bounds, parse_network


def ramp_fraction(progress: float, warmup: float, length: float) -> float:
    """0 during the warm-up, then linear to 1 over ``length`` epochs (a pure function)."""
    if progress < warmup:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (progress - warmup) / length)


def progress_epochs(state: TrainState) -> float:
    """Training progress in epochs, from the loop's step and epoch counters (see module doc)."""
    spe = state.extra.get("steps_per_epoch")
    if spe is None and state.epoch >= 1:
        spe = state.extra["steps_per_epoch"] = max(1, state.step // state.epoch)
    return float(state.epoch) if spe is None else state.step / spe


def worst_case_loss(lower: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy on the worst-case logits ``−lower`` (``lower[b, c]`` bounds
    ``f_y − f_c`` from below, 0 at ``c = y``): Gowal et al.'s ``CE(ẑ, y)`` with the margins."""
    return ops.ce(-lower, y)


@dataclass(frozen=True, kw_only=True)
class CertifiedDefense(Defense):
    """Settings shared by IBP and CROWN-IBP training.  ``eps`` is the Linf radius to certify;
    training uses ``eps · train_eps_factor`` (Gowal et al. train slightly above the test eps)."""

    eps: float = setting(0.1, low=0.0, low_open=True, high=1.0)
    train_eps_factor: float = setting(1.0, low=1.0)
    warmup_epochs: float = setting(1.0, low=1.0)
    ramp_epochs: float = setting(10.0, low=0.0)
    kappa_start: float = setting(1.0, low=0.0, high=1.0)
    kappa_end: float = setting(0.5, low=0.0, high=1.0)
    monitor_certified: bool = setting(True)  # IBP-certified accuracy at eps on the monitor points, per epoch

    def ramp(self, state: TrainState) -> tuple[float, float]:
        """``(eps_t, r)``: the training eps now and the ramp fraction ``r`` in [0, 1]."""
        r = ramp_fraction(progress_epochs(state), self.warmup_epochs, self.ramp_epochs)
        return r * self.eps * self.train_eps_factor, r

    def kappa(self, r: float) -> float:
        return self.kappa_start + (self.kappa_end - self.kappa_start) * r

    def margin_lower(self, net, inset: InputSet, y: Tensor, r: float) -> Tensor:
        """Lower bounds of the margins the robust loss uses (subclasses choose the bound)."""
        raise NotImplementedError

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor, state: TrainState) -> Tensor:
        eps_t, r = self.ramp(state)
        natural = ops.ce(model(x), y).mean()
        state.metrics.update({"eps": eps_t, "kappa": self.kappa(r)})
        if eps_t <= 0:
            return natural
        net = _network(model, x, state)
        net.use_batch_statistics(x)  # train-mode batch norms: the clean batch's statistics
        inset = InputSet.make(x, Norm.LINF, torch.full((x.shape[0],), eps_t, device=x.device))
        robust = worst_case_loss(self.margin_lower(net, inset, y, r), y).mean()
        kappa = self.kappa(r)
        return kappa * natural + (1 - kappa) * robust

    def epoch_metrics(self, model: nn.Module, data, device: torch.device) -> dict[str, float]:
        out = super().epoch_metrics(model, data, device)
        if self.monitor_certified:
            split = (data.val if data.val is not None else data.test).head(self.monitor_points)
            cert = create_verifier("ibp").certify(model, split.x.to(device), split.y.to(device),
                                                  ThreatModel(Norm.LINF, self.eps))
            out["ibp_certified_acc"] = float(cert.float().mean())
        return out


def _network(model: nn.Module, x: Tensor, state: TrainState):
    """The model's graph, traced once per training run (again if its layers or modes change)."""
    key = (tuple(x.shape[1:]), tuple((id(m), m.training) for m in model.modules()))
    cached = state.extra.get("network")
    if cached is None or cached[0] != key:
        cached = state.extra["network"] = (key, parse_network(model, x[:1]))
    return cached[1]


def ibp_bounds(net, inset: InputSet, y: Tensor) -> tuple[dict, Tensor]:
    """Interval bounds of every nonlinear op's input and the IBP margin lower bounds."""
    bounds, last_in = layer_bounds(net, inset, "ibp")
    return bounds, ibp_margins(net, last_in, y)
