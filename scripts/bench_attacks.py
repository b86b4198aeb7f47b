#!/usr/bin/env python
"""Side-by-side speed and strength of PGD: ours vs a bare autograd loop vs torchattacks.

Fashion-MNIST small-cnn (the quick preset's standard-trained model, cached in .rbl/models),
2000 test points, Linf eps 0.1, 20 steps of 2.5*eps/20, batch 500.  Each implementation runs
`--rounds` times, interleaved; the table shows the median seconds, the ratio to the bare loop
and the robust accuracy.  Targets: ours <= 1.05x the bare loop, faster than torchattacks.

``--one-pixel`` instead compares the one-pixel attack (k = 1, untargeted) with ART's PixelAttack
(issue 6) on the same first ``--images`` correctly classified test images of the same model, at
equal population x generations (ART: popsize 133 x 3 parameters = 399 members; ours: population
399), both with early stopping; it reports success rate, wall and CPU seconds, model forward
evaluations (ART's counted by a wrapper) and CPU milliseconds per forward.  Ours runs twice: with
the incremental window evaluation (default) and with full forwards (``incremental=False``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robustbench_lite.core.data import load
from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.registry import create_attack, create_defense
from robustbench_lite.training.cache import ModelCache, train_or_load


def bare_pgd(model, x, y, eps, alpha, steps, gen):
    """The textbook loop: random start, sign step, clamp to the ball and the box."""
    x_adv = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


class _CountForwards(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.n = model, 0

    def forward(self, x):
        self.n += x.shape[0]
        return self.model(x)


def one_pixel_side_by_side(model, data, images: int, generations: int) -> None:
    import numpy as np
    from art.attacks.evasion import PixelAttack
    from art.estimators.classification import PyTorchClassifier

    from robustbench_lite.core.models import predict

    test = data.test.head(2000)
    idx = (predict(model, test.x, "cpu") == test.y).nonzero().flatten()[:images]
    x, y = test.x[idx], test.y[idx]
    print(f"one-pixel k=1 untargeted, first {len(y)} correctly classified test images, 399 members x {generations} "
          f"generations (+ the initial population), early stop; torch threads={torch.get_num_threads()}")
    rows = []

    def record(name, adv, wall, cpu, forwards):
        with torch.no_grad():
            success = float((model(adv).argmax(1) != y).float().mean())
        l0 = int((adv - x).abs().amax(1).flatten(1).gt(1e-6).sum(1).max())
        rows.append((name, success, l0, wall, cpu, forwards, 1e3 * cpu / max(forwards, 1)))

    counted = _CountForwards(model).eval()
    clf = PyTorchClassifier(model=counted, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=data.num_classes, clip_values=(0.0, 1.0))
    art = PixelAttack(clf, th=1, es=1, max_iter=generations, targeted=False, verbose=False)
    t0, c0 = time.perf_counter(), time.process_time()
    adv = torch.from_numpy(art.generate(x.numpy(), y.numpy()).astype(np.float32))
    record("ART PixelAttack", adv, time.perf_counter() - t0, time.process_time() - c0, counted.n)
    for inc in (True, False):
        ours = create_attack("one-pixel", eps=1, population=399, generations=generations, incremental=inc)
        t0, c0 = time.perf_counter(), time.process_time()
        out = ours.run(model, x, y)
        record(f"ours (incremental={inc})", out.x_adv, time.perf_counter() - t0, time.process_time() - c0, out.forward_evals)
    print(f"{'implementation':26s} {'success':>8s} {'max L0':>6s} {'wall s':>8s} {'CPU s':>8s} {'forwards':>10s} "
          f"{'CPU ms/fwd':>10s} {'CPU speed-up':>12s}")
    for name, success, l0, wall, cpu, fwd, ms in rows:
        print(f"{name:26s} {success:8.3f} {l0:6d} {wall:8.1f} {cpu:8.1f} {fwd:10d} {ms:10.4f} {rows[0][4] / cpu:11.1f}x")
    print(f"success difference (ours incremental - ART): {rows[1][1] - rows[0][1]:+.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=".rbl")
    p.add_argument("--one-pixel", action="store_true", help="run the one-pixel vs ART comparison instead of PGD")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load("fashion-mnist")
    model = train_or_load(
        ModelSpec("small-cnn"), create_defense("standard", epochs=3), data, ModelCache(f"{args.workdir}/models")
    ).model.eval()
    if args.one_pixel:
        one_pixel_side_by_side(model, data, args.images, args.generations)
        return
    x_all, y_all = data.test.x[: args.n], data.test.y[: args.n]
    alpha = 2.5 * args.eps / args.steps
    import torchattacks

    ta = torchattacks.PGD(model, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True)
    ours = create_attack("pgd", eps=args.eps, steps=args.steps, step=alpha)

    def batches(fn):
        outs = [fn(x_all[i : i + args.batch], y_all[i : i + args.batch]) for i in range(0, args.n, args.batch)]
        return torch.cat([o[0] for o in outs]), sum(o[1] for o in outs)

    def run_ours(x, y):
        out = ours.run(model, x, y, gen)
        return out.x_adv, out.grad_evals

    gen = torch.Generator().manual_seed(0)
    full = len(y_all) * args.steps  # gradient evaluations of a loop without early exit
    impls = {
        "bare autograd loop": lambda x, y: (bare_pgd(model, x, y, args.eps, alpha, args.steps, gen), len(y) * args.steps),
        "robustbench_lite pgd": run_ours,
        "torchattacks PGD": lambda x, y: (ta(x, y), len(y) * args.steps),
    }
    times = {k: [] for k in impls}
    acc, grads = {}, {}
    for _ in range(args.rounds):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            x_adv, grads[name] = batches(fn)
            times[name].append(time.perf_counter() - t0)
            with torch.no_grad():
                acc[name] = float((model(x_adv).argmax(1) == y_all).float().mean())
    with torch.no_grad():
        clean = float((model(x_all).argmax(1) == y_all).float().mean())
    base = statistics.median(times["bare autograd loop"])
    print(f"PGD Linf eps={args.eps}, {args.steps} steps of {alpha:.4g}, n={args.n}, batch={args.batch}, "
          f"{args.rounds} rounds, torch threads={torch.get_num_threads()}, clean acc={clean:.3f}")
    print(f"{'implementation':24s} {'median s':>9s} {'vs bare':>8s} {'robust acc':>11s} {'grad evals':>11s} "
          f"{'us/grad':>8s}")
    for name in impls:
        med = statistics.median(times[name])
        print(f"{name:24s} {med:9.2f} {med / base:7.2f}x {acc[name]:11.3f} {grads[name]:11d} "
              f"{1e6 * med / grads[name]:8.1f}")
    print(f"(ours stops attacking a point once it is misclassified; a loop without that does {full} gradient "
          "evaluations. us/grad compares the cost per image-gradient, i.e. the per-step overhead.)")


if __name__ == "__main__":
    main()
