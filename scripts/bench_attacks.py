#!/usr/bin/env python
"""Side-by-side speed and strength of PGD: ours vs a bare autograd loop vs torchattacks.

Fashion-MNIST small-cnn (the quick preset's standard-trained model, cached in .rbl/models),
2000 test points, Linf eps 0.1, 20 steps of 2.5*eps/20, batch 500.  Each implementation runs
`--rounds` times, interleaved; the table shows the median seconds, the ratio to the bare loop
and the robust accuracy.  Targets: ours <= 1.05x the bare loop, faster than torchattacks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robustbench_lite.data import load
from robustbench_lite.model_cache import ModelCache, ModelSpec, train_or_load
from robustbench_lite.registry import create_attack, create_defense


def bare_pgd(model, x, y, eps, alpha, steps, gen):
    """The textbook loop: random start, sign step, clamp to the ball and the box."""
    x_adv = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=".rbl")
    args = p.parse_args()

    data = load("fashion-mnist")
    model = train_or_load(
        ModelSpec("small-cnn"), create_defense("standard", epochs=3), data, ModelCache(f"{args.workdir}/models")
    ).model.eval()
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
