"""Per-wrapper table for issue 7: a digits small-cnn wrapped so its gradients lie, evaluated by
the harness without and with the adaptive rerun (Linf eps 0.1, first 200 test points).

    python scripts/trust_table.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

from robustbench_lite.core.data import load
from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.registry import create_attack, create_defense
from robustbench_lite.eval.adaptive import bpda
from robustbench_lite.eval.evasion import evaluate
from robustbench_lite.training.cache import ModelCache, train_or_load


class Scale(nn.Module):
    def forward(self, z):
        return z * 1e4


class InputNoise(nn.Module):
    def forward(self, x):
        return (x + 0.05 * torch.randn_like(x)).clamp(0.0, 1.0)


def main() -> None:
    torch.set_num_threads(1)
    data = load("digits")
    defense = create_defense("standard", epochs=8, batch_size=64, lr=3e-3)  # the tests' digits_model
    base = train_or_load(ModelSpec("small-cnn"), defense, data, ModelCache(".rbl/bench_models"), progress=False).model
    models = {
        "honest": base,
        "logits x1e4": nn.Sequential(base, Scale()),
        "softmax output": nn.Sequential(base, nn.Softmax(dim=1)),
        "quantized input (bpda-marked round, 16 levels)": nn.Sequential(bpda(lambda x: torch.round(x * 15) / 15), base),
        "input noise N(0, 0.05^2)": nn.Sequential(InputNoise(), base),
    }
    attacks = [create_attack("fgsm", eps=0.1), create_attack("ifgsm", eps=0.1),
               create_attack("pgd", eps=0.1, steps=20), create_attack("square", eps=0.1, queries=300)]
    names = [a.name for a in attacks]
    print("digits small-cnn, Linf eps 0.1, n=200; robust accuracy per attack (own run), worst case per point")
    print(f"{'model':48s} {'adaptive':8s} {'clean':>6s} " + " ".join(f"{n:>7s}" for n in names)
          + f" {'worst':>6s} {'sec':>5s}  flags (worst_case row)")
    for label, model in models.items():
        for adaptive in (False, True):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            ev = evaluate(model, attacks, data.test, n=200, adaptive=adaptive)
            wc = float(next(iter(ev.worst_case.values())).float().mean())
            accs = " ".join(f"{r.robust_acc:7.3f}" for r in ev.records)
            flags = ";".join(sorted(ev.flags["worst_case@linf_0.1"])) or "-"
            print(f"{label:48s} {str(adaptive):8s} {ev.clean_acc:6.3f} {accs} {wc:6.3f} "
                  f"{time.perf_counter() - t0:5.0f}  {flags}", flush=True)


if __name__ == "__main__":
    main()
