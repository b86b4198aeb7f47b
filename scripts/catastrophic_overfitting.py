"""Catastrophic overfitting of FGSM-RS (Wong, Rice & Kolter, ICLR 2020), and ELLE-A (Rocamora
et al., CVPR 2024, §4.2) preventing it, on Fashion-MNIST.

Trains small-cnn with each defense at a large Linf eps through ``train_or_load`` (so the
per-epoch curves land in the models' JSON sidecars in the benchmark cache, ``.rbl/bench-models``),
with ``monitor_eps`` set: after every epoch, PGD-10 accuracy on held-out test points.  Collapse =
PGD accuracy near 0 after it was high, while FGSM accuracy stays high.  After training: clean,
FGSM and PGD-50 accuracy and ELLE's local-linearity error E_lin (eq. 5) on held-out points.

    python scripts/catastrophic_overfitting.py --eps 0.3 --points 6000 --epochs 6
    python scripts/catastrophic_overfitting.py --eps 0.3 --points 20000 --epochs 3 --schedule constant \
        --defenses fgsm-rs pgd-at elle-a --every 10     # also PGD accuracy every 10 steps

The setting where FGSM-RS collapses on this data (all 60k images, Adam at a constant 1e-3,
α = 1.25 ε, 16 epochs; BENCHMARKS.md has what it measured and how long it took):

    python scripts/catastrophic_overfitting.py --eps 0.25 --points 60000 --epochs 16 --schedule constant \
        --defenses fgsm-rs elle-a --every 200

Multi-step defenses (``pgd-at``, ...) get ``--steps`` inner steps: the reference the single-step
ones should reach.
"""

from __future__ import annotations

import json
import time

import bench_common as bc
import torch
from robustbench_lite.defenses._inner_max import local_linearity_error

from robustbench_lite import ModelSpec, create_attack, create_defense, load


def main() -> None:
    ap = bc.parser(__doc__)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--points", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--schedule", default="cosine", choices=("cosine", "constant", "cyclic"))
    ap.add_argument("--alpha", type=float, default=1.25, help="FGSM-RS step as a multiple of eps (Wong et al.: 1.25)")
    ap.add_argument("--steps", type=int, default=5, help="inner PGD steps of a multi-step defense (pgd-at, trades, ...)")
    ap.add_argument("--lam", type=float, default=None, help="ELLE's fixed lambda (default: the paper's 1000)")
    ap.add_argument("--width", type=int, default=None, help="small-cnn's first conv width (the second has twice; default 32)")
    ap.add_argument("--hidden", type=int, default=None, help="small-cnn's hidden dense units (default 128)")
    ap.add_argument("--lam-max", type=float, default=None, help="ELLE-A's lambda_max (default: the paper's 4000)")
    ap.add_argument("--monitor-points", type=int, default=300)
    ap.add_argument("--defenses", nargs="+", default=["fgsm-rs", "elle-a"])
    ap.add_argument("--final-points", type=int, default=1000,
                    help="after training: clean, FGSM and PGD-50 accuracy and E_lin on this many test points")
    ap.add_argument("--every", type=int, default=0,
                    help="> 0: also PGD accuracy every this many training steps (a collapse can happen within an epoch)")
    args = bc.parse(ap)
    data = load("fashion-mnist", train_limit=args.points)
    # only what was asked for: the default model keeps its cache key
    model_kwargs = {k: v for k, v in (("width", args.width), ("hidden", args.hidden)) if v is not None}
    print(f"Fashion-MNIST, {args.points} train images, small-cnn{f' {model_kwargs}' if model_kwargs else ''}, Linf eps {args.eps}, {args.epochs} epochs, "
          f"{args.optimizer} lr {args.lr} {args.schedule}, FGSM step {args.alpha} eps; pgd_acc = PGD-10 accuracy on the first {args.monitor_points} test points")
    for name in args.defenses:
        t0 = time.time()
        single_step = {"alpha": args.alpha} if name in ("fgsm-rs", "elle", "elle-a") else {"steps": args.steps}
        if name == "elle" and args.lam is not None:
            single_step["lam"] = args.lam
        if name == "elle-a" and args.lam_max is not None:
            single_step["lam_max"] = args.lam_max
        defense = create_defense(
            name, eps=args.eps, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, schedule=args.schedule,
            monitor_eps=args.eps, monitor_points=args.monitor_points, monitor_steps=10, seed=args.seed, **single_step,
        )
        by_step: list[tuple[int, float]] = []
        cache = bc.CACHE
        if args.every > 0:  # same settings, so the same key as the unmonitored model: a folder of its own
            defense, cache = step_monitored(defense, data, args.every, by_step), bc.CACHE / "stepwise"
        trained = bc.train(ModelSpec("small-cnn", model_kwargs), defense, data, cache=cache).trained
        side = trained.sidecar
        print(f"\n{name}: clean_acc {side['clean_acc']:.3f}, train_seconds {side['train_seconds']:.0f}, "
              f"sidecar {cache}/{trained.key}.json ({time.time() - t0:.0f} s)")
        keys = [k for k in side["curve"][0] if k not in ("epoch", "seconds")]
        print("  " + "  ".join(f"{k:>11}" for k in ["epoch", *keys]))
        for row in side["curve"]:
            print("  " + "  ".join(f"{row[k]:>11.4g}" if isinstance(row[k], float) else f"{row[k]!s:>11}" for k in ["epoch", *keys]))
        print("  curve json:", json.dumps(side["curve"]))
        final = final_check(trained.model, data, args.eps, args.final_points, defense.seed)
        print(f"  final, first {args.final_points} test points: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
        if by_step:
            print("  pgd_acc by step:", " ".join(f"{step}:{acc:.3f}" for step, acc in by_step))
            peak_step, peak = max(by_step, key=lambda sa: sa[1])
            tail = [acc for _, acc in by_step[-5:]]
            print(f"  peak {peak:.3f} at step {peak_step}; mean of the last {len(tail)} checks {sum(tail) / len(tail):.3f}")


def final_check(model, data, eps: float, points: int, seed: int) -> dict[str, float]:
    """The signature of catastrophic overfitting on held-out points: accuracy under the FGSM step
    the model trained against stays high while PGD-50's falls, and the loss stops being locally
    linear in the ball (ELLE's E_lin, eq. 5 of Rocamora et al., rises)."""
    model.eval()
    split = data.test.head(points)
    fgsm, pgd = create_attack("fgsm", eps=eps), create_attack("pgd", eps=eps, steps=50, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    hits = {"clean_acc": 0.0, "fgsm_acc": 0.0, "pgd50_acc": 0.0, "e_lin": 0.0}
    for i in range(0, len(split), 500):
        x, y = split.x[i : i + 500], split.y[i : i + 500]
        points_by_key = {"clean_acc": x, "fgsm_acc": fgsm.perturb(model, x, y), "pgd50_acc": pgd.perturb(model, x, y)}
        with torch.no_grad():
            hits["e_lin"] += float(local_linearity_error(model, x, y, eps=eps, gen=gen).sum())
            for key, xs in points_by_key.items():
                hits[key] += int((model(xs).argmax(1) == y).sum())
    return {k: v / len(split) for k, v in hits.items()}


def step_monitored(defense, data, every: int, log: list):
    """``defense`` that also records (step, held-out PGD accuracy) every ``every`` steps into
    ``log`` (same settings, so the same cache key: pass it a cache of its own)."""

    class StepMonitored(type(defense)):
        def batch_loss(self, model, x, y, state):
            if state.step % every == 0:
                model.eval()
                log.append((state.step, self.epoch_metrics(model, data, x.device)["pgd_acc"]))
                print(f"  step {state.step}: pgd_acc {log[-1][1]:.3f}", flush=True)
                model.train()
            return super().batch_loss(model, x, y, state)

    return StepMonitored(**defense.get_params())


if __name__ == "__main__":
    main()
