"""What the benchmark scripts share: fixture models, an interleaved median timer, the common
command-line arguments, and two model wrappers (one logging forward batch sizes, one computing a
function).

The scripts run as ``python scripts/bench_x.py``; Python puts the script's folder first on
``sys.path``, so ``import bench_common`` finds this module.

Fixtures, each trained once through :func:`~robustbench_lite.train_or_load` into one cache
folder, :data:`CACHE` (models are keyed by their config hash, so scripts that ask for the same
settings share a model and different settings never collide):

* :func:`standard_model`: small-cnn, standard training on the first ``train_limit`` Fashion-MNIST
  training images (default 20k images, 2 epochs; the other settings are the defense's defaults
  unless a script passes them).
* :func:`pgd_at_model`: small-cnn, the registered ``pgd-at`` defense (Madry et al., ICLR 2018):
  PGD-7, Linf eps 0.1, step 0.025, uniform random start, 2 epochs on 10k images.
* :func:`digits_model`: small-cnn on scikit-learn's digits with the test suite's settings.

Timing: :func:`interleaved` runs the compared implementations in rounds, each once per round,
starting each round one implementation later, so load on a shared machine hits all alike; it keeps
wall and process CPU seconds per run and reports medians.  With one torch thread, process CPU time
is the steadier measure of the work done on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustbench_lite import (
    Data,
    Defense,
    ModelCache,
    ModelSpec,
    TrainedModel,
    create_defense,
    load,
    train_or_load,
)

CACHE = Path(".rbl/bench-models")
SMALL_CNN = ModelSpec("small-cnn")


# -- command line ---------------------------------------------------------------------------------
def parser(
    doc: str | None,
    *,
    n: int | None = None,
    rounds: int | None = None,
    threads: int = 1,
    device: bool = False,
) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as its help and the common arguments:
    ``--threads`` and ``--seed`` always, ``--n`` / ``--rounds`` when the script has a default for
    them, ``--device`` when the script can run off the CPU."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks and the script's random draws (fixtures train with 0)")
    if n is not None:
        p.add_argument("--n", type=int, default=n, help="test points")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds (median reported)")
    if device:
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, then set the torch thread count and seed torch's and numpy's global generators."""
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return args


def environment() -> str:
    """One line naming what the figures were measured with."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


# -- fixtures -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fixture:
    """A trained fixture model (in ``eval()`` mode) with the data it was trained on."""

    model: nn.Module
    data: Data
    trained: TrainedModel

    def describe(self) -> str:
        side = self.trained.sidecar
        origin = "cached" if self.trained.from_cache else "trained"
        return (f"{side['model']['name']}, {side['defense']}, {side['train_points']} {side['data']} training images, "
                f"test clean_acc {side['clean_acc']:.4f}, train {side['train_seconds']:.0f} s "
                f"({origin}, key {self.trained.key})")

    def correct_test_points(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Those of the first ``n`` test points the model classifies correctly (what minimum-norm
        attacks are compared on)."""
        x, y = self.data.test.x[:n], self.data.test.y[:n]
        with torch.no_grad():
            ok = self.model(x).argmax(1) == y
        return x[ok], y[ok]


def train(spec: ModelSpec, defense: Defense, data: Data, *, device: str = "cpu", cache: Path = CACHE) -> Fixture:
    """``train_or_load`` into the benchmark cache (``cache`` for a model that must not share a
    key with another, e.g. the same settings trained with a monitoring subclass)."""
    trained = train_or_load(spec, defense, data, ModelCache(cache), device=device, progress=False)
    return Fixture(trained.model.eval(), data, trained)


def standard_model(train_limit: int | None = 20000, epochs: int = 2, *, device: str = "cpu", **settings) -> Fixture:
    """small-cnn, standard training on the first ``train_limit`` Fashion-MNIST training images
    (``None``: all 60k); ``settings`` go to the ``standard`` defense."""
    data = load("fashion-mnist", train_limit=train_limit)
    return train(SMALL_CNN, create_defense("standard", epochs=epochs, **settings), data, device=device)


def pgd_at_model(*, device: str = "cpu") -> Fixture:
    """small-cnn, PGD adversarial training (PGD-7, Linf 0.1, step 0.025), 2 epochs on 10k images."""
    data = load("fashion-mnist", train_limit=10000)
    defense = create_defense("pgd-at", epochs=2, eps=0.1, steps=7, step=0.025)
    return train(SMALL_CNN, defense, data, device=device)


def digits_model(*, device: str = "cpu") -> Fixture:
    """small-cnn on digits, standard training with the test suite's ``digits_model`` settings."""
    defense = create_defense("standard", epochs=8, batch_size=64, lr=3e-3)
    return train(SMALL_CNN, defense, load("digits"), device=device)


# -- timing ---------------------------------------------------------------------------------------
def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str | torch.device | None = None) -> tuple[Any, float, float]:
    """``(fn(), wall seconds, CPU seconds of this process)``; waits for CUDA work on ``device``."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Timing:
    """Every round's wall and CPU seconds and result of one implementation."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def result(self) -> Any:
        """The last round's result."""
        return self.results[-1]


def interleaved(
    impls: Mapping[str, Callable[[], Any]], rounds: int, device: str | torch.device | None = None
) -> dict[str, Timing]:
    """Run each implementation once per round, round ``r`` starting at the ``r mod k``-th one (so
    none always runs first), and keep each run's wall and CPU seconds and result."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(impls)
    out = {name: Timing() for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            result, wall, cpu = timed(impls[name], device)
            out[name].wall.append(wall)
            out[name].cpu.append(cpu)
            out[name].results.append(result)
    return out


# -- model wrappers -------------------------------------------------------------------------------
class ForwardLog(nn.Module):
    """Wraps a model and records the batch size of every forward call (for libraries that do not
    count their model evaluations, and for attacks whose batch shrinks as points succeed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    @property
    def images(self) -> int:
        return sum(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.model(x)


class Lambda(nn.Module):
    """A parameter-free layer computing ``fn(x)`` (to build wrapped models from functions)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def preset_recipe(name: str, preset: str = "full") -> tuple[ModelSpec, Any, Any]:
    """The model spec, defense spec and data spec a built-in preset trains ``name`` with (its paired
    model if it has one), so a script's model has the preset's cache key."""
    from robustbench_lite.harness.presets import get_preset  # late: the harness is heavy

    p = get_preset(preset)
    for model, spec in p.paired:
        if spec.name == name:
            return model, spec, p.data[0]
    for spec in p.defenses:
        if spec.name == name:
            return p.models[0], spec, p.data[0]
    raise SystemExit(f"{name!r} is not a defense of the {preset!r} preset")


def preset_model(name: str, cache: Path, preset: str = "full") -> Fixture:
    """The model ``preset`` trains for defense ``name``, loaded from (or trained into) ``cache``."""
    model, spec, data_spec = preset_recipe(name, preset)
    data = load(data_spec.name, val_fraction=data_spec.val_fraction, train_limit=data_spec.train_limit)
    return train(model, spec.build(), data, cache=cache)
