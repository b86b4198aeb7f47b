"""Feature collision, "Poison Frogs" (Shafahi, Huang, Najibi, Suciu, Studer, Dumitras, Goldstein,
"Poison frogs! Targeted clean-label poisoning attacks on neural networks", NeurIPS 2018).

Clean-label targeted poisoning: for a target test image ``t`` and base images ``b`` of the
attacker's class, craft ``p = argmin_x ||φ(x) − φ(t)||² + β ||x − b||²`` (eq. 1), ``φ`` the
penultimate-layer features of a fixed network, by forward-backward splitting (Algorithm 1):
forward ``x̂ = x − λ ∇_x ||φ(x) − φ(t)||²``, backward ``x = (x̂ + λβ b) / (1 + λβ)``.  As in the
authors' code, a step that increases the objective is undone and halves ``λ``.  β is scaled as
in §4.1: ``β = β₀ · dim(φ)² / dim(b)²`` with ``β₀ = 0.25``.  Optional watermark
``b ← γ t + (1 − γ) b`` (§4.2; ``γ = 0`` in the paper's transfer-learning setting).

The poisons keep their base class label.  Evaluation (the paper's fixed-feature-extractor
setting): retrain only the last layer on the poisoned training set; success = the target is
classified as the base class.  Changed from the paper: poisons are clipped to [0, 1] and to the
``(norm, eps)`` ball around their base after every step (``eps = 1`` Linf: no bound, as in the
paper).  The model must end in an ``nn.Linear`` (``φ`` = everything before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_lite import DataSplit, Norm, PoisoningAttack, register_attack, setting, split_head


@register_attack("feature-collision")
@dataclass(frozen=True, kw_only=True)
class FeatureCollision(PoisoningAttack):
    """Clean-label poisons whose features collide with one target test image."""

    norm: Norm = Norm.LINF
    eps: float = 1.0
    target_index: int = setting(0, low=0)  # index of the target image in the test split
    base_class: int = setting(0, low=0)
    n_poisons: int = setting(1, low=1)
    beta0: float = setting(0.25, low=0.0)
    lr: float = setting(0.01, low=0.0, low_open=True)  # λ, the forward step
    steps: int = setting(500, low=1)
    watermark: float = setting(0.0, low=0.0, high=1.0)  # γ

    norms = (Norm.LINF, Norm.L2)
    needs_model = True
    needs_test = True
    needs_grad = True

    def n_poison(self, n_train: int) -> int:
        return self.n_poisons

    def success_points(self, test: DataSplit) -> DataSplit:
        x = test.x[self.target_index : self.target_index + 1]
        return DataSplit(x, torch.full((1,), self.base_class, dtype=test.y.dtype))

    def _poison(self, train, gen, model, test):
        if self.target_index >= len(test):
            raise ValueError(f"target_index {self.target_index} is outside the test split ({len(test)} points)")
        if int(test.y[self.target_index]) == self.base_class:
            raise ValueError("the target already belongs to base_class; pick a target of another class")
        pool = (train.y == self.base_class).nonzero().flatten()
        if len(pool) < self.n_poisons:
            raise ValueError(f"class {self.base_class} has {len(pool)} training points, fewer than n_poisons")
        idx = pool[torch.randperm(len(pool), generator=gen, device=gen.device)[: self.n_poisons].to(pool.device)]
        features, _ = split_head(model)
        t = test.x[self.target_index : self.target_index + 1].to(train.x.device)
        base = train.x[idx]
        base = (self.watermark * t + (1 - self.watermark) * base).clamp(0, 1)
        phi_t = features(t)
        beta = self.beta0 * phi_t[0].numel() ** 2 / base[0].numel() ** 2

        def feature_loss(x):
            return ((features(x) - phi_t) ** 2).flatten(1).sum(1)

        def objective(x):
            return feature_loss(x) + beta * ((x - base) ** 2).flatten(1).sum(1)

        x = base.clone()
        lam = torch.full((len(x), 1, 1, 1), self.lr, dtype=x.dtype, device=x.device)
        obj = objective(x)
        for _ in range(self.steps):
            xg = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(feature_loss(xg).sum(), xg)
            x_hat = x - lam * g
            new = ((x_hat + lam * beta * base) / (1 + lam * beta)).clamp(0, 1)
            new = self.geometry.project(new, train.x[idx], self.eps)
            new_obj = objective(new)
            worse = new_obj > obj
            x = torch.where(worse.view(-1, 1, 1, 1), x, new)
            obj = torch.where(worse, obj, new_obj)
            lam = torch.where(worse.view(-1, 1, 1, 1), lam / 2, lam)
        xs, ys = train.x.clone(), train.y.clone()
        xs[idx] = x
        return DataSplit(xs, ys)
