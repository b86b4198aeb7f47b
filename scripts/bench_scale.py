#!/usr/bin/env python
"""Scale measurements: how evaluation time grows with n, local vs Ray, and batch autotuning.

1. Eval seconds (FGSM + PGD, batch 500) on the first n = 500, 1000, 2000 Fashion-MNIST test
   points of a small-cnn (standard training, 1 epoch on 5000 images); the log-log slope of
   seconds against n is the growth exponent (linear: 1).
2. The autotune table: PGD (Linf 0.1, `--steps` steps) seconds on 2000 points for each batch of
   {64, 128, 256, 500, 1000, 2000}, side by side; the batch the probe picks
   (:class:`robustbench_lite.harness.autotune.BatchTuner`, no cache) and whether its PGD time is within
   10% of the best.  Then the autotuned batch vs the fixed default 500.
3. Local vs Ray (2 workers): the smoke preset with two seeds of its defense (two groups, trained
   from scratch in a fresh workdir each time), wall seconds; ``ray.init`` is timed separately.

Every timing is the median over `--rounds` interleaved rounds (the machine is shared).  With one
torch thread, this process's CPU time (``time.process_time``) is reported next to wall time: on a
contended CPU it is the steadier measure of the work done, so the autotune table ranks by it and
the probe uses the same clock (``BatchTuner(clock="process")``).  Ray workers run in other
processes, so the local-vs-Ray comparison is wall time only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from robustbench_lite.core.data import load
from robustbench_lite.core.device import make_policy
from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.registry import create_attack, create_defense
from robustbench_lite.eval.evasion import evaluate, run_attack
from robustbench_lite.harness.autotune import CANDIDATES, BatchTuner
from robustbench_lite.harness.plan import Plan
from robustbench_lite.harness.presets import get_preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.training.cache import ModelCache, train_or_load


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(ys) on log(xs)."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def two_groups(n: int) -> Plan:
    cells = get_preset("smoke").plan(n=n).cells
    reseeded = tuple(
        dataclasses.replace(c, defense=dataclasses.replace(c.defense, params={**c.defense.params, "seed": 1}))
        for c in cells
    )
    return Plan("two-groups", cells + reseeded)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="PGD steps in the autotune table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--workdir", default=".rbl-bench-scale")
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), rounds={args.rounds}, median of interleaved rounds")

    data = load("fashion-mnist", train_limit=5000)
    defense = create_defense("standard", epochs=1, batch_size=64, lr=2e-3)
    model = train_or_load(ModelSpec("small-cnn"), defense, data, ModelCache(Path(args.workdir) / "models"), progress=False).model
    policy = make_policy("cpu")
    attacks = [create_attack("fgsm", eps=0.1), create_attack("pgd", eps=0.1, steps=10)]

    # 1. growth in n
    sizes = [500, 1000, 2000]
    times: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    for r in range(args.rounds):
        for n in sizes[r % 3 :] + sizes[: r % 3]:
            times[n].append(timed2(lambda n=n: evaluate(model, attacks, data.test, n=n, batch_size=500, policy=policy)))
    med = {n: medians(ts) for n, ts in times.items()}
    print("\n## eval seconds vs n (FGSM + PGD-10, Linf 0.1, batch 500; clean pass and model checks included)")
    print("| n | wall s (median) | CPU s (median) | CPU s per 1000 points |")
    print("|---|---|---|---|")
    for n in sizes:
        print(f"| {n} | {med[n][0]:.2f} | {med[n][1]:.2f} | {1000 * med[n][1] / n:.2f} |")
    print(f"log-log exponent: wall {slope(sizes, [med[n][0] for n in sizes]):.3f}, "
          f"CPU {slope(sizes, [med[n][1] for n in sizes]):.3f} (linear = 1)")

    # 2. the autotune table
    test = data.test.head(2000)
    pgd = create_attack("pgd", eps=0.1, steps=args.steps)
    mask = torch.ones(len(test), dtype=torch.bool)
    pgd_times: dict[int, list[tuple[float, float]]] = {b: [] for b in CANDIDATES}
    for r in range(args.rounds):
        order = list(CANDIDATES[r % 6 :] + CANDIDATES[: r % 6])
        for b in order:
            pgd_times[b].append(timed2(lambda b=b: run_attack(model, pgd, test, mask, device=policy.device, batch_size=b)))
    pgd_med = {b: medians(ts) for b, ts in pgd_times.items()}
    tuner = BatchTuner(None, rounds=args.rounds, clock="process")
    t0 = time.perf_counter()
    picked = tuner.batch_for(model, "bench", "grad", test.x, test.y, policy)
    probe_seconds = time.perf_counter() - t0
    best = min(pgd_med, key=lambda b: pgd_med[b][1])
    best_wall = min(pgd_med, key=lambda b: pgd_med[b][0])
    print(f"\n## autotune table: PGD-{args.steps} on 2000 points, Linf 0.1")
    print("| batch | PGD wall s (median) | PGD CPU s (median) | CPU / best CPU | wall / best wall |")
    print("|---|---|---|---|---|")
    for b in CANDIDATES:
        mark = " (picked)" if b == picked else ""
        w, c = pgd_med[b]
        print(f"| {b}{mark} | {w:.2f} | {c:.2f} | {c / pgd_med[best][1]:.3f} | {w / pgd_med[best_wall][0]:.3f} |")
    ratio = pgd_med[picked][1] / pgd_med[best][1]
    ratio_w = pgd_med[picked][0] / pgd_med[best_wall][0]
    print(f"autotune picked {picked} (probe {probe_seconds:.1f} s wall); best by CPU time {best}, by wall {best_wall}; "
          f"picked/best CPU = {ratio:.3f} -> {'within' if ratio <= 1.10 else 'NOT within'} 10%; "
          f"picked/best wall = {ratio_w:.3f} -> {'within' if ratio_w <= 1.10 else 'NOT within'} 10%")

    # autotuned vs fixed 500, on the evaluation (FGSM + PGD-10, n = 2000)
    tuned_t: list[tuple[float, float]] = []
    fixed_t: list[tuple[float, float]] = []
    for r in range(args.rounds):
        runs = [(tuned_t, picked), (fixed_t, 500)]
        for sink, b in runs if r % 2 == 0 else runs[::-1]:
            sink.append(timed2(lambda b=b: evaluate(model, attacks, data.test, n=2000, batch_size=b, policy=policy)))
    (tw, tc), (fw, fc) = medians(tuned_t), medians(fixed_t)
    print("\n## autotuned vs fixed batch (FGSM + PGD-10, n = 2000)")
    print(f"| batch | wall s (median) | CPU s (median) |\n|---|---|---|\n| {picked} (autotuned) | {tw:.2f} | {tc:.2f} |"
          f"\n| 500 (fixed) | {fw:.2f} | {fc:.2f} |")

    # 3. local vs Ray
    if args.skip_ray:
        return
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    from robustbench_lite.harness.ray_executor import RayExecutor

    plan = two_groups(200)
    local_t: list[float] = []
    ray_t: list[float] = []
    for r in range(args.rounds):
        runs = [(local_t, None), (ray_t, RayExecutor())]
        for sink, ex in runs if r % 2 == 0 else runs[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                sink.append(timed(lambda ex=ex, tmp=tmp: run_plan(plan, workdir=tmp, progress=False, executor=ex)))
    ray.shutdown()
    print("\n## local vs Ray (smoke preset x 2 defense seeds = 2 groups, 10 cells, training included)")
    print("| executor | wall seconds (median) |\n|---|---|")
    print(f"| local (1 process, {args.threads} thread) | {statistics.median(local_t):.2f} |")
    print(f"| ray (2 workers, 1 CPU each) | {statistics.median(ray_t):.2f} |")
    print(f"ray.init (local 2-CPU instance, paid once): {init_s:.1f} s")


if __name__ == "__main__":
    main()
