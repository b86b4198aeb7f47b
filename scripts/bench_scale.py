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

    python scripts/bench_scale.py [--rounds 3] [--steps 5] [--threads 1] [--skip-ray]
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile

import bench_common as bc
import torch

from robustbench_lite import create_attack, evaluate, make_policy
from robustbench_lite.eval.evasion import run_attack
from robustbench_lite.harness.autotune import CANDIDATES, BatchTuner
from robustbench_lite.harness.plan import Plan
from robustbench_lite.harness.presets import get_preset
from robustbench_lite.harness.run import run_plan


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(ys) on log(xs)."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def two_groups(n: int) -> Plan:
    cells = get_preset("smoke").plan(n=n).cells
    reseeded = tuple(
        dataclasses.replace(c, defense=dataclasses.replace(c.defense, params={**c.defense.params, "seed": 1}))
        for c in cells
    )
    return Plan("two-groups", cells + reseeded)


def main() -> None:
    p = bc.parser(__doc__, rounds=3, device=True)
    p.add_argument("--steps", type=int, default=5, help="PGD steps in the autotune table")
    p.add_argument("--skip-ray", action="store_true")
    args = bc.parse(p)
    print(f"{bc.environment()}, rounds={args.rounds}, median of interleaved rounds")

    fixture = bc.standard_model(train_limit=5000, epochs=1, batch_size=64, lr=2e-3, device=args.device)
    model, data = fixture.model, fixture.data
    policy = make_policy(args.device)
    attacks = [create_attack("fgsm", eps=0.1), create_attack("pgd", eps=0.1, steps=10, seed=args.seed)]

    # 1. growth in n
    sizes = [500, 1000, 2000]
    growth = bc.interleaved(
        {n: (lambda n=n: evaluate(model, attacks, data.test, n=n, batch_size=500, policy=policy)) for n in sizes},
        args.rounds, policy.device,
    )
    print("\n## eval seconds vs n (FGSM + PGD-10, Linf 0.1, batch 500; clean pass and model checks included)")
    print("| n | wall s (median) | CPU s (median) | CPU s per 1000 points |")
    print("|---|---|---|---|")
    for n, t in growth.items():
        print(f"| {n} | {t.wall_median:.2f} | {t.cpu_median:.2f} | {1000 * t.cpu_median / n:.2f} |")
    print(f"log-log exponent: wall {slope(sizes, [growth[n].wall_median for n in sizes]):.3f}, "
          f"CPU {slope(sizes, [growth[n].cpu_median for n in sizes]):.3f} (linear = 1)")

    # 2. the autotune table
    test = data.test.head(2000)
    pgd = create_attack("pgd", eps=0.1, steps=args.steps, seed=args.seed)
    mask = torch.ones(len(test), dtype=torch.bool)
    by_batch = bc.interleaved(
        {b: (lambda b=b: run_attack(model, pgd, test, mask, device=policy.device, batch_size=b)) for b in CANDIDATES},
        args.rounds, policy.device,
    )
    tuner = BatchTuner(None, rounds=args.rounds, clock="process")
    picked, probe_seconds, _ = bc.timed(lambda: tuner.batch_for(model, "bench", "grad", test.x, test.y, policy))
    best = min(by_batch, key=lambda b: by_batch[b].cpu_median)
    best_wall = min(by_batch, key=lambda b: by_batch[b].wall_median)
    print(f"\n## autotune table: PGD-{args.steps} on 2000 points, Linf 0.1")
    print("| batch | PGD wall s (median) | PGD CPU s (median) | CPU / best CPU | wall / best wall |")
    print("|---|---|---|---|---|")
    for b, t in by_batch.items():
        mark = " (picked)" if b == picked else ""
        print(f"| {b}{mark} | {t.wall_median:.2f} | {t.cpu_median:.2f} | {t.cpu_median / by_batch[best].cpu_median:.3f} "
              f"| {t.wall_median / by_batch[best_wall].wall_median:.3f} |")
    ratio = by_batch[picked].cpu_median / by_batch[best].cpu_median
    ratio_w = by_batch[picked].wall_median / by_batch[best_wall].wall_median
    print(f"autotune picked {picked} (probe {probe_seconds:.1f} s wall); best by CPU time {best}, by wall {best_wall}; "
          f"picked/best CPU = {ratio:.3f} -> {'within' if ratio <= 1.10 else 'NOT within'} 10%; "
          f"picked/best wall = {ratio_w:.3f} -> {'within' if ratio_w <= 1.10 else 'NOT within'} 10%")

    # autotuned vs fixed 500, on the evaluation (FGSM + PGD-10, n = 2000)
    versus = bc.interleaved(
        {f"{b}{label}": (lambda b=b: evaluate(model, attacks, data.test, n=2000, batch_size=b, policy=policy))
         for b, label in ((picked, " (autotuned)"), (500, " (fixed)"))},
        args.rounds, policy.device,
    )
    print("\n## autotuned vs fixed batch (FGSM + PGD-10, n = 2000)")
    print("| batch | wall s (median) | CPU s (median) |\n|---|---|---|")
    for name, t in versus.items():
        print(f"| {name} | {t.wall_median:.2f} | {t.cpu_median:.2f} |")

    # 3. local vs Ray
    if args.skip_ray:
        return
    import ray

    _, init_s, _ = bc.timed(lambda: ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False))
    from robustbench_lite.harness.ray_executor import RayExecutor

    plan = two_groups(200)

    def run_in_fresh_workdir(executor):
        with tempfile.TemporaryDirectory() as tmp:
            run_plan(plan, workdir=tmp, progress=False, executor=executor)

    executors = bc.interleaved(
        {"local": lambda: run_in_fresh_workdir(None), "ray": lambda: run_in_fresh_workdir(RayExecutor())}, args.rounds
    )
    ray.shutdown()
    print("\n## local vs Ray (smoke preset x 2 defense seeds = 2 groups, 10 cells, training included)")
    print("| executor | wall seconds (median) |\n|---|---|")
    print(f"| local (1 process, {torch.get_num_threads()} thread) | {executors['local'].wall_median:.2f} |")
    print(f"| ray (2 workers, 1 CPU each) | {executors['ray'].wall_median:.2f} |")
    print(f"ray.init (local 2-CPU instance, paid once): {init_s:.1f} s")


if __name__ == "__main__":
    main()
