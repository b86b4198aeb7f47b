"""Side by side: our APGD-CE / APGD-DLR / ACG against torchattacks' APGD, and our CW-L2 against
foolbox's and ART's, on the same Fashion-MNIST models and test points (CPU).

Models (trained once, cached under .rbl/models; see scripts/strong_models.py): small-cnn with
standard training, and small-cnn with a short PGD-7 adversarial training loop (eps 0.1).

    python scripts/bench_strong_attacks.py --n 500 --n-cw 100 | tee /work/notes/issue4_bench.txt

Linf eps 0.1, 100 iterations, one restart.  Robust accuracy counts clean-misclassified points as
not robust.  CW-L2: 5 binary-search steps x 100 steps for every implementation; success rate and
median L2 over the clean-correct points (unbounded distance).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustbench_lite.attacks._apgd import search_points  # noqa: E402
from strong_models import pgd_at_model, standard_model  # noqa: E402

from robustbench_lite import ops  # noqa: E402
from robustbench_lite.core.data import load  # noqa: E402
from robustbench_lite.core.registry import create_attack  # noqa: E402
from robustbench_lite.eval.diversity import compare_diversity  # noqa: E402

EPS, STEPS = 0.1, 100
CW_SEARCH, CW_STEPS = 5, 100


@torch.no_grad()
def predict(model, x, bs=500):
    return torch.cat([model(x[i : i + bs]).argmax(1) for i in range(0, len(x), bs)])


def ours(name, **kw):
    attack = create_attack(name, eps=EPS, **kw)

    def run(model, x, y):
        return attack.run(model, x, y).x_adv

    return run


def torchattacks_apgd(loss):
    import torchattacks

    def run(model, x, y):
        return torchattacks.APGD(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, loss=loss, seed=0)(x, y)

    return run


def _keep(rows, only):
    """Rows whose label contains one of the comma-separated substrings of ``only`` (all if empty)."""
    keys = [k for k in only.split(",") if k]
    return [r for r in rows if not keys or any(k in r[0] for k in keys)]


def linf_table(models, x, y, only=""):
    rows = [
        ("ours apgd-ce", ours("apgd-ce", steps=STEPS)),
        ("torchattacks APGD ce", torchattacks_apgd("ce")),
        ("ours apgd-dlr", ours("apgd-dlr", steps=STEPS)),
        ("torchattacks APGD dlr", torchattacks_apgd("dlr")),
        ("ours acg (default: ce)", ours("acg", steps=STEPS)),
        ("ours acg cw", ours("acg", steps=STEPS, loss="cw")),
        ("ours acg dlr", ours("acg", steps=STEPS, loss="dlr")),
    ]
    rows = _keep(rows, only)
    print(f"\n## Linf eps {EPS}, {STEPS} iterations, 1 restart, n = {len(x)} test points")
    print(f"{'model':<10} {'attack':<24} {'robust_acc':>10} {'seconds':>8}")
    results = {}
    for mname, model in models.items():
        print(f"{mname:<10} {'clean':<24} {float((predict(model, x) == y).float().mean()):>10.3f} {'':>8}")
        for label, fn in rows:
            t0 = time.perf_counter()
            adv = fn(model, x, y)
            sec = time.perf_counter() - t0
            adv = adv.detach()
            assert float((adv - x).abs().max()) <= EPS + 1e-5
            acc = float((predict(model, adv) == y).float().mean())
            results[(mname, label)] = acc
            print(f"{mname:<10} {label:<24} {acc:>10.3f} {sec:>8.1f}", flush=True)
    return results


def cw_ours(**kw):
    attack = create_attack("cw-l2", norm="l2", eps=1e6, search_steps=CW_SEARCH, steps=CW_STEPS, **kw)

    def run(model, x, y):
        out = attack.run(model, x, y)
        return out.x_adv, out.distances

    return run


def cw_foolbox(model, x, y):
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    attack = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=CW_SEARCH, steps=CW_STEPS)
    raw, _, _ = attack(fmodel, x, y, epsilons=None)
    # foolbox returns an all-zero image where it found nothing: count those as failures
    failed = raw.flatten(1).abs().amax(dim=1) == 0
    return torch.where(failed.view(-1, 1, 1, 1), x, raw), None


def cw_art(model, x, y):
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(
        model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
        clip_values=(0.0, 1.0), device_type="cpu",
    )
    attack = CarliniL2Method(clf, binary_search_steps=CW_SEARCH, max_iter=CW_STEPS, batch_size=len(x), verbose=False)
    return torch.from_numpy(attack.generate(x.numpy())).float(), None


CW_EPS = (0.5, 1.0, 1.5, 2.0, 2.5)  # L2 radii for the robust-accuracy curve of each minimum-norm attack


def cw_table(models, x, y, only=""):
    rows = [
        ("ours cw-l2 (default)", cw_ours()),
        ("ours cw-l2 c0=1e-3", cw_ours(c0=1e-3)),
        ("ours cw-l2 lr=0.01", cw_ours(lr=0.01)),
        ("foolbox L2CW (c0=1e-3)", cw_foolbox),
        ("ART CarliniL2 (c0=0.01)", cw_art),
    ]
    rows = _keep(rows, only)
    print(f"\n## CW-L2, {CW_SEARCH} binary-search steps x {CW_STEPS} steps, n = {len(x)} test points "
          "(rates and medians over clean-correct points)")
    print("median_l2: over this row's successes; med_all: over all clean-correct points, a failure counting as")
    print("infinite distance; common: median L2 of the first row / of this row over the points both broke (count);")
    print("shorter: share of points where this row found an adversarial at least 2% shorter than the first row")
    print("(a failure is infinitely long); acc@r: share of clean-correct points with no adversarial within L2 radius r")
    curve = " ".join(f"acc@{r:g}" for r in CW_EPS)
    print(f"{'model':<10} {'attack':<24} {'success':>8} {'median_l2':>9} {'med_all':>8} {'seconds':>8}  {curve}  "
          "shorter  common")
    results = {}
    for mname, model in models.items():
        correct = predict(model, x) == y
        xc, yc = x[correct], y[correct]
        for label, fn in rows:
            t0 = time.perf_counter()
            adv, reported = fn(model, xc, yc)
            sec = time.perf_counter() - t0
            assert float(adv.min()) >= 0 and float(adv.max()) <= 1
            ok = predict(model, adv) != yc
            l2 = (adv - xc).flatten(1).norm(dim=1)
            if reported is not None:  # ours: the reported distances describe the returned points
                assert torch.equal(torch.isfinite(reported), ok), "reported successes differ from returned points"
                assert torch.allclose(reported[ok], l2[ok], atol=1e-5)
            rate = float(ok.float().mean())
            med = float(l2[ok].median()) if ok.any() else float("nan")
            dist = torch.where(ok, l2, torch.full_like(l2, float("inf")))
            # torch.median picks the lower middle value; a median that is a failure prints inf
            med_all = float(dist.median())
            if label == rows[0][0]:
                base_ok, base_l2, base_dist = ok, l2, dist
            both = ok & base_ok
            common = (f"{float(base_l2[both].median()):.4f} / {float(l2[both].median()):.4f} ({int(both.sum())})"
                      if both.any() else "-")
            shorter = float((dist < base_dist / 1.02).float().mean())
            accs = " ".join(f"{float((dist > r).float().mean()):>{len(f'acc@{r:g}')}.3f}" for r in CW_EPS)
            results[(mname, label)] = (rate, med)
            print(f"{mname:<10} {label:<24} {rate:>8.3f} {med:>9.4f} {med_all:>8.4f} {sec:>8.1f}  {accs}  "
                  f"{shorter:>7.3f}  {common}", flush=True)
    return results


def diversity_table(models, x, y, n=50):
    print(f"\n## Diversity Index (last 10 search points, CE loss, {STEPS} iterations, no early stop), n = {n}")
    for mname, model in models.items():
        xs, ys = x[:n], y[:n]
        pts = {
            m: search_points(model, xs, ys, ops.ce, method=m, eps=EPS, steps=STEPS, x_start=xs.clone())
            for m in ("acg", "apgd")
        }
        cmp = compare_diversity(pts["acg"], pts["apgd"], EPS)
        print(f"{mname:<10} DI acg {cmp['di_a']:.4f}  DI apgd {cmp['di_b']:.4f}  "
              f"acg more diverse on {cmp['a_more_diverse']:.2f} of points", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="test points for the Linf table")
    ap.add_argument("--n-cw", type=int, default=100, help="test points for the CW table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of tables to skip: linf,cw,di")
    ap.add_argument("--rows", default="", help="comma list of substrings: keep only the rows whose label has one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    skip = set(filter(None, args.skip.split(",")))
    models = {}
    for name, fn in (("standard", standard_model), ("pgd-at", pgd_at_model)):
        tm = fn()
        models[name] = tm.model.eval()
        print(f"model {name}: key {tm.key}, {tm.sidecar['train_points']} train points, "
              f"test clean_acc {tm.sidecar['clean_acc']:.4f}, train {tm.sidecar['train_seconds']:.0f}s")
    test = load("fashion-mnist", train_limit=1).test
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "linf" not in skip:
        linf_table(models, test.x[: args.n], test.y[: args.n], args.rows)
    if "cw" not in skip:
        cw_table(models, test.x[: args.n_cw], test.y[: args.n_cw], args.rows)
    if "di" not in skip:
        diversity_table(models, test.x, test.y)


if __name__ == "__main__":
    main()
