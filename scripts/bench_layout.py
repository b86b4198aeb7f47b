"""Memory layout: the seconds of a forward pass and of a forward + input-gradient pass (what an
attack step costs) with the model and batch contiguous (NCHW) against channels_last (NHWC), side
by side, for each zoo model on Fashion-MNIST-shaped inputs.  The device policy evaluates
channels_last on every device and trains channels_last only on CUDA; this is the measurement
behind that rule.

    python scripts/bench_layout.py --rounds 7

Models are freshly initialised (the layout's cost does not depend on the weights' values).  Each
row also checks that both layouts give the same logits to float rounding.
"""

from __future__ import annotations

import copy

import bench_common as bc
import torch

from robustbench_lite import create_model

MODELS = ("small-cnn", "cnn-cert-small", "mlp", "one-hidden-relu")


def forward(model, x):
    def run():
        with torch.no_grad():
            for _ in range(5):
                model(x)

    return run


def input_grad(model, x):
    def run():
        for _ in range(5):
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(model(xx).sum(), xx)

    return run


def main() -> None:
    p = bc.parser(__doc__, rounds=7)
    p.add_argument("--batches", default="38,200", help="comma-separated batch sizes")
    args = bc.parse(p)
    print(f"# {bc.environment()}; 5 calls per timed run, median of {args.rounds} interleaved rounds (CPU ms per call)")
    print("| model | batch | forward NCHW | forward NHWC | NCHW/NHWC | fwd+grad NCHW | fwd+grad NHWC | NCHW/NHWC | max logit diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        torch.manual_seed(args.seed)
        plain = create_model(name, (1, 28, 28), 10).eval()
        nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.rand(batch, 1, 28, 28)
            xc = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                diff = float((plain(x) - nhwc(xc)).abs().max())
            t = bc.interleaved({"fp": forward(plain, x), "fc": forward(nhwc, xc),
                                "gp": input_grad(plain, x), "gc": input_grad(nhwc, xc)}, args.rounds)
            ms = {k: v.cpu_median / 5 * 1e3 for k, v in t.items()}
            print(f"| {name} | {batch} | {ms['fp']:.2f} | {ms['fc']:.2f} | {ms['fp'] / ms['fc']:.2f} | {ms['gp']:.2f} "
                  f"| {ms['gc']:.2f} | {ms['gp'] / ms['gc']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
