"""Cost of the escalation ladder's transfer surrogate, bounded by the evaluation it serves, against
the unbounded recipe, measured side by side.

Claim checked: for an evaluation of ``n`` points the surrogate trains on at most
``Escalation().surrogate_limit(n)`` images in all (``surrogate_share · budget · n``; 24,000 for 40
points), so the surrogate of a 40-point check costs a small share of the full ``standard`` recipe
(5 epochs on 60,000 Fashion-MNIST images) that the ladder trained before.  Each configuration
trains small-cnn through the real ``Defense.fit`` loop (no model cache) on the schedule
:func:`~robustbench_lite.eval.escalate.surrogate_schedule` gives; the process CPU seconds and wall
seconds of each ``fit`` are printed, and the ratio of each to the unbounded one.

    python scripts/bench_surrogate.py --sizes 40 200 --threads 1
"""

from __future__ import annotations

import time

import bench_common as bc
import torch

from robustbench_lite import create_defense, load
from robustbench_lite.eval.escalate import Escalation, surrogate_schedule


def fit_seconds(epochs: int, images: int, data) -> tuple[float, float]:
    """(CPU, wall) seconds of training small-cnn with the standard recipe for ``epochs`` on the
    first ``images`` training images."""
    from dataclasses import replace

    part = replace(data, train=data.train.head(images))
    torch.manual_seed(0)
    model = bc.SMALL_CNN.build(part)
    cpu, wall = time.process_time(), time.perf_counter()
    create_defense("standard", epochs=epochs).fit(model, part, progress=False)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    ap = bc.parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[40, 200], help="evaluation sizes (points)")
    args = bc.parse(ap)
    data = load("fashion-mnist")
    recipe = create_defense("standard").epochs
    runs = {"unbounded": (recipe, len(data.train))}
    for n in args.sizes:
        runs[f"n={n}"] = surrogate_schedule(recipe, len(data.train), Escalation().surrogate_limit(n))
    results = {name: fit_seconds(e, m, data) for name, (e, m) in runs.items()}
    base_cpu, base_wall = results["unbounded"]
    print(f"{'run':>10s} {'epochs':>6s} {'images':>7s} {'seen':>8s} {'cpu_s':>8s} {'wall_s':>8s} {'cpu_ratio':>9s}")
    for name, (e, m) in runs.items():
        cpu, wall = results[name]
        print(f"{name:>10s} {e:6d} {m:7d} {e * m:8d} {cpu:8.1f} {wall:8.1f} {cpu / base_cpu:9.3f}")


if __name__ == "__main__":
    main()
