"""Side by side: the original AutoAttack (``pyautoattack``; Croce & Hein, ICML 2020, its standard
version: APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square with 5000 queries) against
our full attack set (the ``full`` preset's Linf 0.1 attacks, cheapest first on the survivors,
through :func:`~robustbench_lite.evaluate` with its checks, probes and, where a masking check fires,
the escalation ladder) on the same models and test points (CPU).

Models (bench_common's fixtures): small-cnn with standard training (2 epochs on 20k Fashion-MNIST
images) and with PGD-7 adversarial training (Linf eps 0.1, 2 epochs on 10k images).

    python scripts/bench_autoattack.py --n 500

For each model: both robust accuracies (clean-misclassified points count as not robust), the
points each broke that the other did not, and the seconds of each (wall and process CPU, one torch
thread).  ``--rounds 2`` runs each twice, interleaved (the second round starts with AutoAttack).

Memory layout: our evaluation runs the model channels_last (the harness's device policy does so on
every device); AutoAttack gets its own copy of the model in the layout a user's model has when
loaded, contiguous, unless ``--aa-layout channels_last`` hands it the converted one (to see how
much of the difference is the layout).
"""

from __future__ import annotations

import copy
import logging

import bench_common as bc
import torch

from robustbench_lite import create_attack, evaluate, predict
from robustbench_lite.harness.presets import PRESETS

EPS = 0.1


def full_attacks():
    """The ``full`` preset's attacks at Linf 0.1, as the harness builds them."""
    (threat, specs), = [(t, a) for t, a in PRESETS["full"].grid if t.eps == EPS]
    return [create_attack(s.name, norm=threat.norm, eps=threat.eps, **s.params) for s in specs]


def ours(model, split, n):
    def run():
        ev = evaluate(model, full_attacks(), split, n=n, survivors_only=True)
        return ev.worst_case[full_attacks()[0].threat], ev

    return run


def autoattack(model, x, y, seed):
    from pyautoattack import AutoAttack

    def run():
        aa = AutoAttack(model, norm="Linf", eps=EPS, version="standard", device="cpu", seed=seed)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=500)  # (adversarial images, their predictions)
        return predict(model, x_adv, "cpu", batch_size=500) == y, None

    return run


def main() -> None:
    p = bc.parser(__doc__, n=500, rounds=1)
    p.add_argument("--models", default="standard,pgd-at", help="comma-separated: standard, pgd-at")
    p.add_argument("--aa-layout", choices=("contiguous", "channels_last"), default="contiguous",
                   help="memory layout of AutoAttack's copy of the model (ours always runs channels_last)")
    args = bc.parse(p)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    fixtures = {"standard": bc.standard_model, "pgd-at": bc.pgd_at_model}
    print(f"# {bc.environment()}; Linf eps {EPS}; first {args.n} Fashion-MNIST test points; AutoAttack's model "
          f"{args.aa_layout}")
    rows = []
    for name in args.models.split(","):
        fx = fixtures[name]()
        print(f"{name}: {fx.describe()}")
        split = fx.data.test.head(args.n)
        x, y = split.x, split.y
        layout = torch.channels_last if args.aa_layout == "channels_last" else torch.contiguous_format
        aa_model = copy.deepcopy(fx.model).to(memory_format=layout)
        clean = predict(fx.model, x, "cpu") == y
        t = bc.interleaved({"ours": ours(fx.model, split, args.n), "autoattack": autoattack(aa_model, x, y, args.seed)},
                           args.rounds)
        mine, aa = t["ours"].result[0], t["autoattack"].result[0]
        ev = t["ours"].result[1]
        only_mine = clean & ~mine & aa
        only_aa = clean & ~aa & mine
        rows.append((name, float(clean.float().mean()), float(mine.float().mean()), float(aa.float().mean()),
                     int(only_mine.sum()), int(only_aa.sum()), t["ours"], t["autoattack"]))
        print(f"  robust: ours {rows[-1][2]:.3f}, AutoAttack {rows[-1][3]:.3f}; only ours broke {rows[-1][4]}, only AA "
              f"broke {rows[-1][5]}; wall / CPU s: ours {t['ours'].wall_median:.1f} / {t['ours'].cpu_median:.1f}, "
              f"AA {t['autoattack'].wall_median:.1f} / {t['autoattack'].cpu_median:.1f}", flush=True)
        flags = sorted({f for fs in ev.flags.values() for f in fs})
        print(f"  ours: flags {flags or 'none'}; per attack (cumulative, survivors):",
              ", ".join(f"{r.attack.name} {r.robust_acc:.3f} ({r.seconds:.1f} s)" for r in ev.records))
        if only_aa.any():
            print(f"  points only AutoAttack broke: {only_aa.nonzero().flatten().tolist()}")
    print()
    print("| model | clean | ours robust | AutoAttack robust | only ours broke | only AA broke "
          "| ours wall / CPU s | AA wall / CPU s | wall ratio | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, clean, mine, aa, om, oa, tm, ta in rows:
        print(f"| {name} | {clean:.3f} | {mine:.3f} | {aa:.3f} | {om} | {oa} | {tm.wall_median:.1f} / {tm.cpu_median:.1f} "
              f"| {ta.wall_median:.1f} / {ta.cpu_median:.1f} | {tm.wall_median / ta.wall_median:.3f} "
              f"| {tm.cpu_median / ta.cpu_median:.3f} |")


if __name__ == "__main__":
    main()
