"""Sparse (L0) evasion attacks, reported by success rate and queries (e.g. one-pixel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.attack import EvasionAttack
from ..core.data import DataSplit
from ..core.device import DevicePolicy, as_policy, keeps_layout
from ..core.models import predict


@dataclass(frozen=True)
class SparseResult:
    """One L0 attack on one model; its fields are the columns of the sparse leaderboard."""

    norm: str
    pixels: int  # the L0 budget k
    n: int
    clean_acc: float
    attacked: int  # clean-correct points
    success_rate: float  # of the attacked points, the share misclassified after the attack
    robust_acc: float  # over all n points
    queries: int  # model queries (candidate evaluations) in all
    queries_per_point: float  # per attacked point
    seconds: float


@keeps_layout
def evaluate_sparse(
    model: nn.Module, attack: EvasionAttack, split: DataSplit, *, policy: DevicePolicy | torch.device | str = "cpu",
    batch_size: int = 100,
) -> SparseResult:
    """Run an L0 evasion attack on the clean-correct points of ``split``."""
    policy = as_policy(policy)
    device = policy.device
    model = policy.model_to(model).eval()
    correct = predict(model, split.x, device) == split.y
    idx = correct.nonzero().flatten()
    broken, seconds, fwd = 0, 0.0, 0
    gen = torch.Generator(device=device).manual_seed(attack.seed)
    for i in range(0, len(idx), batch_size):
        sel = idx[i : i + batch_size]
        x, y = policy.batch_to(split.x[sel]), policy.batch_to(split.y[sel])
        out = attack.run(model, x, y, gen)
        with torch.no_grad():
            broken += int((model(out.x_adv).argmax(1) != y).sum())
        seconds += out.seconds
        fwd += out.forward_evals
    return SparseResult(
        norm=attack.norm.value, pixels=int(attack.eps), n=len(split), clean_acc=float(correct.float().mean()),
        attacked=len(idx), success_rate=broken / max(len(idx), 1), robust_acc=(len(idx) - broken) / len(split),
        queries=fwd, queries_per_point=fwd / max(len(idx), 1), seconds=seconds,
    )
