"""Per-wrapper table of the masking flags: a digits small-cnn wrapped so its gradients lie
(scaled logits, softmax outputs, quantized input, input noise; the failure modes of Athalye,
Carlini & Wagner, ICML 2018, and Carlini et al., "On evaluating adversarial robustness", 2019),
evaluated by the harness without and with the adaptive rerun (BPDA / EOT / log-outputs / logit
rescaling), Linf eps 0.1, first ``--n`` test points.

    python scripts/trust_table.py [--n 200]
"""

from __future__ import annotations

import bench_common as bc
import torch
from torch import nn

from robustbench_lite import create_attack, evaluate
from robustbench_lite.eval.adaptive import bpda


def main() -> None:
    args = bc.parse(bc.parser(__doc__, n=200))
    fixture = bc.digits_model()
    base, data = fixture.model, fixture.data
    models = {
        "honest": base,
        "logits x1e4": nn.Sequential(base, bc.Lambda(lambda z: z * 1e4)),
        "softmax output": nn.Sequential(base, nn.Softmax(dim=1)),
        "quantized input (bpda-marked round, 16 levels)": nn.Sequential(bpda(lambda x: torch.round(x * 15) / 15), base),
        "input noise N(0, 0.05^2)": nn.Sequential(
            bc.Lambda(lambda x: (x + 0.05 * torch.randn_like(x)).clamp(0.0, 1.0)), base
        ),
    }
    attacks = [create_attack("fgsm", eps=0.1, seed=args.seed), create_attack("ifgsm", eps=0.1, seed=args.seed),
               create_attack("pgd", eps=0.1, steps=20, seed=args.seed),
               create_attack("square", eps=0.1, queries=300, seed=args.seed)]
    names = [a.name for a in attacks]
    print(f"digits small-cnn ({fixture.describe()}), Linf eps 0.1, n={args.n}; robust accuracy per attack (own run), "
          f"worst case per point; {bc.environment()}")
    print(f"{'model':48s} {'adaptive':8s} {'clean':>6s} " + " ".join(f"{n:>7s}" for n in names)
          + f" {'worst':>6s} {'sec':>5s}  flags (worst_case row)")
    for label, model in models.items():
        for adaptive in (False, True):
            torch.manual_seed(args.seed)
            ev, seconds, _ = bc.timed(lambda model=model, adaptive=adaptive: evaluate(
                model, attacks, data.test, n=args.n, adaptive=adaptive))
            wc = float(next(iter(ev.worst_case.values())).float().mean())
            accs = " ".join(f"{r.robust_acc:7.3f}" for r in ev.records)
            flags = ";".join(sorted(ev.flags["worst_case@linf_0.1"])) or "-"
            print(f"{label:48s} {str(adaptive):8s} {ev.clean_acc:6.3f} {accs} {wc:6.3f} {seconds:5.0f}  {flags}",
                  flush=True)


if __name__ == "__main__":
    main()
