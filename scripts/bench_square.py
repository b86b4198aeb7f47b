"""Square attack on an undefended Fashion-MNIST small-cnn at Linf eps 0.1: success rate and
queries per success for several budgets, next to white-box PGD on the same points.

    python scripts/bench_square.py [--n 1000] [--train-limit 20000] [--epochs 2]

Success rate = share of the clean-correct points the attack misclassifies; queries are counted
per point (the initial query included) from the sizes of the batches the attack sends.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from robustbench_lite.core.data import load
from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.registry import create_attack, create_defense
from robustbench_lite.training.cache import ModelCache, train_or_load


class BatchLog(nn.Module):
    """Records the batch size of every forward call (the points still being attacked)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


def queries_of_successes(sizes: list[int], n_success: int) -> list[int]:
    """Query index at which each successful point stopped, from the active-batch sizes."""
    out: list[int] = []
    for k in range(1, len(sizes)):
        out += [k] * (sizes[k - 1] - sizes[k])
    out += [len(sizes)] * (n_success - len(out))  # succeeded at the last query
    return out[:n_success]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--budgets", default="100,1000,5000")
    ap.add_argument("--p-inits", default="0.05,0.3")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load("fashion-mnist", train_limit=args.train_limit)
    defense = create_defense("standard", epochs=args.epochs, batch_size=128, lr=2e-3)
    t0 = time.perf_counter()
    model = train_or_load(ModelSpec("small-cnn"), defense, data, ModelCache(".rbl/bench_models"), progress=False).model
    print(f"model: small-cnn, standard training, {args.epochs} epochs on {len(data.train)} Fashion-MNIST images "
          f"({time.perf_counter() - t0:.0f} s incl. cache)")
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    print(f"clean accuracy on the first {args.n} test points: {float(ok.float().mean()):.3f}; attacking the {len(y)} correct ones")
    print(f"Linf eps {args.eps}\n")
    print(f"{'attack':28s} {'success':>8s} {'mean q':>8s} {'median q':>9s} {'fwd/pt':>8s} {'grads':>6s} {'seconds':>8s}")
    pgd = create_attack("pgd", eps=args.eps, steps=40)
    out = pgd.run(model, x, y)
    with torch.no_grad():
        rate = float((model(out.x_adv).argmax(1) != y).float().mean())
    print(f"{'pgd-40 (white-box)':28s} {rate:8.3f} {'-':>8s} {'-':>9s} {out.forward_evals / len(y):8.1f} "
          f"{out.grad_evals:6d} {out.seconds:8.1f}")
    for p_init in (float(p) for p in args.p_inits.split(",")):
        for budget in (int(b) for b in args.budgets.split(",")):
            att = create_attack("square", eps=args.eps, queries=budget, p_init=p_init)
            logged = BatchLog(model)
            out = att.run(logged, x, y)
            with torch.no_grad():
                success = model(out.x_adv).argmax(1) != y
            q = torch.tensor(queries_of_successes(logged.sizes, int(success.sum())), dtype=torch.float)
            mean_q = f"{float(q.mean()):8.1f}" if len(q) else f"{'-':>8s}"
            med_q = f"{float(q.median()):9.0f}" if len(q) else f"{'-':>9s}"
            name = f"square p_init={p_init} budget={budget}"
            print(f"{name:28s} {float(success.float().mean()):8.3f} {mean_q} {med_q} "
                  f"{out.forward_evals / len(y):8.1f} {out.grad_evals:6d} {out.seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
