"""A reduced version of the ``full`` preset, to check its headline claim cheaply.

The full preset's defense settings with fewer epochs and training images, evaluated by the
harness's ``evaluate`` (attacks on every clean-correct point, worst case per point) on the first
``--n`` Fashion-MNIST test points at Linf 0.1.

    python scripts/reduced_full.py --points 10000 --epochs 1 --n 500 \
        --defenses standard pgd-at trades mart arow --attacks fgsm pgd
"""

from __future__ import annotations

import time

import bench_common as bc

from robustbench_lite import create_attack, evaluate, load
from robustbench_lite.harness.presets import get_preset


def main() -> None:
    ap = bc.parser(__doc__, n=500, threads=2, device=True)
    ap.add_argument("--points", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--defenses", nargs="+", default=["standard", "pgd-at", "trades", "mart", "arow"])
    ap.add_argument("--attacks", nargs="+", default=["fgsm", "pgd"])
    args = bc.parse(ap)
    preset = get_preset("full")
    plan = preset.plan(defenses=args.defenses, attacks=args.attacks, n=args.n)
    data = load("fashion-mnist", train_limit=args.points)
    attacks = [create_attack(a, eps=args.eps, seed=args.seed) for a in args.attacks]
    print(f"reduced 'full' preset: Fashion-MNIST {args.points} train images, {args.epochs} epoch(s), Linf {args.eps}, "
          f"n={args.n} test points, attacks {args.attacks} (default settings; pgd = {attacks[-1].get_params()})")
    rows = []
    seen = set()
    for cell in plan.cells:
        if cell.group in seen:
            continue
        seen.add(cell.group)
        params = dict(cell.defense.params, epochs=args.epochs)
        defense = type(cell.defense.build())(**params)
        t0 = time.time()
        trained = bc.train(cell.model, defense, data, device=args.device).trained
        ev = evaluate(trained.model, attacks, data.test, n=args.n, device=args.device)
        per = {r.attack.name: r.robust_acc for r in ev.records}
        worst = float(next(iter(ev.worst_case.values())).float().mean())
        rows.append((cell.defense.name, cell.model.name, trained.sidecar["train_seconds"], ev.clean_acc, per, worst))
        print(f"  done {cell.defense.name} in {time.time() - t0:.0f} s", flush=True)
    base = next((r[5] for r in rows if r[0] == "standard"), None)
    head = f"{'defense':<16}{'model':<16}{'train_s':>8}{'clean':>7}" + "".join(f"{a:>7}" for a in args.attacks)
    print(head + f"{'worst':>7}{'gain_vs_standard':>18}")
    for name, model, secs, clean, per, worst in rows:
        gain = f"{worst - base:+.3f}" if base is not None else "-"
        print(f"{name:<16}{model:<16}{secs:>8.0f}{clean:>7.3f}" + "".join(f"{per[a]:>7.3f}" for a in args.attacks)
              + f"{worst:>7.3f}{gain:>18}")


if __name__ == "__main__":
    main()
