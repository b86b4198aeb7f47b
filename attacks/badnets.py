"""BadNets backdoor poisoning (Gu, Dolan-Gavitt, Garg, "BadNets: identifying vulnerabilities in
the machine learning model supply chain", 2017).

Stamp a small trigger (a ``patch × patch`` checkerboard of 1s and 0s, one pixel in from a
corner) on ``rate · n`` training points and relabel them to ``target``.  Poisons are drawn, by
the seeded generator, among the points whose label is not ``target`` (so every poison changes
its label and the number of changed points is exactly ``round(rate · n)``).  Metrics: clean
test accuracy, and attack success rate = the fraction of triggered test points with true class
``!= target`` that are classified as ``target`` (:meth:`BadNets.success_points`).

Threat: ``norm = L0`` and ``eps`` (pixels a poison may change) must be at least ``patch²``.

Default trigger: a 3x3 checkerboard (5 white, 4 black pixels) one pixel in from the bottom-right
corner, target class 0, rate 5%.  Why: the paper's MNIST "pattern" backdoor is a small pattern
of a few pixels in the bottom-right corner, where 28x28 digit and garment images are almost
always black; a checkerboard (rather than a solid white square) has both pixel values, so it
differs from the background and from bright garment borders alike, and 3x3 keeps the poison at
9 changed pixels.  The rate acts as a poison count: with too few triggered examples (a couple of
hundred on Fashion-MNIST) the backdoor does not fully install, whatever the share of the training
set they are (BENCHMARKS.md, poisoning, has the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustbench_lite import DataSplit, Norm, PoisoningAttack, register_attack, setting

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


@register_attack("badnets")
@dataclass(frozen=True, kw_only=True)
class BadNets(PoisoningAttack):
    """Patch-trigger backdoor with a fixed target label."""

    norm: Norm = Norm.L0
    eps: float = 9.0
    rate: float = setting(0.05, low=0.0, high=1.0, low_open=True)
    target: int = setting(0, low=0)
    patch: int = setting(3, low=1)
    corner: str = setting("bottom-right", choices=CORNERS)

    norms = (Norm.L0,)
    has_trigger = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps < self.patch**2:
            raise ValueError(f"badnets changes up to patch² = {self.patch**2} pixels: use eps >= {self.patch**2}")

    def n_poison(self, n_train: int) -> int:
        return int(round(self.rate * n_train))

    def _slices(self, h: int, w: int) -> tuple[slice, slice]:
        if self.patch + 1 > min(h, w):
            raise ValueError(f"patch {self.patch} does not fit in {h}x{w} images; use a smaller patch")
        r0 = h - 1 - self.patch if self.corner.startswith("bottom") else 1
        c0 = w - 1 - self.patch if self.corner.endswith("right") else 1
        return slice(r0, r0 + self.patch), slice(c0, c0 + self.patch)

    def trigger(self, x: Tensor) -> Tensor:
        """``x`` with the checkerboard patch stamped (a new tensor)."""
        rows, cols = self._slices(x.shape[-2], x.shape[-1])
        i = torch.arange(self.patch, device=x.device)
        pattern = ((i[:, None] + i[None, :]) % 2 == 0).to(x.dtype)
        out = x.clone()
        out[..., rows, cols] = pattern
        return out

    def success_points(self, test: DataSplit) -> DataSplit:
        keep = test.y != self.target
        x = self.trigger(test.x[keep])
        return DataSplit(x, torch.full((x.shape[0],), self.target, dtype=test.y.dtype))

    def _poison(self, train, gen, model, test):
        n = self.n_poison(len(train))
        pool = (train.y != self.target).nonzero().flatten()
        if n > len(pool):
            raise ValueError(f"rate {self.rate} asks for {n} poisons but only {len(pool)} points are not of class {self.target}")
        idx = pool[torch.randperm(len(pool), generator=gen, device=gen.device)[:n].to(pool.device)]
        x, y = train.x.clone(), train.y.clone()
        x[idx] = self.trigger(x[idx])
        y[idx] = self.target
        return DataSplit(x, y)
