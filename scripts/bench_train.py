"""Cost of a PGD-AT epoch with k steps against a standard epoch, measured side by side.

Claim checked: a PGD-AT epoch with k inner steps costs at most 1.1 · (k + 1) standard epochs
(k input-gradient passes plus one training pass per batch).  Every configuration trains the same
small-cnn on the same Fashion-MNIST subset for one epoch through the real ``Defense.fit`` loop;
rounds are interleaved (standard, k=1, k=3, k=7, standard, ...) so machine load hits all alike,
and the median over rounds is reported.

    python scripts/bench_train.py --points 4000 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustbench_lite.core.data import Data, load
from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.registry import create_defense


def epoch_seconds(name: str, params: dict, data: Data, batch_size: int) -> float:
    torch.manual_seed(0)
    model = ModelSpec("small-cnn").build(data)
    log = create_defense(name, epochs=1, batch_size=batch_size, **params).fit(model, data, progress=False)
    return log.epochs[0].seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--points", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 3, 7])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eps", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    full = load("fashion-mnist", train_limit=args.points)
    data = Data(full.name, full.train, full.test.head(100), full.num_classes)  # no val: the epoch is training only
    configs = [("standard", {}, 0)] + [("pgd-at", {"eps": args.eps, "steps": k}, k) for k in args.steps]
    times: dict[int, list[float]] = {k: [] for _, _, k in configs}
    start = time.time()
    for _ in range(args.rounds):
        for name, params, k in configs:
            times[k].append(epoch_seconds(name, params, data, args.batch_size))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"small-cnn, Fashion-MNIST {args.points} train images, batch {args.batch_size}, {args.threads} thread(s), "
        f"{args.rounds} interleaved rounds (median), eps {args.eps}; total {time.time() - start:.0f} s"
    )
    print(f"{'defense':<10}{'k':>3}{'epoch_s':>10}{'ratio':>8}{'bound 1.1(k+1)':>16}{'holds':>7}   all rounds (s)")
    for name, _, k in configs:
        ratio = med[k] / med[0]
        holds = ("yes" if ratio <= 1.1 * (k + 1) else "NO") if k else "-"
        rounds = " ".join(f"{t:.2f}" for t in times[k])
        print(f"{name:<10}{k:>3}{med[k]:>10.2f}{ratio:>8.2f}{1.1 * (k + 1):>16.2f}{holds:>7}   {rounds}")


if __name__ == "__main__":
    main()
