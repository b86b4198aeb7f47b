"""Label flipping (e.g. Biggio, Nelson, Laskov, "Poisoning attacks against support vector
machines", ICML 2012, §6 baseline; Xiao et al. 2012): relabel a fraction of the training points.

``mode="random"``: ``round(rate · n)`` points drawn at random get a label drawn uniformly from
the other classes (an availability attack: its effect is the drop in clean accuracy).
``mode="targeted"``: ``round(rate · n)`` points of class ``source`` are relabelled ``target``;
success = fraction of test points of class ``source`` classified as ``target``.
Images are not touched (``eps`` is irrelevant: every poison is at distance 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustbench_lite import DataSplit, Norm, PoisoningAttack, register_attack, setting


@register_attack("label-flip")
@dataclass(frozen=True, kw_only=True)
class LabelFlip(PoisoningAttack):
    """Random or class-targeted label flipping."""

    norm: Norm = Norm.L0
    eps: float = 1.0
    rate: float = setting(0.1, low=0.0, high=1.0, low_open=True)
    mode: str = setting("random", choices=("random", "targeted"))
    source: int = setting(0, low=0)
    target: int = setting(1, low=0)
    num_classes: int = setting(0, low=0)  # 0: infer as max label + 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "targeted" and self.source == self.target:
            raise ValueError("targeted label flipping needs source != target")

    def n_poison(self, n_train: int) -> int:
        return int(round(self.rate * n_train))

    def success_points(self, test: DataSplit) -> DataSplit | None:
        if self.mode == "random":
            return None
        keep = test.y == self.source
        return DataSplit(test.x[keep], torch.full((int(keep.sum()),), self.target, dtype=test.y.dtype))

    def _poison(self, train, gen, model, test):
        n = self.n_poison(len(train))
        k = self.num_classes or int(train.y.max()) + 1
        if k < 2:
            raise ValueError("label flipping needs at least two classes; set num_classes")
        y = train.y.clone()
        if self.mode == "random":
            idx = torch.randperm(len(y), generator=gen, device=gen.device)[:n].to(y.device)
            shift = torch.randint(1, k, (n,), generator=gen, device=gen.device).to(y.device)
            y[idx] = (y[idx] + shift) % k
        else:
            pool = (train.y == self.source).nonzero().flatten()
            if n > len(pool):
                raise ValueError(f"rate {self.rate} asks for {n} flips but class {self.source} has {len(pool)} points")
            idx = pool[torch.randperm(len(pool), generator=gen, device=gen.device)[:n].to(pool.device)]
            y[idx] = self.target
        return DataSplit(train.x.clone(), y)
