#!/usr/bin/env python
"""The design choices of our FMN (``attacks/fmn.py``), one at a time, against adv-lib's FMN (the
authors' code), on the same points and steps: what each choice does to the success rate, the
median distance on the points both break, and robust accuracy at the norm's reference eps.

FMN is written out here with a switch per choice (the rest is the attack's algorithm):

* ``hold``: before a point's first adversarial, ε = max(ε, ‖δ‖ + |L|/‖∇L‖_*) instead of the
  paper's ε = ‖δ‖ + |L|/‖∇L‖_* (which shrinks ε whenever clipping to the box took norm from δ);
* ``sphere`` (L2): δ rescaled onto the sphere of radius ε before the projection (the authors' code)
  instead of the projection alone;
* ``l1_exact`` (L1): the exact projection onto the L1 ball ∩ box instead of the ball, then clipping;
* ``l0_clip_first`` (L0): clip to the box, then keep the ε pixels that changed most, instead of
  keeping them first and clipping after (the paper's order).

The row ``ours`` is the attack's own settings; the script checks that its distances equal
``create_attack("fmn")``'s, so the rows measure the attack as shipped.

    python scripts/bench_fmn_variants.py [--n 500] [--models standard,pgd-at,ibp] [--norms l0,l1,l2]
"""

from __future__ import annotations

import math

import bench_common as bc
import torch
from bench_min_norm import FIXTURES, REFERENCE_EPS, adv_fmn, judged

from robustbench_lite import Norm, create_attack, ops
from robustbench_lite.core import l1

OURS = {"hold": True, "sphere": True, "l1_exact": True, "l0_clip_first": False}
ABLATIONS = {  # per norm: the changes worth measuring there
    Norm.L0: [{"l0_clip_first": True}],
    Norm.L1: [{"l1_exact": False}, {"hold": False}],
    Norm.L2: [{"sphere": False}, {"hold": False}, {"hold": False, "sphere": False}],
    Norm.LINF: [{"hold": False}],
}


def _project(norm: Norm, x, delta, eps, sphere, l1_exact, l0_clip_first):
    geo = norm.geometry
    if norm is Norm.L2 and sphere:
        delta = delta * ops.per_sample(eps / geo.distance(delta).clamp_min(1e-12), delta)
    if norm is Norm.L1 and l1_exact:
        return l1.project_l1_box(x + delta, x, eps) - x
    if norm is Norm.L0 and l0_clip_first:
        return geo.project_ball((x + delta).clamp(0, 1) - x, eps)
    return (x + geo.project_ball(delta, eps)).clamp(0, 1) - x


def fmn(model, x, y, norm: Norm, steps: int, hold=True, sphere=True, l1_exact=True, l0_clip_first=False):
    """FMN with the switches above; returns each point's smallest adversarial distance (inf: none)."""
    geo = norm.geometry
    delta = torch.zeros_like(x)
    eps = geo.scale_budget(torch.zeros(len(x)), 1.0)
    found = torch.zeros(len(x), dtype=torch.bool)
    best = torch.full((len(x),), math.inf)
    widest = geo.distance(torch.maximum(x, 1 - x))
    for k in range(steps):
        cos = (1 + math.cos(math.pi * k / steps)) / 2
        alpha, gamma = 0.01 + 0.99 * cos, 0.001 + 0.049 * cos
        xd = (x + delta).requires_grad_(True)
        logits = model(xd)
        loss = ops.margin(logits, y)
        (g,) = torch.autograd.grad(loss.sum(), xd)
        adv = logits.argmax(1) != y
        size = geo.distance((x + delta) - x)
        best = torch.where(adv & (size < best), size, best)
        found |= adv
        grown = geo.scale_budget(eps, 1 + gamma)
        if not geo.discrete:
            jump = size + loss.detach().abs() / geo.dual_norm(g.flatten(1)).clamp_min(1e-12)
            grown = torch.where(found, grown, torch.maximum(jump, eps) if hold else jump)
        eps = torch.minimum(torch.where(adv, torch.minimum(geo.scale_budget(eps, 1 - gamma), best), grown), widest)
        delta = _project(norm, x, delta - alpha * ops.normalize_l2(g), eps, sphere, l1_exact, l0_clip_first)
    with torch.no_grad():
        adv = model(x + delta).argmax(1) != y
    size = geo.distance((x + delta) - x)
    return torch.where(adv & (size < best), size, best)


def main() -> None:
    p = bc.parser(__doc__, n=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--models", default="standard,pgd-at,ibp")
    p.add_argument("--norms", default="l0,l1,l2,linf")
    args = bc.parse(p)
    print(f"{bc.environment()}; first {args.n} Fashion-MNIST test points, {args.steps} steps")
    print("| model | norm | variant | success (adv-lib) | median both (adv-lib) | robust at eps (adv-lib) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in [m.strip() for m in args.models.split(",") if m.strip()]:
        fx = FIXTURES[label]()
        x, y = fx.correct_test_points(args.n)
        for norm in [Norm.parse(n) for n in args.norms.split(",") if n.strip()]:
            torch.manual_seed(args.seed)
            ref = judged(fx.model, x, y, adv_fmn(fx.model, x, y, norm, args.steps), norm)
            eps = REFERENCE_EPS[norm]
            for change in [{}, *ABLATIONS[norm]]:
                d = fmn(fx.model, x, y, norm, args.steps, **{**OURS, **change})
                if not change:  # the switches at our settings are the attack as shipped
                    shipped = create_attack("fmn", norm=norm, eps=1.0 if norm is Norm.LINF else 1e6, steps=args.steps)
                    own = shipped.run(fx.model, x, y).distances
                    same = torch.isfinite(d) & torch.isfinite(own)
                    agree = float(torch.isclose(d[same], own[same], rtol=1e-3).float().mean()) if same.any() else 1.0
                    if agree < 0.99 or (torch.isfinite(d) != torch.isfinite(own)).float().mean() > 0.01:
                        raise SystemExit(f"the re-implementation drifted from attacks/fmn.py ({label}, {norm.value})")
                both = torch.isfinite(d) & torch.isfinite(ref)
                name = "ours" if not change else "ours, " + ", ".join(f"{k}={v}" for k, v in change.items())
                print(f"| {label} | {norm.value} | {name} | {torch.isfinite(d).float().mean():.3f} "
                      f"({torch.isfinite(ref).float().mean():.3f}) | {d[both].median():.4g} ({ref[both].median():.4g}) | "
                      f"{float((d > eps).sum()) / args.n:.3f} ({float((ref > eps).sum()) / args.n:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
