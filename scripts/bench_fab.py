"""Side by side: our FAB (``fab``, ``fab-t``; Croce & Hein, "Minimally distorted adversarial examples
with a fast adaptive boundary attack", ICML 2020) against the original (pyautoattack's
``FABAttack_PT``) and adv-lib's ``fab``, as minimum-norm attacks, on the same models and points (CPU).

Every implementation gets the same budget: 100 iterations, one run from the clean point (no random
restart), α_max 0.1, η 1.05, β 0.9; FAB-T: the 9 classes with the highest clean logits other than
the label, each run on every point, the closest adversarial over the targets kept (pyautoattack:
``attack_single_run`` per target class; adv-lib: ``targeted_restarts``).  Per implementation and
norm: success rate (an adversarial found, of the clean-correct points), the median distance on the
points every implementation broke, the robust accuracy at the reference eps (a point is robust
when clean-correct and no adversarial within eps; of all points), and process CPU seconds.

Models: bench_common's standard and PGD-AT small-cnns, and the certified preset's ``ibp``
cnn-cert-small (trained through the preset's recipe into the benchmark cache on first use).

    python scripts/bench_fab.py --n 500 --models standard,pgd-at,ibp --norms linf,l2,l1

:func:`compare_fab` is the comparison for one model; another script can import it
(``from bench_fab import compare_fab``).
"""

from __future__ import annotations

import logging
import sys
import types

import bench_common as bc
import torch

from robustbench_lite import Norm, create_attack, predict

#: the reference eps per norm (robust accuracy at it)
EPS = {Norm.LINF: 0.1, Norm.L2: 1.5, Norm.L1: 8.0}
_AA_NORM = {Norm.LINF: "Linf", Norm.L2: "L2", Norm.L1: "L1"}
_ADV_LIB_NORM = {Norm.LINF: float("inf"), Norm.L2: 2.0, Norm.L1: 1.0}
STEPS, TARGETS = 100, 9


def _distance(norm: Norm, x_adv, x, model, y):
    """Per point: the distance of ``x_adv`` when it is adversarial, else inf."""
    fooled = predict(model, x_adv, "cpu", batch_size=500) != y
    d = norm.geometry.distance(x_adv - x)
    return torch.where(fooled, d, torch.full_like(d, float("inf")))


def ours(name: str, norm: Norm, seed: int):
    def run(model, x, y):
        kw = {"n_targets": TARGETS} if name == "fab-t" else {}
        out = create_attack(name, norm=norm, eps=EPS[norm], steps=STEPS, seed=seed, **kw).run(model, x, y)
        return out.distances

    return run


def autoattack(targeted: bool, norm: Norm, seed: int):
    from pyautoattack.fab_pt import FABAttack_PT

    def run(model, x, y):
        fab = FABAttack_PT(model, norm=_AA_NORM[norm], n_restarts=1, n_iter=STEPS, eps=EPS[norm], seed=seed, device="cpu")
        if not targeted:
            return _distance(norm, fab.attack_single_run(x, y), x, model, y)
        best = torch.full((x.shape[0],), float("inf"))
        for rank in range(2, TARGETS + 2):  # the rank-th largest clean logit, as its perturb() does
            fab.target_class = rank
            best = torch.minimum(best, _distance(norm, fab.attack_single_run(x, y, is_targeted=True), x, model, y))
        return best

    return run


def adv_lib(targeted: bool, norm: Norm):
    sys.modules.setdefault("visdom", types.ModuleType("visdom"))  # adv-lib imports it for logging only
    from adv_lib.attacks import fab

    def run(model, x, y):
        kw = {"targeted_restarts": True, "restarts": TARGETS} if targeted else {}
        adv = fab(model, x, y, norm=_ADV_LIB_NORM[norm], n_iter=STEPS, **kw)
        return _distance(norm, adv, x, model, y)

    return run


def compare_fab(model, x, y, norms=tuple(EPS), *, targeted=(False, True), seed=0, rounds=1, libs=("autoattack", "adv-lib")):
    """Our FAB and FAB-T against the references on ``(x, y)``: one row per (attack, norm,
    implementation) with success rate, median distance on the points all of that attack and norm
    broke, robust accuracy at the reference eps, CPU seconds, and the acceptance checks (ours:
    success >= the reference's, median <= the reference's x 1.01, robust <= the reference's + 0.005)."""
    clean = predict(model, x, "cpu", batch_size=500) == y
    rows = []
    for tgt in targeted:
        name = "fab-t" if tgt else "fab"
        for norm in norms:
            impls = {"ours": ours(name, norm, seed)}
            if "autoattack" in libs:
                impls["autoattack"] = autoattack(tgt, norm, seed)
            if "adv-lib" in libs:
                impls["adv-lib"] = adv_lib(tgt, norm)
            t = bc.interleaved({k: (lambda f=f: f(model, x, y)) for k, f in impls.items()}, rounds)
            dist = {k: torch.where(clean, v.result.cpu().float(), torch.zeros_like(v.result.cpu().float()))
                    for k, v in t.items()}
            both = clean & torch.stack([torch.isfinite(d) for d in dist.values()]).all(0)
            for k, d in dist.items():
                success = float(torch.isfinite(d[clean]).float().mean())
                median = float(d[both].median()) if both.any() else float("nan")
                robust = float((clean & (d > EPS[norm])).float().mean())
                rows.append({"attack": name, "norm": norm.value, "impl": k, "success": success, "median": median,
                             "robust": robust, "cpu": t[k].cpu_median, "both": int(both.sum())})
            mine = rows[-len(dist)]
            for r in rows[-len(dist) + 1 :]:
                r["ok"] = (mine["success"] >= r["success"] and mine["median"] <= r["median"] * 1.01
                           and mine["robust"] <= r["robust"] + 0.005)
            print("  " + "; ".join(f"{r['impl']} {r['attack']} {r['norm']}: success {r['success']:.3f}, median "
                                   f"{r['median']:.4f}, robust {r['robust']:.3f}, {r['cpu']:.1f} CPU s"
                                   for r in rows[-len(dist):]), flush=True)
    return rows


def table(model_name: str, rows) -> None:
    print(f"\n{model_name}\n")
    print("| attack | norm | implementation | success | median distance (points all broke) | robust at eps "
          "| CPU s | ours: success >=, median <= x1.01, robust <= +0.005 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "" if r["impl"] == "ours" else ("yes" if r["ok"] else "**no**")
        print(f"| {r['attack']} | {r['norm']} {EPS[Norm(r['norm'])]:g} | {r['impl']} | {r['success']:.3f} "
              f"| {r['median']:.4f} ({r['both']}) | {r['robust']:.3f} | {r['cpu']:.1f} | {ok} |")


FIXTURES = {
    "standard": bc.standard_model,
    "pgd-at": bc.pgd_at_model,
    "ibp": lambda: bc.preset_model("ibp", bc.CACHE, preset="certified"),
}


def main() -> None:
    p = bc.parser(__doc__, n=500, rounds=1)
    p.add_argument("--models", default="standard,pgd-at,ibp", help=f"comma-separated: {', '.join(FIXTURES)}")
    p.add_argument("--norms", default="linf,l2,l1", help="comma-separated: linf, l2, l1")
    p.add_argument("--attacks", default="fab,fab-t", help="fab, fab-t or both")
    p.add_argument("--libs", default="autoattack,adv-lib", help="references: autoattack, adv-lib")
    args = bc.parse(p)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    norms = tuple(Norm.parse(n) for n in args.norms.split(","))
    targeted = tuple(a == "fab-t" for a in args.attacks.split(","))
    print(f"# {bc.environment()}; first {args.n} Fashion-MNIST test points; {STEPS} iterations, 1 run, FAB-T over "
          f"{TARGETS} targets; reference eps {', '.join(f'{n.value} {e:g}' for n, e in EPS.items())}")
    for name in args.models.split(","):
        fx = FIXTURES[name]()
        print(f"{name}: {fx.describe()}", flush=True)
        split = fx.data.test.head(args.n)
        rows = compare_fab(fx.model, split.x, split.y, norms, targeted=targeted, seed=args.seed, rounds=args.rounds,
                           libs=tuple(args.libs.split(",")))
        table(name, rows)


if __name__ == "__main__":
    main()
