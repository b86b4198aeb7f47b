#!/usr/bin/env python
"""Side-by-side speed and strength of PGD: ours vs a bare autograd loop vs torchattacks.

Fashion-MNIST small-cnn (the quick preset's model: standard training, 3 epochs on all 60k
images), the first ``--n`` test points, Linf eps 0.1, 20 steps of 2.5*eps/20, batch 500.  Each
implementation runs ``--rounds`` times, interleaved; the table shows the median wall and CPU
seconds, the ratio to the bare loop, the robust accuracy and the cost per image-gradient.
Targets: ours <= 1.05x the bare loop, faster than torchattacks.

    python scripts/bench_attacks.py [--n 2000] [--rounds 3] [--threads 1]

``--one-pixel`` instead compares the one-pixel attack (k = 1, untargeted; Su et al., IEEE TEVC
2019) with ART's PixelAttack on the same first ``--images`` correctly classified test images of
the same model, at equal population x generations (ART: popsize 133 x 3 parameters = 399
members; ours: population 399), both with early stopping; it reports success rate, wall and CPU
seconds, model forward evaluations (ART's counted by a wrapper) and CPU milliseconds per forward.
Ours runs twice: with the incremental window evaluation (default) and with full forwards
(``incremental=False``).  One round each unless ``--rounds`` says otherwise.

    python scripts/bench_attacks.py --one-pixel [--images 100] [--generations 10] --threads 1
"""

from __future__ import annotations

import bench_common as bc
import torch
import torch.nn.functional as F

from robustbench_lite import create_attack, predict


def bare_pgd(model, x, y, eps, alpha, steps, gen):
    """The textbook loop: random start, sign step, clamp to the ball and the box."""
    noise = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device)
    x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def one_pixel_side_by_side(model, data, images: int, generations: int, rounds: int, seed: int) -> None:
    import numpy as np
    from art.attacks.evasion import PixelAttack
    from art.estimators.classification import PyTorchClassifier

    test = data.test.head(2000)
    idx = (predict(model, test.x, "cpu") == test.y).nonzero().flatten()[:images]
    x, y = test.x[idx], test.y[idx]
    print(f"one-pixel k=1 untargeted, first {len(y)} correctly classified test images, 399 members x {generations} "
          f"generations (+ the initial population), early stop; {bc.environment()}; median of {rounds} round(s)")

    def art():
        counted = bc.ForwardLog(model).eval()
        clf = PyTorchClassifier(model=counted, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=data.num_classes, clip_values=(0.0, 1.0))
        attack = PixelAttack(clf, th=1, es=1, max_iter=generations, targeted=False, verbose=False)
        return torch.from_numpy(attack.generate(x.numpy(), y.numpy()).astype(np.float32)), counted.images

    def ours(incremental: bool):
        attack = create_attack("one-pixel", eps=1, population=399, generations=generations, incremental=incremental,
                               seed=seed)

        def run():
            out = attack.run(model, x, y)
            return out.x_adv, out.forward_evals

        return run

    timings = bc.interleaved(
        {"ART PixelAttack": art, "ours (incremental=True)": ours(True), "ours (incremental=False)": ours(False)}, rounds
    )
    print(f"{'implementation':26s} {'success':>8s} {'max L0':>6s} {'wall s':>8s} {'CPU s':>8s} {'forwards':>10s} "
          f"{'CPU ms/fwd':>10s} {'CPU speed-up':>12s}")
    art_cpu = timings["ART PixelAttack"].cpu_median
    success = {}
    for name, t in timings.items():
        adv, forwards = t.result
        with torch.no_grad():
            success[name] = float((model(adv).argmax(1) != y).float().mean())
        l0 = int((adv - x).abs().amax(1).flatten(1).gt(1e-6).sum(1).max())
        print(f"{name:26s} {success[name]:8.3f} {l0:6d} {t.wall_median:8.1f} {t.cpu_median:8.1f} {forwards:10d} "
              f"{1e3 * t.cpu_median / max(forwards, 1):10.4f} {art_cpu / t.cpu_median:11.1f}x")
    print(f"success difference (ours incremental - ART): "
          f"{success['ours (incremental=True)'] - success['ART PixelAttack']:+.3f}")


def pgd_side_by_side(model, data, args) -> None:
    import torchattacks

    device = torch.device(args.device)
    x_all, y_all = data.test.x[: args.n].to(device), data.test.y[: args.n].to(device)
    alpha = 2.5 * args.eps / args.steps
    ta = torchattacks.PGD(model, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True)
    ours = create_attack("pgd", eps=args.eps, steps=args.steps, step=alpha)
    gen = torch.Generator(device).manual_seed(args.seed)

    def batches(fn):
        def run():
            outs = [fn(x_all[i : i + args.batch], y_all[i : i + args.batch]) for i in range(0, args.n, args.batch)]
            return torch.cat([o[0] for o in outs]), sum(o[1] for o in outs)

        return run

    def run_ours(x, y):
        out = ours.run(model, x, y, gen)
        return out.x_adv, out.grad_evals

    timings = bc.interleaved({
        "bare autograd loop": batches(lambda x, y: (bare_pgd(model, x, y, args.eps, alpha, args.steps, gen),
                                                    len(y) * args.steps)),
        "robustbench_lite pgd": batches(run_ours),
        "torchattacks PGD": batches(lambda x, y: (ta(x, y), len(y) * args.steps)),
    }, args.rounds, device)
    with torch.no_grad():
        clean = float((model(x_all).argmax(1) == y_all).float().mean())
    base = timings["bare autograd loop"].wall_median
    print(f"PGD Linf eps={args.eps}, {args.steps} steps of {alpha:.4g}, n={args.n}, batch={args.batch}, "
          f"{args.rounds} rounds, {bc.environment()}, device {device}, clean acc={clean:.3f}")
    print(f"{'implementation':24s} {'median s':>9s} {'CPU s':>7s} {'vs bare':>8s} {'robust acc':>11s} "
          f"{'grad evals':>11s} {'us/grad':>8s}")
    for name, t in timings.items():
        x_adv, grads = t.result
        with torch.no_grad():
            acc = float((model(x_adv).argmax(1) == y_all).float().mean())
        med = t.wall_median
        print(f"{name:24s} {med:9.2f} {t.cpu_median:7.2f} {med / base:7.2f}x {acc:11.3f} {grads:11d} "
              f"{1e6 * med / grads:8.1f}")
    print(f"(ours stops attacking a point once it is misclassified; a loop without that does {len(y_all) * args.steps} "
          "gradient evaluations. us/grad compares the cost per image-gradient, i.e. the per-step overhead.)")


def main() -> None:
    p = bc.parser(__doc__, n=2000, threads=0, device=True)
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default: 3 for PGD, 1 for --one-pixel)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--one-pixel", action="store_true", help="run the one-pixel vs ART comparison instead of PGD")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--generations", type=int, default=10)
    args = bc.parse(p)
    if args.one_pixel and args.device != "cpu":
        p.error("--one-pixel compares CPU time with ART's CPU classifier: run it with --device cpu")
    fixture = bc.standard_model(train_limit=None, epochs=3, device=args.device)  # the quick preset's model
    if args.one_pixel:
        one_pixel_side_by_side(fixture.model, fixture.data, args.images, args.generations, args.rounds or 1, args.seed)
    else:
        args.rounds = args.rounds or 3
        pgd_side_by_side(fixture.model, fixture.data, args)


if __name__ == "__main__":
    main()
