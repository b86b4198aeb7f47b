"""Certified training on Fashion-MNIST: clean, attacked and certified accuracy side by side.

Trains (or loads from the benchmark cache) an ``ibp`` or ``crown-ibp`` model on ``cnn-cert-small``,
then on the first ``--n`` test images reports clean accuracy, robust accuracy under PGD-100,
APGD-CE and APGD-T-DLR (and their per-point worst case), and certified accuracy with IBP,
CROWN-IBP (CROWN with interval intermediate bounds), CROWN and alpha-CROWN, with wall and process
CPU seconds for each.  Checks that no certified point is broken by any attack (a certified point
broken would be a soundness bug) and that certified <= attacked.  The reference: Wong & Kolter
(ICML 2018) certify 65.47% (robust-error bound 34.53%) at Linf 0.1 with this small model.

    python scripts/bench_certify.py --defense ibp --epochs 20 --ramp 10 --threads 1
"""

from __future__ import annotations

import os
import time

import torch
from bench_common import environment, parse, parser, timed, train

from robustbench_lite import ModelSpec, ThreatModel, create_attack, create_defense, create_verifier, load


def main() -> None:
    ap = parser((__doc__ or "").splitlines()[0], n=1000)
    ap.add_argument("--defense", default="ibp", choices=("ibp", "crown-ibp"))
    ap.add_argument("--model", default="cnn-cert-small")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--ramp", type=float, default=10.0)
    ap.add_argument("--train-eps-factor", type=float, default=1.0)
    ap.add_argument("--kappa-end", type=float, default=None, help="default: the defense's")
    ap.add_argument("--beta-end", type=float, default=None, help="crown-ibp only; default: the defense's")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--schedule", default="cosine", choices=("constant", "cosine", "cyclic"))
    ap.add_argument("--alpha-steps", type=int, default=20)
    ap.add_argument("--attack-steps", type=int, default=100)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--curve", type=float, nargs="*", default=[0.02, 0.05, 0.08, 0.1, 0.12, 0.15],
                    help="eps values of the certified-accuracy curve (IBP and CROWN-IBP radii by bisection)")
    args = parse(ap)
    args.points = args.n
    data = load("fashion-mnist")
    params = {"eps": args.eps, "epochs": args.epochs, "warmup_epochs": args.warmup, "ramp_epochs": args.ramp,
              "train_eps_factor": args.train_eps_factor, "lr": args.lr, "batch_size": args.batch_size,
              "schedule": args.schedule}
    if args.kappa_end is not None:
        params["kappa_end"] = args.kappa_end
    if args.beta_end is not None:
        params["beta_end"] = args.beta_end
    defense = create_defense(args.defense, **params)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()[0]:.2f}  {environment()}")
    print(f"{args.defense} on {args.model}: {defense.get_params()}")
    fixture, wall, cpu = timed(lambda: train(ModelSpec(args.model), defense, data))
    side = fixture.trained.sidecar
    print(fixture.describe() + ("" if fixture.trained.from_cache else f"; now {wall:.0f} s wall, {cpu:.0f} s process CPU"))
    for rec in side["curve"]:
        extra = {k: round(v, 4) for k, v in rec.items() if k not in ("epoch", "seconds", "train_loss", "val_acc")}
        print(f"  epoch {rec['epoch']:>3}  loss {rec['train_loss']:.4f}  {rec['seconds']:.0f} s  {extra}")
    if args.train_only:
        return
    model = fixture.model
    x, y = data.test.x[: args.points], data.test.y[: args.points]
    threat = ThreatModel("linf", args.eps)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    print(f"\n{args.points} test points, Linf eps {args.eps}; clean accuracy {clean.float().mean():.3f}", flush=True)

    print(f"\n{'kind':<10}{'method':<14}{'accuracy':>9}{'wall_s':>9}{'cpu_s':>9}", flush=True)
    rows, broken_any = [], torch.zeros_like(clean)

    def show(row):
        rows.append(row)
        print(f"{row[0]:<10}{row[1]:<14}{row[2]:>9.3f}{row[3]:>9.1f}{row[4]:>9.1f}", flush=True)

    verifiers = [("ibp", create_verifier("ibp")), ("crown-ibp", create_verifier("crown", intermediate="ibp")),
                 ("crown", create_verifier("crown")), ("alpha-crown", create_verifier("alpha-crown", steps=args.alpha_steps))]
    certified = {}
    for name, verifier in verifiers:
        cert, w, c = timed(lambda verifier=verifier: verifier.certify(model, x, y, threat))
        certified[name] = cert
        show(("certified", name, float(cert.float().mean()), w, c))
    union = torch.stack(list(certified.values())).any(0)
    show(("certified", "any verifier", float(union.float().mean()), 0.0, 0.0))
    attacks = [("pgd-100", create_attack("pgd", eps=args.eps, steps=args.attack_steps, seed=0)),
               ("apgd-ce", create_attack("apgd-ce", eps=args.eps, steps=args.attack_steps, seed=0)),
               ("apgd-t-dlr", create_attack("apgd-t-dlr", eps=args.eps, steps=args.attack_steps, seed=0))]
    for name, attack in attacks:
        def run(attack=attack):
            with torch.no_grad():
                return model(attack.perturb(model, x, y)).argmax(1) == y
        robust, w, c = timed(run)
        robust &= clean
        broken_any |= clean & ~robust
        show(("attack", name, float(robust.float().mean()), w, c))
    worst = clean & ~broken_any
    spent = [r for r in rows if r[0] == "attack"]
    show(("attack", "worst case", float(worst.float().mean()), sum(r[3] for r in spent), sum(r[4] for r in spent)))

    per = ", ".join(f"{name} {int((cert & broken_any).sum())}" for name, cert in certified.items())
    print(f"\ncertified points broken by an attack (must be 0): {per}; certified by any {int(union.sum())} <= "
          f"attacked-robust {int(worst.sum())}: {bool(union.sum() <= worst.sum())}")
    if args.curve:
        print(f"\nshare of points with certified radius >= eps (bisection on [0, {max(args.curve) + 0.05:g}], tol 1e-3)")
        print(f"{'verifier':<12}" + "".join(f"{e:>8g}" for e in args.curve) + f"{'cpu_s':>9}")
        for name, verifier in verifiers[:2]:
            r, _, c = timed(lambda verifier=verifier: verifier.radius(model, x, y, "linf", hi=max(args.curve) + 0.05))
            print(f"{name:<12}" + "".join(f"{float((r >= e).float().mean()):>8.3f}" for e in args.curve) + f"{c:>9.1f}")
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
