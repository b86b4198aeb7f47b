#!/usr/bin/env python
"""Minimum-norm attacks side by side with reference implementations, on the same models, points
and iteration budget (CPU), and the L2 minimum-norm ranking the curve kind makes of them.

Models: bench_common's small-cnn fixtures (standard training; PGD-AT at Linf 0.1) and the
certified preset's ``ibp`` cnn-cert-small (trained through the model cache with the preset's
recipe), on the first ``--n`` Fashion-MNIST test points.

* Strength (``--sections strength``): each row of :data:`PAIRS` is one of our attacks and the
  reference it is compared with (FMN, DDN and DeepFool against adv-lib's, at ``--steps`` steps on
  both sides; DDN's reference without its 8-bit rounding, our default too).  Every example
  returned is judged on the model and measured here; a point's distance is ``inf`` where the
  model still classifies the example correctly.  Reported: success rate over the clean-correct
  points, the median distance over the points both break, and robust accuracy at the norm's
  reference eps (:data:`REFERENCE_EPS`, the presets' budgets; clean-misclassified points count
  as not robust), with each side's process CPU seconds (the two run back to back).  The pass
  column applies the acceptance rule: success >= the reference's, median <= 1.01 x the
  reference's, robust accuracy <= the reference's + 0.005.
* HopSkipJump (``--sections hsj``): ours against ART's ``HopSkipJump`` (L2) at each budget of
  ``--hsj-queries`` label queries per point, on the first ``--hsj-n`` clean-correct points.  ART
  has an iteration count, not a query budget: it runs one iteration at a time (its ``resume``),
  its queries are counted inside its per-point attack (its bookkeeping calls outside, such as its
  success report, are not counted), and its point at a budget is the last iterate whose queries
  fit the budget.
* Curves (``--sections curves``): every registered untargeted-or-targeted minimum-norm attack
  with L2 (each at ``--steps`` steps; HopSkipJump at 1000 queries) on the standard and PGD-AT
  models: the per-point best over the attacks that existed before FMN, DDN, DeepFool and
  HopSkipJump (:data:`BEFORE`) against the best over all of them, and each attack's AttackBench
  optimality (:func:`robustbench_lite.eval.curve.optimality`) over an L2 grid to ``--eps-max``;
  each attack runs as the curve kind runs a minimum-norm attack, once at the grid's largest eps
  (a distance above it counts as none found).

Per-point distances are kept in ``.rbl/bench-min-norm`` (by model key, attack, settings, points,
seed and a hash of our attack's code), so an interrupted run resumes and the curves reuse the strength section's runs of the
same attack; ``--fresh`` recomputes.  A new comparison is a row of :data:`PAIRS` (e.g. FAB
against adv-lib's).

    python scripts/bench_min_norm.py [--n 500] [--steps 100] [--models standard,pgd-at,ibp]
        [--sections strength,hsj,curves] [--only fmn:l2,ddn] [--hsj-n 100] [--hsj-queries 1000,5000]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_common as bc
import numpy as np
import torch
from torch import Tensor, nn

from robustbench_lite import Norm, create_attack, list_attacks
from robustbench_lite.core.registry import ATTACKS
from robustbench_lite.eval.curve import best_distances, optimality, robust_at

STORE = Path(".rbl/bench-min-norm")
REFERENCE_EPS = {Norm.L0: 9.0, Norm.L1: 8.0, Norm.L2: 1.5, Norm.LINF: 0.1}
BEFORE = ("cw-l2", "cw-l2-t", "apgd-mn")  # the minimum-norm attacks before FMN, DDN, DeepFool, HSJ
P = {Norm.L0: 0, Norm.L1: 1, Norm.L2: 2, Norm.LINF: math.inf}


def _adv_lib():
    sys.modules.setdefault("visdom", types.ModuleType("visdom"))  # imported by adv-lib for logging only
    import adv_lib.attacks as attacks
    from adv_lib.attacks.deepfool import df

    return attacks, df


def adv_fmn(model, x, y, norm, steps):
    return _adv_lib()[0].fmn(model, x, y, norm=P[norm], steps=steps)


def adv_ddn(model, x, y, norm, steps):
    return _adv_lib()[0].ddn(model, x, y, steps=steps, levels=None)


def adv_deepfool(model, x, y, norm, steps):
    return _adv_lib()[1](model, x, y, steps=steps, norm=P[norm])


@dataclass(frozen=True)
class Pair:
    """One of our attacks (registry name, norm, settings besides norm/eps/steps) and its reference:
    a label and a function ``(model, x, y, norm, steps) -> x_adv``."""

    attack: str
    norm: Norm
    reference: str
    run_reference: Callable[[nn.Module, Tensor, Tensor, Norm, int], Tensor]
    settings: dict = field(default_factory=dict)


PAIRS: list[Pair] = [
    *(Pair("fmn", n, "adv-lib fmn", adv_fmn) for n in (Norm.L0, Norm.L1, Norm.L2, Norm.LINF)),
    Pair("ddn", Norm.L2, "adv-lib ddn", adv_ddn),
    *(Pair("deepfool", n, "adv-lib df", adv_deepfool) for n in (Norm.L2, Norm.LINF)),
]


# -- distances ----------------------------------------------------------------------------------
def judged(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, norm: Norm) -> Tensor:
    """Each example's size where the model misclassifies it; ``inf`` elsewhere."""
    with torch.no_grad():
        fooled = torch.cat([model(part).argmax(1) for part in x_adv.split(500)]) != y
    d = norm.geometry.distance(x_adv - x)
    return torch.where(fooled, d, torch.full_like(d, math.inf))


def unbounded(norm: Norm, x: Tensor) -> float:
    """An eps no example can exceed (so a minimum-norm attack returns every example it finds)."""
    return 1.0 if norm is Norm.LINF else float(x[0].numel())


def cached(key: dict, compute: Callable[[], tuple[Tensor, float]], fresh: bool) -> tuple[Tensor, float]:
    """``compute()`` -> (distances, CPU seconds), kept on disk under ``key``."""
    text = json.dumps(key, sort_keys=True)
    path = STORE / f"{key['model']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"
    if path.is_file() and not fresh:
        hit = torch.load(path, weights_only=True)
        if hit["key"] == text:
            return hit["d"], float(hit["cpu"])
    d, cpu = compute()
    STORE.mkdir(parents=True, exist_ok=True)
    torch.save({"key": text, "d": d, "cpu": cpu}, path)
    return d, cpu


_CODE: dict[type, str] = {}


def code_of(attack) -> str:
    """A hash of the attack's source file, the norm geometry it uses and the minimum-norm
    bookkeeping: stored distances of an earlier version of any are not reused.  Each file is read
    once per process (:func:`main` reads all at the start), so an edit during a run cannot label
    the results of the code in memory with the hash of the edited file."""
    from robustbench_lite.core import threat

    cls = attack if isinstance(attack, type) else type(attack)
    if cls not in _CODE:
        files = [Path(inspect.getsourcefile(cls)), Path(inspect.getsourcefile(threat))]
        files += [f for f in [files[0].with_name("_min_norm.py")] if f.is_file()]
        _CODE[cls] = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    return _CODE[cls]


def ours_distances(fx, x, y, name: str, norm: Norm, settings: dict, args, eps: float | None = None
                   ) -> tuple[Tensor, float]:
    """Our attack's judged distances (run at ``eps``, default: an eps no example exceeds)."""
    attack = create_attack(name, norm=norm, eps=unbounded(norm, x) if eps is None else eps, seed=args.seed, **settings)

    def compute():
        t = time.process_time()
        out = attack.run(fx.model, x, y)
        return judged(fx.model, x, y, out.x_adv, norm), time.process_time() - t

    key = {"model": fx.trained.key, "label": f"ours {name} {norm.value}", "settings": attack.get_params(),
           "points": [args.n, len(x)], "seed": args.seed, "code": code_of(attack)}
    return cached(key, compute, args.fresh)


def reference_distances(fx, x, y, pair: Pair, args) -> tuple[Tensor, float]:
    def compute():
        torch.manual_seed(args.seed)
        t = time.process_time()
        adv = pair.run_reference(fx.model, x, y, pair.norm, args.steps)
        return judged(fx.model, x, y, adv.detach(), pair.norm), time.process_time() - t

    key = {"model": fx.trained.key, "label": f"{pair.reference} {pair.norm.value}", "steps": args.steps,
           "points": [args.n, len(x)], "seed": args.seed}
    return cached(key, compute, args.fresh)


# -- sections -------------------------------------------------------------------------------------
def _median(d: Tensor) -> float:
    return float(d.median()) if d.numel() else float("nan")


def strength(fx, label: str, x, y, args, only: list[str]) -> None:
    print(f"\n== strength, {label}: {fx.describe()}; {len(x)} of {args.n} points clean-correct, {args.steps} steps")
    print("| model | attack | norm | success ours / ref | median both ours / ref (ratio) | eps | robust ours / ref "
          "| CPU s ours / ref | pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for pair in PAIRS:
        tag = f"{pair.attack}:{pair.norm.value}"
        if only and not any(tag.startswith(o) for o in only):
            continue
        mine, cpu_mine = ours_distances(fx, x, y, pair.attack, pair.norm, {"steps": args.steps, **pair.settings}, args)
        ref, cpu_ref = reference_distances(fx, x, y, pair, args)
        found, ref_found = torch.isfinite(mine), torch.isfinite(ref)
        both = found & ref_found
        eps = REFERENCE_EPS[pair.norm]
        robust = [float((d > eps).sum()) / args.n for d in (mine, ref)]
        s, s_ref = float(found.float().mean()), float(ref_found.float().mean())
        m, m_ref = _median(mine[both]), _median(ref[both])
        ok = s >= s_ref and m <= 1.01 * m_ref and robust[0] <= robust[1] + 0.005
        print(f"| {label} | {pair.attack} vs {pair.reference} | {pair.norm.value} | {s:.3f} / {s_ref:.3f} | "
              f"{m:.4g} / {m_ref:.4g} ({m / m_ref:.4f}) | {eps:g} | {robust[0]:.3f} / {robust[1]:.3f} | "
              f"{cpu_mine:.1f} / {cpu_ref:.1f} | {'yes' if ok else 'NO'} |", flush=True)


def _art_hsj(model: nn.Module, x: Tensor, y: Tensor, budgets: list[int], seed: int) -> tuple[dict, float]:
    """ART's HopSkipJump (L2), one iteration at a time per point: distances at each budget."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.ERROR)

    class Counted(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.on, self.images = net, False, 0

        def forward(self, z):
            if self.on:
                self.images += z.shape[0]
            return self.net(z.float())

    class CountedHSJ(HopSkipJump):
        def _perturb(self, **kw):  # the per-point attack: only its queries count
            net.on = True
            try:
                return super()._perturb(**kw)
            finally:
                net.on = False

    net = Counted(model)
    clf = PyTorchClassifier(net, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
                            clip_values=(0.0, 1.0))
    attack = CountedHSJ(clf, norm=2, max_iter=1, verbose=False)
    np.random.seed(seed)
    out = {q: [] for q in budgets}
    t = time.process_time()
    for i in range(len(x)):
        xi = x[i : i + 1].numpy()
        net.images, attack.curr_iter = 0, 0
        adv = attack.generate(xi)
        history = [(net.images, adv.copy())]
        while net.images < max(budgets):
            adv = attack.generate(xi, x_adv_init=adv.copy(), resume=True)
            history.append((net.images, adv.copy()))
        for q in budgets:
            fit = [a for used, a in history if used <= q]
            a = torch.from_numpy(fit[-1]) if fit else x[i : i + 1]
            out[q].append(float(judged(model, x[i : i + 1], y[i : i + 1], a, Norm.L2)[0]))
    return {q: torch.tensor(v) for q, v in out.items()}, time.process_time() - t


def hsj_section(fx, label: str, x, y, args) -> None:
    budgets = [int(q) for q in args.hsj_queries.split(",")]
    x, y = x[: args.hsj_n], y[: args.hsj_n]
    print(f"\n== HopSkipJump L2, {label}: {len(x)} clean-correct points, budgets {budgets} label queries per point")
    key = {"model": fx.trained.key, "label": "art hsj l2", "budgets": budgets, "points": [args.n, len(x)],
           "seed": args.seed}

    def compute():
        d, cpu = _art_hsj(fx.model, x, y, budgets, args.seed)
        return torch.stack([d[q] for q in budgets]), cpu

    table, cpu_art = cached(key, compute, args.fresh)
    art = dict(zip(budgets, table, strict=True))
    print("| model | queries | success ours / ART | median ours / ART | median both ours / ART (ratio) | CPU s ours / ART (all budgets) | pass |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for q in budgets:
        mine, cpu = ours_distances(fx, x, y, "hsj", Norm.L2, {"queries": q}, args)
        ref = art[q]
        both = torch.isfinite(mine) & torch.isfinite(ref)
        m, m_ref = _median(mine[both]), _median(ref[both])
        ok = m <= m_ref and torch.isfinite(mine).float().mean() >= torch.isfinite(ref).float().mean()
        print(f"| {label} | {q} | {torch.isfinite(mine).float().mean():.3f} / {torch.isfinite(ref).float().mean():.3f} | "
              f"{_median(mine[torch.isfinite(mine)]):.4g} / {_median(ref[torch.isfinite(ref)]):.4g} | "
              f"{m:.4g} / {m_ref:.4g} ({m / m_ref:.4f}) | {cpu:.1f} / {cpu_art:.1f} | {'yes' if ok else 'NO'} |", flush=True)


def curve_attacks() -> list[str]:
    """Every registered minimum-norm evasion attack with L2."""
    return [a for a in list_attacks() if getattr(ATTACKS.get(a), "min_norm", False) and Norm.L2 in ATTACKS.get(a).norms]


def curve_settings(name: str, steps: int) -> dict:
    fields = getattr(ATTACKS.get(name), "__dataclass_fields__", {})
    if "queries" in fields:
        return {"queries": 1000}
    return {"steps": steps} if "steps" in fields else {}


def curves(fx, label: str, x, y, args) -> None:
    names = curve_attacks()
    # as the curve kind runs a minimum-norm attack: once, at the grid's largest eps
    dist = {a: ours_distances(fx, x, y, a, Norm.L2, curve_settings(a, args.steps), args, eps=args.eps_max) for a in names}
    dist = {a: (torch.where(d <= args.eps_max, d, torch.full_like(d, math.inf)), cpu) for a, (d, cpu) in dist.items()}
    full = {a: torch.cat([torch.zeros(args.n - len(x)), d]) for a, (d, _) in dist.items()}  # misclassified: 0
    before = best_distances([full[a] for a in names if a in BEFORE])
    after = best_distances(list(full.values()))
    n_ok = len(x)
    print(f"\n== L2 minimum-norm curves, {label}: {n_ok} clean-correct of {args.n}; attacks {names}")
    for tag, best in (("before (" + ", ".join(a for a in names if a in BEFORE) + ")", before), ("all", after)):
        own = best[args.n - n_ok :]
        print(f"per-point best, {tag}: found {float(torch.isfinite(own).float().mean()):.3f}, median "
              f"{_median(own[torch.isfinite(own)]):.4g}, robust at 1.5 {robust_at(best, 1.5):.3f}")
    print(f"points whose best distance fell: {int((after < before).sum())}; rose: {int((after > before).sum())}")
    print("| model | attack | optimality | found | median | robust at 1.5 | CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ranked = sorted(names, key=lambda a: -optimality(full[a], after, args.eps_max))
    for a in ranked:
        own = full[a][args.n - n_ok :]
        print(f"| {label} | {a} | {optimality(full[a], after, args.eps_max):.3f} | {float(torch.isfinite(own).float().mean()):.3f} | "
              f"{_median(own[torch.isfinite(own)]):.4g} | {robust_at(full[a], 1.5):.3f} | {dist[a][1]:.1f} |", flush=True)


FIXTURES = {
    "standard": lambda: bc.standard_model(),
    "pgd-at": lambda: bc.pgd_at_model(),
    "ibp": lambda: bc.preset_model("ibp", bc.CACHE, preset="certified"),
}


def main() -> None:
    p = bc.parser(__doc__, n=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--models", default="standard,pgd-at,ibp")
    p.add_argument("--sections", default="strength,hsj,curves")
    p.add_argument("--only", default="", help="comma-separated ATTACK or ATTACK:NORM rows of the strength table")
    p.add_argument("--hsj-n", type=int, default=100)
    p.add_argument("--hsj-queries", default="1000,5000")
    p.add_argument("--eps-max", type=float, default=4.0, help="L2 eps of the curves (their grid's largest)")
    p.add_argument("--fresh", action="store_true", help="recompute instead of reusing stored distances")
    args = bc.parse(p)
    for name in list_attacks():  # the code of every attack as it was imported (see code_of)
        code_of(ATTACKS.get(name))
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    print(f"{bc.environment()}; {time.strftime('%Y-%m-%d')}; first {args.n} Fashion-MNIST test points")
    for label in [m.strip() for m in args.models.split(",") if m.strip()]:
        fx = FIXTURES[label]()
        xc, yc = fx.correct_test_points(args.n)
        if "strength" in sections:
            strength(fx, label, xc, yc, args, only)
        if "hsj" in sections and label != "ibp":
            hsj_section(fx, label, xc, yc, args)
        if "curves" in sections and label != "ibp":
            curves(fx, label, xc, yc, args)


if __name__ == "__main__":
    main()
