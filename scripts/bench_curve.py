#!/usr/bin/env python
"""A robustness curve in one run vs one evaluation per eps, side by side.

For each fixture model (standard training, PGD-AT), the same attacks at the same eps grid (Linf,
``--grid`` evenly spaced eps from 0 to ``--stop``; eps 0 is the clean accuracy and needs no
attack):

* separate: one ``evaluate()`` per eps, each attack on every clean-correct point (the flags'
  probes and the adaptive rerun off, so both sides do only the attacks' work);
* curve: ``attack_curve()`` per attack over the grid: a point an attack broke at eps is not
  attacked again at larger eps.

Prints, per model, wall and process CPU seconds (interleaved rounds, medians), input-gradient
evaluations (the work, independent of machine load), their ratios, and both curves with their
largest difference (the curve reuses examples found at smaller eps, so it is lower or equal up to
the random starts, which differ when an attack runs on fewer points).

    python scripts/bench_curve.py [--n 500] [--grid 11] [--stop 0.2] [--attacks fgsm,pgd] [--rounds 1]
"""

from __future__ import annotations

import bench_common as bc
import torch

from robustbench_lite import create_attack, evaluate, make_policy
from robustbench_lite.core.models import predict
from robustbench_lite.eval.curve import attack_curve, robust_at


def main() -> None:
    p = bc.parser(__doc__, n=500, rounds=1)
    p.add_argument("--grid", type=int, default=11, help="eps values from 0 to --stop, both included")
    p.add_argument("--stop", type=float, default=0.2)
    p.add_argument("--attacks", default="fgsm,pgd")
    p.add_argument("--models", default="standard,pgd-at")
    args = bc.parse(p)
    grid = [e for e in torch.linspace(0, args.stop, args.grid, dtype=torch.float64).tolist() if e > 0]
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    policy = make_policy("cpu", "off")
    print(f"{bc.environment()}; Linf grid of {args.grid} eps from 0 to {args.stop} ({len(grid)} attacked); "
          f"attacks {names}; {args.n} test points; {args.rounds} round(s)")
    fixtures = {"standard": bc.standard_model, "pgd-at": bc.pgd_at_model}
    for label in [m.strip() for m in args.models.split(",") if m.strip()]:
        fx = fixtures[label]()
        print(f"\n== {label}: {fx.describe()}")
        split = fx.data.test.head(args.n)
        correct = predict(fx.model, split.x, "cpu") == split.y

        def separate(fx=fx, split=split):
            out = {}
            for eps in grid:
                attacks = [create_attack(a, eps=eps, seed=args.seed) for a in names]
                ev = evaluate(fx.model, attacks, split, n=args.n, adaptive=False, probe_iterations=False, policy=policy)
                out[eps] = {r.attack.name: (r.robust_acc, r.grad_evals) for r in ev.records}
            return out

        def curve(fx=fx, split=split, correct=correct):
            return {a: attack_curve(fx.model, lambda x, a=a: create_attack(a, eps=x, seed=args.seed), grid, split,
                                    correct, policy=policy) for a in names}

        t = bc.interleaved({"separate": separate, "curve": curve}, args.rounds)
        sep, cur = t["separate"].result, t["curve"].result
        grads_sep = sum(g for per in sep.values() for _, g in per.values())
        grads_cur = sum(r.grad_evals for r in cur.values())
        print(f"{'':10s} {'wall s':>8s} {'cpu s':>8s} {'gradients':>10s}")
        for name in ("separate", "curve"):
            g = grads_sep if name == "separate" else grads_cur
            print(f"{name:10s} {t[name].wall_median:8.1f} {t[name].cpu_median:8.1f} {g:10d}")
        print(f"{'ratio':10s} {t['curve'].wall_median / t['separate'].wall_median:8.2f} "
              f"{t['curve'].cpu_median / t['separate'].cpu_median:8.2f} {grads_cur / max(grads_sep, 1):10.2f}")
        above, below = 0.0, 0.0
        print("eps       " + " ".join(f"{e:6.3f}" for e in grid))
        for a in names:
            seps = [sep[e][a][0] for e in grid]
            curs = [robust_at(cur[a].distances, e) for e in grid]
            above = max(above, max(c - s for c, s in zip(curs, seps, strict=True)))
            below = max(below, max(s - c for c, s in zip(curs, seps, strict=True)))
            print(f"{a:5s} sep  " + " ".join(f"{v:6.3f}" for v in seps))
            print(f"{a:5s} curv " + " ".join(f"{v:6.3f}" for v in curs))
        print(f"largest difference curve - separate: +{above:.3f} / -{below:.3f}")


if __name__ == "__main__":
    main()
