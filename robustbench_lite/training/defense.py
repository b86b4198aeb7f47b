"""Defense base class: a frozen training config plus the loss it trains on.

The base class owns the training loop (optimizer and learning-rate schedule, epochs, seed,
batching, gradient clipping, tqdm progress, validation accuracy per epoch), so a defense that is
a loss implements only :meth:`Defense.batch_loss`.  Defenses that are not a loss (e.g. convex
training) override :meth:`Defense.fit`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import MAX_SEED, Plugin, setting
from ..core.data import Data
from ..core.device import DevicePolicy, as_policy
from ..core.models import accuracy
from ..core.progress import Progress


@dataclass
class TrainState:
    """Mutable per-run state a loss may need (epoch, step, e.g. ELLE-A's lambda history)."""

    epoch: int = 0
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    gen: torch.Generator | None = None  #: seeded; the randomness of a loss (random starts, ELLE's samples)
    metrics: dict[str, float] = field(default_factory=dict)  #: set by a loss; merged into the epoch record


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_acc: float | None
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainLog:
    """What training did: per-epoch curve and totals (stored in the model's JSON sidecar)."""

    epochs: list[EpochRecord]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "epochs": [
                {"epoch": e.epoch, "train_loss": e.train_loss, "val_acc": e.val_acc, "seconds": e.seconds, **e.metrics}
                for e in self.epochs
            ],
        }


@dataclass(frozen=True, kw_only=True)
class Defense(Plugin):
    """Training settings shared by every defense."""

    epochs: int = setting(5, low=1, high=10_000)
    batch_size: int = setting(128, low=1)
    optimizer: str = setting("adam", choices=("adam", "sgd"))
    lr: float = setting(1e-3, low=0.0, low_open=True)
    momentum: float = setting(0.9, low=0.0, high=1.0)
    weight_decay: float = setting(0.0, low=0.0)
    schedule: str = setting("cosine", choices=("constant", "cosine", "cyclic"))
    grad_clip: float = setting(0.0, low=0.0)
    seed: int = setting(0, low=0, high=MAX_SEED)
    monitor_eps: float = setting(0.0, low=0.0, high=1.0)  #: > 0: PGD accuracy on held-out points per epoch
    monitor_points: int = setting(500, low=1)
    monitor_steps: int = setting(10, low=1)

    #: trains under the policy's autocast (a mixed-precision model gets its own cache key)
    uses_autocast: ClassVar[bool] = True
    #: fitting reads the training split (a defense that only loads weights says False)
    needs_training_data: ClassVar[bool] = True

    def generator(self, state: TrainState) -> torch.Generator:
        """The run's seeded generator for a loss's random choices (one is made if absent)."""
        if state.gen is None:
            state.gen = torch.Generator().manual_seed(self.seed + 1)
        return state.gen

    # -- what plugins implement -------------------------------------------------------------------
    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor, state: TrainState) -> Tensor:
        """The scalar training loss on one batch (model is in train mode)."""
        raise NotImplementedError

    def epoch_metrics(self, model: nn.Module, data: Data, device: torch.device) -> dict[str, float]:
        """Extra per-epoch numbers for the curve.

        With ``monitor_eps > 0``: ``pgd_acc``, the Linf PGD (``monitor_steps`` steps, random
        start) accuracy on ``monitor_points`` held-out points (the validation split if there is
        one, else the head of the test split), the catastrophic-overfitting detector of Wong et
        al. (2020).
        """
        if self.monitor_eps <= 0:
            return {}
        from ..core.registry import create_attack  # late: attacks import this package

        split = data.val if data.val is not None else data.test
        split = split.head(self.monitor_points)
        attack = create_attack("pgd", eps=self.monitor_eps, steps=self.monitor_steps, seed=self.seed)
        correct = 0
        for i in range(0, len(split), 500):
            x, y = split.x[i : i + 500].to(device), split.y[i : i + 500].to(device)
            x_adv = attack.perturb(model, x, y)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == y).sum())
        return {"pgd_acc": correct / len(split)}

    # -- the loop -------------------------------------------------------------------------------
    def fit(
        self, model: nn.Module, data: Data, *, device: torch.device | str = "cpu", progress: bool | Progress = True,
        policy: DevicePolicy | None = None,
    ) -> TrainLog:
        """Train ``model`` in place on ``data.train``; return the per-epoch log.  ``progress``
        (``True``, ``False`` or a :class:`~robustbench_lite.core.progress.Progress`) shows the steps.

        ``policy`` (default: float32 on ``device``) says where the model and batches go and how:
        autocast for the losses, a loss scaler for fp16, cudnn.benchmark, pinned copies."""
        policy = policy if policy is not None else as_policy(device)
        device = policy.device
        torch.manual_seed(self.seed)
        policy.model_to(model, training=True)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        n = len(data.train)
        steps_per_epoch = math.ceil(n / self.batch_size)
        total_steps = self.epochs * steps_per_epoch
        factor = lr_factor(self.schedule, total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if self.schedule != "constant" else None
        gen = torch.Generator().manual_seed(self.seed)
        x_all, y_all = data.train.x, data.train.y
        state = TrainState(gen=torch.Generator().manual_seed(self.seed + 1))
        records: list[EpochRecord] = []
        start = time.perf_counter()
        bar = Progress.of(progress).task(
            f"train {self.name} ({self.epochs} epochs on {n} images)", total_steps, unit="step"
        )
        scaler = policy.grad_scaler()
        try:
            with policy.training():
                for epoch in range(self.epochs):
                    state.epoch = epoch
                    t0 = time.perf_counter()
                    perm = torch.randperm(n, generator=gen)
                    total, count = 0.0, 0
                    model.train()
                    for i in range(steps_per_epoch):
                        idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
                        xb, yb = policy.batch_to(x_all[idx], training=True), policy.batch_to(y_all[idx], training=True)
                        with policy.autocast("train"):
                            loss = self.batch_loss(model, xb, yb, state)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"{self.name}: training loss became {float(loss.detach())} at epoch {epoch}, step {i}; lower lr"
                            )
                        opt.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        if self.grad_clip > 0:
                            scaler.unscale_(opt)
                            nn.utils.clip_grad_norm_(params, self.grad_clip)
                        scaler.step(opt)
                        scaler.update()
                        if sched is not None:
                            sched.step()
                        state.step += 1
                        total += float(loss.detach()) * len(idx)
                        count += len(idx)
                        bar.update(1)
                    model.eval()
                    val_acc = accuracy(model, data.val, device) if data.val is not None else None
                    metrics = {**state.metrics, **self.epoch_metrics(model, data, device)}
                    state.metrics.clear()
                    records.append(EpochRecord(epoch, total / max(count, 1), val_acc, time.perf_counter() - t0, metrics))
                    bar.describe(f"loss {total / max(count, 1):.3f}" + (f", val {val_acc:.3f}" if val_acc is not None else ""))
        except BaseException:
            bar.close(ok=False)
            raise
        bar.close(f"{self.epochs} epochs, loss {records[-1].train_loss:.3f}" if records else None)
        model.eval()
        return TrainLog(records, time.perf_counter() - start)


def lr_factor(schedule: str, total_steps: int):
    """The learning-rate multiplier at step ``s`` of ``total_steps`` (a pure function).

    ``constant``: 1.  ``cosine``: half a cosine from 1 to 0.  ``cyclic``: one triangle, linear
    from about 0 up to 1 at 2/5 of training and back down to 0 (the cyclic schedule of Wong, Rice &
    Kolter's fast adversarial training, after Smith's one-cycle policy).
    """
    if schedule == "constant":
        return lambda s: 1.0
    if schedule == "cosine":
        return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    if schedule == "cyclic":
        peak = max(1, round(0.4 * total_steps))
        return lambda s: min(s + 1, peak) / peak if s < peak else max(0.0, (total_steps - s) / max(1, total_steps - peak))
    raise ValueError(f"schedule must be 'constant', 'cosine' or 'cyclic', got {schedule!r}")
