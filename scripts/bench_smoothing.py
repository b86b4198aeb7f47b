"""Randomized smoothing (Cohen et al. 2019): our CERTIFY against ART's, side by side.

For each sigma, a Fashion-MNIST small-cnn is trained by ``gaussian-aug`` at that sigma (cached in
bench_common's model cache), then the same test points are certified by ``robustbench_lite.certify.smoothing`` and by
ART's ``PyTorchRandomizedSmoothing.certify`` with the same n0, n and alpha (ours first, then ART's, per
sigma, so machine load hits both alike).  Printed: certified accuracy at each L2 radius for both, the
abstain rate, and wall and process-CPU seconds.  A PNG plots certified accuracy against the L2 radius,
one line per sigma (ours solid, ART's dashed).  The two use different noise, so they agree only up to
Monte Carlo error.

    python scripts/bench_smoothing.py --points 500 --n 1000 --threads 1 --plot smoothing.png
"""

from __future__ import annotations

from pathlib import Path

import bench_common as bc
import numpy as np
import torch

from robustbench_lite import Data, ModelSpec, create_defense, load
from robustbench_lite.certify.binomial import all_agree_radius
from robustbench_lite.certify.smoothing import Smoothing, certified_accuracy


def art_certify(model, x: torch.Tensor, num_classes: int, cfg: Smoothing, seed: int):
    """ART's CERTIFY on the same model and settings; its noise comes from numpy's global generator."""
    from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

    clf = PyTorchRandomizedSmoothing(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=num_classes,
        device_type="cpu", sample_size=cfg.n0, scale=cfg.sigma, alpha=cfg.alpha,
    )
    np.random.seed(seed)
    pred, radius = clf.certify(x.numpy(), n=cfg.n, batch_size=cfg.batch_size)
    return torch.as_tensor(pred, dtype=torch.long), torch.as_tensor(radius, dtype=torch.float64)


def main() -> None:
    ap = bc.parser(__doc__)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.12, 0.25, 0.5])
    ap.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    ap.add_argument("--points", type=int, default=500)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--train", type=int, default=20000, help="training images (the first of the train split)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--plot", default=".rbl/bench_smoothing.png")
    ap.add_argument("--no-art", action="store_true", help="only ours (e.g. for a larger n)")
    args = bc.parse(ap)
    full = load("fashion-mnist", train_limit=args.train)
    data = Data(full.name, full.train, full.test, full.num_classes)
    x, y = data.test.x[: args.points], data.test.y[: args.points]
    grid = np.round(np.arange(0.0, 2.0001, 0.01), 4)
    curves: dict[float, dict[str, np.ndarray]] = {}
    print(
        f"Fashion-MNIST small-cnn, gaussian-aug {args.epochs} epochs on {len(data.train)} images; {len(x)} test "
        f"points; n0 {args.n0}, n {args.n}, alpha {args.alpha}, batch {args.batch_size}, {args.threads} thread(s)"
    )
    head = "  ".join(f"r={r:<4g}" for r in args.radii)
    print(f"{'sigma':>6} {'impl':<5} {'base_acc':>8} {'abstain':>8}  {head}  {'wall_s':>7} {'cpu_s':>7}  max_radius")
    for sigma in args.sigmas:
        defense = create_defense("gaussian-aug", sigma=sigma, epochs=args.epochs, seed=args.seed)
        fixture = bc.train(ModelSpec("small-cnn"), defense, data)
        trained, model = fixture.trained, fixture.model
        cfg = Smoothing(sigma=sigma, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size)
        runs = {"ours": lambda cfg=cfg, model=model: cfg.certify(model, x, torch.Generator().manual_seed(args.seed))}
        if not args.no_art:
            runs["ART"] = lambda cfg=cfg, model=model: art_certify(model, x, data.num_classes, cfg, args.seed)
        curves[sigma] = {}
        for impl, run in runs.items():
            (pred, radius), wall, cpu = bc.timed(run)
            correct = pred == y
            acc = certified_accuracy(radius, correct, args.radii).tolist()
            curves[sigma][impl] = certified_accuracy(radius, correct, grid).numpy()
            cells = "  ".join(f"{a:<6.3f}" for a in acc)
            abstain = float((pred == -1).double().mean())
            print(
                f"{sigma:>6g} {impl:<5} {trained.sidecar['clean_acc']:>8.3f} {abstain:>8.3f}  {cells}  {wall:>7.1f} "
                f"{cpu:>7.1f}  {all_agree_radius(sigma, args.n, args.alpha):.3f}",
                flush=True,
            )
    plot(curves, grid, args)


def plot(curves, grid, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (sigma, by_impl) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(grid, by_impl["ours"], color=color, label=f"σ = {sigma:g} (ours)")
        if "ART" in by_impl:
            ax.plot(grid, by_impl["ART"], color=color, linestyle="--", label=f"σ = {sigma:g} (ART)")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(f"Randomized smoothing, Fashion-MNIST small-cnn (n = {args.n}, α = {args.alpha:g})", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
