"""Batch-size autotuning and out-of-memory recovery.

The best evaluation batch depends on the machine: on a CPU, PGD on a small CNN is fastest with
mid-sized batches (large ones fall out of cache), on a GPU it is the largest batch that fits.  A
short probe times one PGD-like step (forward and input-gradient backward, in the attack's autocast)
over the same points in each candidate batch size, in interleaved rounds (the median per
candidate, so a busy machine slows every candidate alike), and keeps the fastest.  Choices are
cached in a JSON file per (model, attack step, device, probe size), so a rerun does not probe again.

:func:`halving_on_oom` runs a batched job and, when CUDA runs out of memory, halves the batch
and retries instead of failing the cell.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..core.device import DevicePolicy, is_oom
from ..core.ops import ce

log = logging.getLogger(__name__)

CANDIDATES = (64, 128, 256, 500, 1000, 2000)
PASSES = ("grad", "forward")  # attacks that take input gradients | forward-only (score based)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}  # process: CPU time of this process
T = TypeVar("T")


def candidate_batches(n: int, candidates: tuple[int, ...] = CANDIDATES) -> tuple[int, ...]:
    """The candidates bounded by ``n`` (a candidate above ``n`` becomes ``n``), ascending."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not candidates or any(c < 1 for c in candidates):
        raise ValueError(f"candidates must be positive batch sizes, got {candidates!r}")
    return tuple(sorted({min(c, n) for c in candidates}))


def attack_pass(attack: object) -> str:
    """The pass an attack repeats: ``grad`` for attacks that need input gradients, else ``forward``."""
    return "grad" if getattr(attack, "needs_grad", True) else "forward"


def time_pass(
    model: nn.Module, x: Tensor, y: Tensor, batch: int, step: str, policy: DevicePolicy, clock: str = "wall"
) -> float:
    """Seconds for one PGD-like step (``grad``: forward + input gradient; ``forward``: forward only)
    over all of ``x`` in batches of ``batch``.  ``clock``: ``wall``, or ``process`` (this process's
    CPU time: steadier on a shared CPU, blind to GPU time)."""
    if step not in PASSES:
        raise ValueError(f"unknown step {step!r}; use one of {PASSES}")
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; use one of {sorted(CLOCKS)}")
    now = CLOCKS[clock]
    model.eval()
    start = now()
    for i in range(0, len(x), batch):
        xb, yb = policy.batch_to(x[i : i + batch]), policy.batch_to(y[i : i + batch])
        if step == "grad":
            xb = xb.clone().requires_grad_(True)
            with torch.enable_grad(), policy.autocast("attack"):
                loss = ce(model(xb), yb).sum()
            torch.autograd.grad(loss, xb)
        else:
            with torch.no_grad(), policy.autocast("attack"):
                model(xb)
    if policy.is_cuda:
        torch.cuda.synchronize(policy.device)
    return now() - start


def probe(
    model: nn.Module, x: Tensor, y: Tensor, *, step: str = "grad", policy: DevicePolicy,
    candidates: tuple[int, ...] = CANDIDATES, rounds: int = 3,
    timer: Callable[..., float] = time_pass, clock: str = "wall",
) -> dict[int, float]:
    """Median seconds of one step over ``x`` per candidate batch size (bounded by ``len(x)``).

    Rounds are interleaved (every candidate once per round, the order rotated each round) after
    one untimed warm-up pass; a candidate that runs out of CUDA memory gets ``inf``, and so do
    the larger ones (they are not tried)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    cands = list(candidate_batches(len(x), candidates))
    timer(model, x, y, cands[0], step, policy, clock)  # warm-up: allocator, kernels, caches
    times: dict[int, list[float]] = {b: [] for b in cands}
    too_big: int | None = None
    for r in range(rounds):
        for b in cands[r % len(cands) :] + cands[: r % len(cands)]:
            if too_big is not None and b >= too_big:
                continue
            try:
                times[b].append(timer(model, x, y, b, step, policy, clock))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                too_big = b if too_big is None else min(too_big, b)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return {b: (statistics.median(ts) if ts and (too_big is None or b < too_big) else float("inf")) for b, ts in times.items()}


def pick(timings: dict[int, float]) -> int:
    """The fastest batch size (the larger one on a tie)."""
    finite = {b: t for b, t in timings.items() if t != float("inf")}
    if not finite:
        raise RuntimeError("every candidate batch size ran out of memory; lower the candidates")
    return min(finite, key=lambda b: (finite[b], -b))


@dataclass
class BatchTuner:
    """Picks and caches the evaluation batch size per (model, attack step, device, probe size).

    ``path`` is the JSON cache (``None``: no cache); the probe uses the first
    ``min(n, probe_points)`` evaluation points and times them with ``clock`` (see
    :func:`time_pass`)."""

    path: Path | None
    candidates: tuple[int, ...] = CANDIDATES
    rounds: int = 3
    probe_points: int = 2000
    clock: str = "wall"

    def cache_key(self, model_key: str, step: str, policy: DevicePolicy, points: int) -> str:
        dtype = policy.attack_dtype
        return f"{model_key}|{step}|{policy.device}|{'float32' if dtype is None else str(dtype)[6:]}|{points}"

    def load(self) -> dict[str, dict]:
        """The cached choices; a file that does not parse or is not a JSON object counts as
        empty (with a warning: every choice is probed again and the file rewritten)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            table = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("autotune cache %s does not parse (%s); probing again", self.path, type(exc).__name__)
            return {}
        if not isinstance(table, dict):
            log.warning("autotune cache %s holds a %s, not a JSON object; probing again", self.path, type(table).__name__)
            return {}
        return table

    def cached(self, key: str, points: int) -> int | None:
        """The cached batch for ``key`` if it is a valid choice (else ``None``, with a warning
        for an entry that is there but wrong)."""
        hit = self.load().get(key)
        if hit is None:
            return None
        batch = hit.get("batch") if isinstance(hit, dict) else None
        if isinstance(batch, bool) or not isinstance(batch, int) or batch not in candidate_batches(points, self.candidates):
            log.warning("autotune cache %s: entry %s holds batch %r, not one of the candidates; probing again",
                        self.path, key, batch if isinstance(hit, dict) else hit)
            return None
        return batch

    def batch_for(
        self, model: nn.Module, model_key: str, step: str, x: Tensor, y: Tensor, policy: DevicePolicy
    ) -> int:
        """The cached choice, or probe ``x[:probe_points]`` and cache the fastest batch."""
        points = min(len(x), self.probe_points)
        key = self.cache_key(model_key, step, policy, points)
        hit = self.cached(key, points)
        if hit is not None:
            return hit
        timings = probe(
            model, x[:points], y[:points], step=step, policy=policy, candidates=self.candidates, rounds=self.rounds,
            clock=self.clock,
        )
        batch = pick(timings)
        log.info("autotune %s: batch %d (%s)", key, batch, {b: round(t, 4) for b, t in timings.items()})
        entry = {"batch": batch, "seconds": {str(b): t for b, t in timings.items()}, "rounds": self.rounds, "clock": self.clock}
        self._save(key, entry)
        return batch

    def _save(self, key: str, entry: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        table = self.load()  # re-read: another worker may have added entries
        table[key] = entry
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
