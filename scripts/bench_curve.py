#!/usr/bin/env python
"""A robustness curve in one run vs one evaluation per eps, side by side.

For each fixture model (standard training, PGD-AT), the same attacks at the same eps grid (Linf,
``--grid`` evenly spaced eps from 0 to ``--stop``; eps 0 is the clean accuracy and needs no
attack):

* separate: one ``evaluate()`` per eps, each attack on every clean-correct point (the flags'
  probes and the adaptive rerun off, so both sides do only the attacks' work);
* up: ``attack_curve()`` per attack over the grid, upwards: a point an attack broke at eps is not
  attacked again at larger eps (every point counted robust at an eps was attacked at that eps);
* down: ``attack_curve(order="down")``, AttackBench's search: downwards from the largest eps, a
  point is attacked again only while the attack keeps finding smaller examples, and counts robust
  at every eps below its first failure.

Prints, per model, wall and process CPU seconds (interleaved rounds, medians), input-gradient
evaluations (the work, independent of machine load), their ratios to the separate runs, and the
curves with their largest difference from the separate runs (random starts differ when an attack
runs on fewer points, so small differences either way are noise).

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

        def curve(order, fx=fx, split=split, correct=correct):
            return {a: attack_curve(fx.model, lambda x, a=a: create_attack(a, eps=x, seed=args.seed), grid, split,
                                    correct, policy=policy, order=order) for a in names}

        t = bc.interleaved({"separate": separate, "up": lambda: curve("up"), "down": lambda: curve("down")},
                           args.rounds)
        sep = t["separate"].result
        grads = {"separate": sum(g for per in sep.values() for _, g in per.values())}
        grads.update({k: sum(r.grad_evals for r in t[k].result.values()) for k in ("up", "down")})
        print(f"{'':10s} {'wall s':>8s} {'cpu s':>8s} {'gradients':>10s} {'ratio wall':>10s} {'ratio cpu':>10s} "
              f"{'ratio grad':>10s}")
        for name in ("separate", "up", "down"):
            print(f"{name:10s} {t[name].wall_median:8.1f} {t[name].cpu_median:8.1f} {grads[name]:10d} "
                  f"{t[name].wall_median / t['separate'].wall_median:10.2f} "
                  f"{t[name].cpu_median / t['separate'].cpu_median:10.2f} {grads[name] / max(grads['separate'], 1):10.2f}")
        print("eps          " + " ".join(f"{e:6.3f}" for e in grid))
        for a in names:
            seps = [sep[e][a][0] for e in grid]
            print(f"{a:5s} sep     " + " ".join(f"{v:6.3f}" for v in seps))
            for order in ("up", "down"):
                curs = [robust_at(t[order].result[a].distances, e) for e in grid]
                above = max(c - s for c, s in zip(curs, seps, strict=True))
                below = max(s - c for c, s in zip(curs, seps, strict=True))
                print(f"{a:5s} {order:7s} " + " ".join(f"{v:6.3f}" for v in curs)
                      + f"   (vs separate: +{above:.3f} / -{below:.3f})")

if __name__ == "__main__":
    main()
