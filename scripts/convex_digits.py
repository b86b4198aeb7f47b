"""Convex-standard (Pilanci & Ergen, ICML 2020) vs convex-robust (Bai, Gautam & Sojoudi, ACC 2022)
one-hidden-layer ReLU networks on digits: clean, PGD (50 steps, 2 restarts) and certified
accuracy (the ``stable-relu`` verifier) at three Linf radii, and how many certified points PGD
broke (must be 0).

    python scripts/convex_digits.py [--eps 0.2]
"""

from __future__ import annotations

import bench_common as bc
import torch

from robustbench_lite import ModelSpec, ThreatModel, create_attack, create_defense, create_verifier, load

RADII = (0.01, 0.05, 0.2)


def main() -> None:
    p = bc.parser(__doc__)
    p.add_argument("--eps", type=float, default=0.2, help="the radius convex-robust trains at (and certify_eps)")
    args = bc.parse(p)
    eps = args.eps
    data = load("digits")
    x, y = data.test.x, data.test.y
    verifier = create_verifier("stable-relu")
    print(
        f"digits (8x8, {len(data.train)} train / {len(y)} test), one-vs-rest, one-hidden-relu hidden 100 "
        f"(P=5 patterns/class), beta 1e-2, 600 PDHG iterations, 400 training points; robust trained at eps {eps}"
    )
    head = "".join(f"{'pgd@' + str(r):>10}{'cert@' + str(r):>11}{'cert&broken':>12}" for r in RADII)
    print(f"{'defense':<17}{'fit_s':>6}{'clean':>7}{head}{'objective':>10}{'violation':>10}")
    for name in ("convex-standard", "convex-robust"):
        params = {"iterations": 600, "max_points": 400, "epochs": 2, "certify_eps": eps, "beta": 1e-2}
        if name == "convex-robust":
            params["eps"] = eps
        model = ModelSpec("one-hidden-relu", {"hidden": 100}).build(data)
        log, seconds, _ = bc.timed(lambda name=name, params=params, model=model: create_defense(name, **params).fit(
            model, data, progress=False))
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        row = f"{name:<17}{seconds:>6.0f}{clean:>7.3f}"
        for r in RADII:
            x_adv = create_attack("pgd", eps=r, steps=50, restarts=2, seed=args.seed).perturb(model, x, y)
            with torch.no_grad():
                ok = model(x_adv).argmax(1) == y
            cert = verifier.certify(model, x, y, ThreatModel("linf", r))
            row += f"{ok.float().mean().item():>10.3f}{cert.float().mean().item():>11.3f}{int((cert & ~ok).sum()):>12d}"
        last = log.epochs[-1].metrics
        print(f"{row}{last['objective']:>10.4f}{last['violation']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
