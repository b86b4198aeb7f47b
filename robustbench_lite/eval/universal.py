"""Universal perturbations: one ``delta`` for every input (Moosavi-Dezfooli et al., CVPR 2017).

Fit ``delta`` on the attacker's points, then on held-out points report the **fooling rate** — the
fraction whose prediction under ``clip(x + delta)`` differs from the *clean prediction* (not
1 − accuracy) — and the accuracy under ``x + delta``, next to the same numbers for random noise of
the same norm (the floor; ``Geometry.random_sphere``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.attack import UniversalAttack, apply_delta
from ..core.data import DataSplit
from ..core.device import DevicePolicy, as_policy, keeps_layout
from ..core.models import predict


@dataclass(frozen=True)
class UniversalResult:
    """One universal attack on one model; rates are over the ``n`` held-out points.  Its fields
    are the columns of the universal leaderboard."""

    norm: str
    eps: float
    n: int  # held-out points the perturbation is measured on
    clean_acc: float
    fooling_rate: float  # prediction under x + delta != clean prediction
    noise_fooling_rate: float  # the same for random noise of the same norm (mean over draws): the floor
    acc_under_delta: float  # prediction under x + delta == true label
    noise_acc: float
    noise_draws: int
    delta_norm: float
    n_fit: int  # the attacker's points the perturbation was fitted on
    seconds: float
    grad_evals: int
    forward_evals: int


def _predict_with(model: nn.Module, x: Tensor, delta: Tensor, policy: DevicePolicy, batch_size: int = 1000) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(apply_delta(policy.batch_to(x[i : i + batch_size]), delta.to(policy.device))).argmax(1).cpu()
             for i in range(0, len(x), batch_size)]
        )


@keeps_layout
def evaluate_universal(
    model: nn.Module,
    attack: UniversalAttack,
    fit_split: DataSplit,
    eval_split: DataSplit,
    *,
    policy: DevicePolicy | torch.device | str = "cpu",
    noise_draws: int = 5,
    noise_seed: int = 0,
) -> UniversalResult:
    """Fit ``attack`` on ``fit_split`` and measure it on the held-out ``eval_split``."""
    if not isinstance(attack, UniversalAttack):
        raise TypeError(f"evaluate_universal takes a UniversalAttack, got {type(attack).__name__}")
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
    policy = as_policy(policy)
    model = policy.model_to(model).eval()
    out = attack.run(model, DataSplit(policy.batch_to(fit_split.x), policy.batch_to(fit_split.y)))
    clean = predict(model, eval_split.x, policy.device)
    adv = _predict_with(model, eval_split.x, out.delta, policy)
    gen = torch.Generator().manual_seed(noise_seed)
    noise_fool, noise_acc = [], []
    for _ in range(noise_draws):
        noisy = _predict_with(model, eval_split.x, attack.geometry.random_sphere((1, *eval_split.x.shape[1:]), attack.eps, gen), policy)
        noise_fool.append(float((noisy != clean).float().mean()))
        noise_acc.append(float((noisy == eval_split.y).float().mean()))
    return UniversalResult(
        norm=attack.norm.value, eps=attack.eps, n=len(eval_split), clean_acc=float((clean == eval_split.y).float().mean()),
        fooling_rate=float((adv != clean).float().mean()), noise_fooling_rate=sum(noise_fool) / noise_draws,
        acc_under_delta=float((adv == eval_split.y).float().mean()), noise_acc=sum(noise_acc) / noise_draws,
        noise_draws=noise_draws, delta_norm=float(attack.geometry.distance(out.delta)[0]), n_fit=len(fit_split),
        seconds=out.seconds, grad_evals=out.grad_evals, forward_evals=out.forward_evals,
    )
