"""How the model's passes run on the CPU: the seconds of a forward pass and of a forward +
input-gradient pass (what an attack step costs) with the model and batch contiguous (NCHW),
channels_last (NHWC), and channels_last in the device policy's cache-sized chunks (the CPU
policy's ``Chunked`` passes), side by side, for each zoo model on Fashion-MNIST-shaped inputs.
The device policy evaluates channels_last on every device, trains channels_last only on CUDA, and
chunks attack passes on the CPU; this is the measurement behind those rules.

    python scripts/bench_layout.py --rounds 7

Models are freshly initialised (the cost does not depend on the weights' values).  Each row also
checks that the layouts give the same logits to float rounding, and that the chunked passes give
exactly the unchunked NHWC logits.
"""

from __future__ import annotations

import copy

import bench_common as bc
import torch

from robustbench_lite import create_model, make_policy

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
    print("| model | batch | rows per chunk | forward NCHW | NHWC | NHWC chunked | NCHW/chunked "
          "| fwd+grad NCHW | NHWC | NHWC chunked | NCHW/chunked | max logit diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    policy = make_policy("cpu")
    for name in MODELS:
        torch.manual_seed(args.seed)
        plain = create_model(name, (1, 28, 28), 10).eval()
        nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        chunked = policy.chunked(nhwc)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.rand(batch, 1, 28, 28)
            xc = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                diff = float((plain(x) - nhwc(xc)).abs().max())
                if not torch.equal(nhwc(xc), chunked(xc)):
                    raise SystemExit(f"{name}: chunked passes changed the logits")
            t = bc.interleaved({"fp": forward(plain, x), "fc": forward(nhwc, xc), "fk": forward(chunked, xc),
                                "gp": input_grad(plain, x), "gc": input_grad(nhwc, xc), "gk": input_grad(chunked, xc)},
                               args.rounds)
            ms = {k: v.cpu_median / 5 * 1e3 for k, v in t.items()}
            rows = min(chunked.rows, batch)  # the CPU policy always chunks: its measured rows
            print(f"| {name} | {batch} | {rows} | {ms['fp']:.2f} | {ms['fc']:.2f} | {ms['fk']:.2f} | {ms['fp'] / ms['fk']:.2f} "
                  f"| {ms['gp']:.2f} | {ms['gc']:.2f} | {ms['gk']:.2f} | {ms['gp'] / ms['gk']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
