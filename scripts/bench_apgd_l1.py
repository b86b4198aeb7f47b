"""l1-APGD side by side: ours (``create_attack("apgd-ce" / "apgd-dlr", norm="l1")``) against the
original AutoAttack's ``APGDAttack(norm="L1")`` (the ``pyautoattack`` package; Croce & Hein, "Mind
the box", ICML 2021), on the same models and points, with the same iterations and restarts.

    python scripts/bench_apgd_l1.py --n 300 --models standard --eps 5,10 --losses ce,dlr --seeds 0,1,2
    python scripts/bench_apgd_l1.py --n 300 --sweep 3,5,8,12      # ours: the full preset's L1 chain

Models (bench_common's fixtures): small-cnn with standard training (2 epochs on 20k Fashion-MNIST
images) and with PGD-7 adversarial training (Linf eps 0.1, 2 epochs on 10k images).

Comparison: both attacks get the clean-correct points among the first ``n`` test images; robust
accuracy is over all ``n`` (clean-misclassified points count as not robust), averaged over the
seeds (each seed is one run of each attack, the order alternating from seed to seed so machine load
hits both alike).  "only ... broke" and the seconds (wall / process CPU) are summed over the seeds.
AutoAttack's APGDAttack runs with its defaults otherwise (``use_largereps=False``: one eps, as ours).

Sweep: robust accuracy under the ``full`` preset's L1 attacks in its order, each on the survivors
of the ones before: APGD-CE, then APGD-DLR, then APGD-T-DLR (100 iterations each; 3 targets here
to keep the sweep cheap, where the preset runs all 9).
"""

from __future__ import annotations

import logging

import bench_common as bc
import torch

from robustbench_lite import Norm, create_attack, predict

GEO = Norm.L1.geometry


def ours(model, x, y, eps, loss, steps, restarts, seed):
    attack = create_attack(f"apgd-{loss}", norm="l1", eps=eps, steps=steps, restarts=restarts, seed=seed)
    return lambda: attack.perturb(model, x, y)


def theirs(model, x, y, eps, loss, steps, restarts, seed):
    from pyautoattack.autopgd_base import APGDAttack

    attack = APGDAttack(model, n_iter=steps, norm="L1", n_restarts=restarts, eps=eps, seed=seed, loss=loss,
                        device=x.device)
    return lambda: attack.perturb(x, y).detach()


def still_correct(model, x_adv, x, y, eps, who=""):
    """Per point: still classified correctly under ``x_adv``.  Fails loudly outside the ball (with the
    geometry's float slack) or more than 1e-6 outside the box; float32 rounding that leaves the box by
    less is clipped before judging (AutoAttack's APGD-L1 returns such points)."""
    delta = x_adv - x
    out_of_box = float(torch.maximum(-x_adv.min(), x_adv.max() - 1).clamp_min(0))
    if not GEO.inside(delta, eps).all() or out_of_box > 1e-6:
        raise AssertionError(f"{who} left the L1 ball or the box: max L1 {float(GEO.distance(delta).max()):.6f}, "
                             f"{out_of_box:.2e} outside [0, 1]")
    return predict(model, x_adv.clamp(0, 1), "cpu", batch_size=500) == y


def compare(name, fx, args) -> list[str]:
    split = fx.data.test.head(args.n)
    x, y = split.x, split.y
    clean = predict(fx.model, x, "cpu") == y
    xs, ys = x[clean], y[clean]
    rows = []
    for eps in args.eps:
        for loss in args.losses:
            acc = {"ours": [], "theirs": []}
            secs = {k: [0.0, 0.0] for k in acc}
            only = {k: 0 for k in acc}
            for i, seed in enumerate(args.seeds):
                runs = {k: f(fx.model, xs, ys, eps, loss, args.steps, args.restarts, seed)
                        for k, f in (("ours", ours), ("theirs", theirs))}
                order = list(runs) if i % 2 == 0 else list(runs)[::-1]
                robust = {}
                for k in order:
                    x_adv, wall, cpu = bc.timed(runs[k])
                    robust[k] = still_correct(fx.model, x_adv, xs, ys, eps, k)
                    secs[k][0] += wall
                    secs[k][1] += cpu
                    acc[k].append(float(robust[k].sum()) / args.n)
                only["ours"] += int((~robust["ours"] & robust["theirs"]).sum())
                only["theirs"] += int((~robust["theirs"] & robust["ours"]).sum())
            mo, mt = (sum(acc[k]) / len(acc[k]) for k in ("ours", "theirs"))
            per_seed = " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(acc["ours"], acc["theirs"], strict=True))
            row = (f"| {name} | {eps:g} | {loss} | {mo:.3f} | {mt:.3f} | {mo - mt:+.3f} | {only['ours']} | "
                   f"{only['theirs']} | {secs['ours'][0]:.1f} / {secs['ours'][1]:.1f} | "
                   f"{secs['theirs'][0]:.1f} / {secs['theirs'][1]:.1f} | {per_seed} |")
            print(row, flush=True)
            rows.append(row)
    return rows


def sweep(name, fx, args) -> None:
    split = fx.data.test.head(args.n)
    x, y = split.x, split.y
    clean = predict(fx.model, x, "cpu") == y
    print(f"{name}: clean {float(clean.float().mean()):.3f}", flush=True)
    chain = [("apgd-ce", {}), ("apgd-dlr", {}), ("apgd-t-dlr", {"n_targets": 3})]
    for eps in args.sweep:
        alive = clean.clone()
        accs = []
        wall = cpu = 0.0
        for attack_name, kw in chain:
            idx = alive.nonzero().flatten()
            if idx.numel():
                attack = create_attack(attack_name, norm="l1", eps=eps, steps=args.steps, seed=args.seed, **kw)
                x_adv, w, c = bc.timed(lambda a=attack, i=idx: a.perturb(fx.model, x[i], y[i]))
                alive[idx] = still_correct(fx.model, x_adv, x[idx], y[idx], eps, attack_name)
                wall, cpu = wall + w, cpu + c
            accs.append(float(alive.float().mean()))
        print(f"| {name} | {eps:g} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {wall:.0f} / {cpu:.0f} |",
              flush=True)


def main() -> None:
    p = bc.parser(__doc__, n=500)
    p.add_argument("--models", default="standard,pgd-at", help="comma-separated: standard, pgd-at")
    p.add_argument("--eps", default="5,10", help="comparison budgets (L1, images in [0, 1])")
    p.add_argument("--losses", default="ce,dlr", help="comma-separated: ce, dlr")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2", help="comparison seeds, one run of each attack per seed")
    p.add_argument("--sweep", default=None, help="comma-separated eps: run the sweep instead of the comparison")
    args = bc.parse(p)
    args.eps = [float(e) for e in args.eps.split(",")]
    args.losses = args.losses.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    fixtures = {"standard": bc.standard_model, "pgd-at": bc.pgd_at_model}
    print(f"# {bc.environment()}; first {args.n} Fashion-MNIST test points; {args.steps} iterations, "
          f"{args.restarts} restart(s)")
    models = {name: fixtures[name]() for name in args.models.split(",")}
    for name, fx in models.items():
        print(f"{name}: {fx.describe()}", flush=True)
    if args.sweep:
        args.sweep = [float(e) for e in args.sweep.split(",")]
        print("| model | eps | APGD-CE | + APGD-DLR | + APGD-T-DLR (3) | wall / CPU s |")
        print("|---|---|---|---|---|---|")
        for name, fx in models.items():
            sweep(name, fx, args)
        return
    print(f"seeds {args.seeds}; robust accuracy mean over seeds; per seed ours/theirs")
    print("| model | eps | loss | ours | AutoAttack | ours − AA | only ours broke | only AA broke "
          "| ours wall / CPU s | AA wall / CPU s | per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, fx in models.items():
        compare(name, fx, args)


if __name__ == "__main__":
    main()
