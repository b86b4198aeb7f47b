"""Cost of a PGD-AT epoch (Madry et al., ICLR 2018) with k steps against a standard epoch,
measured side by side.

Claim checked: a PGD-AT epoch with k inner steps costs at most 1.1 · (k + 1) standard epochs
(k input-gradient passes plus one training pass per batch).  Every configuration trains the same
small-cnn on the same Fashion-MNIST subset for one epoch through the real ``Defense.fit`` loop;
rounds are interleaved (every configuration once per round, each round starting one configuration
later) so machine load hits all alike,
and the median over rounds is reported: the loop's own epoch time (``epoch_s``, which the claim is
checked on) and, for a shared machine, the process CPU time of the whole ``fit`` call
(``fit_cpu_s``) and its ratio to the standard one.

    python scripts/bench_train.py --points 4000 --rounds 3 --threads 1
"""

from __future__ import annotations

import statistics
import time

import bench_common as bc
import torch

from robustbench_lite import Data, create_defense, load


def epoch_seconds(name: str, params: dict, data: Data, batch_size: int) -> float:
    torch.manual_seed(0)
    model = bc.SMALL_CNN.build(data)
    log = create_defense(name, epochs=1, batch_size=batch_size, **params).fit(model, data, progress=False)
    return log.epochs[0].seconds


def main() -> None:
    ap = bc.parser(__doc__, rounds=3)
    ap.add_argument("--points", type=int, default=4000)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 3, 7])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--eps", type=float, default=0.1)
    args = bc.parse(ap)
    full = load("fashion-mnist", train_limit=args.points)
    data = Data(full.name, full.train, full.test.head(100), full.num_classes)  # no val: the epoch is training only
    configs = {0: ("standard", {})} | {k: ("pgd-at", {"eps": args.eps, "steps": k}) for k in args.steps}
    start = time.time()
    timings = bc.interleaved(
        {k: (lambda name=name, params=params: epoch_seconds(name, params, data, args.batch_size))
         for k, (name, params) in configs.items()},
        args.rounds,
    )
    epoch = {k: statistics.median(t.results) for k, t in timings.items()}  # the training loop's own epoch time
    print(
        f"small-cnn, Fashion-MNIST {args.points} train images, batch {args.batch_size}, {bc.environment()}, "
        f"{args.rounds} interleaved rounds (median), eps {args.eps}; total {time.time() - start:.0f} s"
    )
    print(f"{'defense':<10}{'k':>3}{'epoch_s':>10}{'ratio':>8}{'bound 1.1(k+1)':>16}{'holds':>7}{'fit_cpu_s':>11}"
          f"{'cpu_ratio':>10}   all rounds (s)")
    cpu = {k: t.cpu_median for k, t in timings.items()}
    for k, (name, _) in configs.items():
        ratio = epoch[k] / epoch[0]
        holds = ("yes" if ratio <= 1.1 * (k + 1) else "NO") if k else "-"
        rounds = " ".join(f"{t:.2f}" for t in timings[k].results)
        print(f"{name:<10}{k:>3}{epoch[k]:>10.2f}{ratio:>8.2f}{1.1 * (k + 1):>16.2f}{holds:>7}{cpu[k]:>11.2f}"
              f"{cpu[k] / cpu[0]:>10.2f}   {rounds}")


if __name__ == "__main__":
    main()
