"""Models for the strong-attack side-by-side benchmark (scripts/bench_strong_attacks.py).

Two Fashion-MNIST small-cnn models, cached under ``.rbl/models``: standard training (2 epochs on
20k images) and a short PGD adversarial training loop (Madry et al. 2018: PGD-7, Linf eps 0.1,
step 0.025, random start; 2 epochs on 10k images).  The PGD-AT loop here is a benchmark fixture,
not the registered ``pgd-at`` defense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustbench_lite import ops
from robustbench_lite.core.attack import EvasionAttack
from robustbench_lite.core.data import load
from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.registry import create_defense
from robustbench_lite.core.threat import Norm
from robustbench_lite.training.cache import ModelCache, train_or_load
from robustbench_lite.training.defense import Defense

CACHE = ".rbl/models"


@dataclass(frozen=True, kw_only=True)
class BenchPGDTraining(Defense):
    """CE at a PGD point (random start, ``steps`` signed steps of ``step``), eval-free (no BN)."""

    eps: float = 0.1
    steps: int = 7
    step: float = 0.025

    def batch_loss(self, model, x, y, state):
        x_adv = Norm.LINF.geometry.random_start(x, self.eps, torch.Generator().manual_seed(state.step))
        for _ in range(self.steps):
            _, _, g = EvasionAttack.loss_grad(model, x_adv, y, ops.ce)
            x_adv = Norm.LINF.geometry.project(x_adv + self.step * g.sign(), x, self.eps).detach()
        return F.cross_entropy(model(x_adv), y)


def standard_model(cache: str = CACHE):
    data = load("fashion-mnist", train_limit=20000)
    return train_or_load(ModelSpec("small-cnn"), create_defense("standard", epochs=2), data, ModelCache(cache), progress=False)


def pgd_at_model(cache: str = CACHE):
    data = load("fashion-mnist", train_limit=10000)
    defense = BenchPGDTraining(epochs=2, lr=1e-3)
    return train_or_load(ModelSpec("small-cnn"), defense, data, ModelCache(cache), progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for fn in (standard_model, pgd_at_model):
        tm = fn()
        print(fn.__name__, tm.key, "cached" if tm.from_cache else "trained", tm.sidecar["clean_acc"], tm.sidecar["train_seconds"])
