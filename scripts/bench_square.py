"""Square attack (Andriushchenko et al., ECCV 2020) on an undefended Fashion-MNIST small-cnn at
Linf eps 0.1: success rate and queries per success for several budgets and initial square sizes
``p_init`` (the paper's ImageNet value 0.05 and a larger one for 28x28 images), next to white-box
PGD on the same points.

    python scripts/bench_square.py [--n 1000] [--train-limit 20000] [--epochs 2] [--p-inits 0.05,0.3]

Success rate = share of the clean-correct points the attack misclassifies; queries are counted
per point (the initial query included) from the sizes of the batches the attack sends (these
runs score every query with a full pass: the logging wrapper hides the network's structure).

``--scoring`` instead times the two ways Square scores its Linf queries on a small-cnn, side by
side on the same points and seed: incremental (only the feature-map boxes a window can change,
the default where the network allows) against a full forward pass per query, with the full
preset's settings (1000 queries, p_init 0.3) on the PGD-AT bench model (most points survive, so
the search runs its whole budget).  It prints both robust accuracies, the points one broke and
the other did not, and the CPU seconds.

    python scripts/bench_square.py --scoring [--n 500] [--rounds 3] --threads 1
"""

from __future__ import annotations

import time

import bench_common as bc
import torch
from robustbench_lite.attacks.square import Square

from robustbench_lite import create_attack, make_policy


def queries_of_successes(sizes: list[int], n_success: int) -> list[int]:
    """Query index at which each successful point stopped, from the active-batch sizes."""
    out: list[int] = []
    for k in range(1, len(sizes)):
        out += [k] * (sizes[k - 1] - sizes[k])
    out += [len(sizes)] * (n_success - len(out))  # succeeded at the last query
    return out[:n_success]


def scoring_side_by_side(n: int, rounds: int, seed: int) -> None:
    fixture = bc.pgd_at_model()
    print(f"model: {fixture.describe()}; {bc.environment()}")
    policy = make_policy("cpu")
    model = policy.model_to(fixture.model).eval()  # as the evaluation runs it: channels_last, chunked passes
    x, y = fixture.data.test.x[:n], fixture.data.test.y[:n]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    attack = create_attack("square", eps=0.1, queries=1000, p_init=0.3, seed=seed)

    def run(incremental: bool):
        def go():
            Square.incremental = incremental
            try:
                out = attack.run(policy.chunked(model), x, y, torch.Generator().manual_seed(seed))
            finally:
                Square.incremental = True
            with torch.no_grad():
                return model(out.x_adv).argmax(1) == y

        return go

    t = bc.interleaved({"incremental": run(True), "full": run(False)}, rounds)
    inc, full = t["incremental"].results[0], t["full"].results[0]
    print(f"Square Linf 0.1, 1000 queries, p_init 0.3, on the {len(y)} clean-correct of the first {n} test points; "
          f"CPU s median of {rounds}")
    print("| scoring | robust (of clean-correct) | broken only by this one | CPU s | full / incremental |")
    print("|---|---|---|---|---|")
    ratio = t["full"].cpu_median / t["incremental"].cpu_median
    for name, mine, other in (("full", full, inc), ("incremental", inc, full)):
        print(f"| {name} | {int(mine.sum())} / {len(y)} | {int((~mine & other).sum())} | {t[name].cpu_median:.1f} "
              f"| {ratio:.2f} |")


def main() -> None:
    ap = bc.parser(__doc__, n=1000, rounds=3)
    ap.add_argument("--scoring", action="store_true", help="incremental against full-pass scoring, side by side")
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--budgets", default="100,1000,5000")
    ap.add_argument("--p-inits", default="0.05,0.3")
    args = bc.parse(ap)
    if args.scoring:
        scoring_side_by_side(args.n, args.rounds, args.seed)
        return
    t0 = time.perf_counter()
    fixture = bc.standard_model(train_limit=args.train_limit, epochs=args.epochs, batch_size=128, lr=2e-3)
    model, data = fixture.model, fixture.data
    print(f"model: {fixture.describe()} ({time.perf_counter() - t0:.0f} s incl. cache); {bc.environment()}")
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    print(f"clean accuracy on the first {args.n} test points: {float(ok.float().mean()):.3f}; attacking the {len(y)} correct ones")
    print(f"Linf eps {args.eps}\n")
    print(f"{'attack':28s} {'success':>8s} {'mean q':>8s} {'median q':>9s} {'fwd/pt':>8s} {'grads':>6s} {'seconds':>8s}")
    pgd = create_attack("pgd", eps=args.eps, steps=40, seed=args.seed)
    out = pgd.run(model, x, y)
    with torch.no_grad():
        rate = float((model(out.x_adv).argmax(1) != y).float().mean())
    print(f"{'pgd-40 (white-box)':28s} {rate:8.3f} {'-':>8s} {'-':>9s} {out.forward_evals / len(y):8.1f} "
          f"{out.grad_evals:6d} {out.seconds:8.1f}")
    for p_init in (float(p) for p in args.p_inits.split(",")):
        for budget in (int(b) for b in args.budgets.split(",")):
            att = create_attack("square", eps=args.eps, queries=budget, p_init=p_init, seed=args.seed)
            logged = bc.ForwardLog(model)
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
