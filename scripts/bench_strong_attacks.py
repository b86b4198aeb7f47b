"""Side by side: our APGD-CE / APGD-DLR (Croce & Hein, ICML 2020) and ACG (Yamamura et al., ICML
2022) against torchattacks' APGD, and our CW-L2 (Carlini & Wagner, IEEE S&P 2017) against
foolbox's and ART's, on the same Fashion-MNIST models and test points (CPU).

Models (bench_common's fixtures): small-cnn with standard training (2 epochs on 20k images), and
small-cnn with PGD-7 adversarial training (Linf eps 0.1, 2 epochs on 10k images).

    python scripts/bench_strong_attacks.py --n 500 --n-cw 100

Linf eps 0.1, 100 iterations, one restart.  Robust accuracy counts clean-misclassified points as
not robust.  CW-L2: 5 binary-search steps x 100 steps for every implementation; success rate and
median L2 over the clean-correct points (unbounded distance).  Then the Diversity Index of ACG's
and APGD's last search points (Yamamura et al., section 4.2).
"""

from __future__ import annotations

import bench_common as bc
import torch
from robustbench_lite.attacks._apgd import search_points

from robustbench_lite import create_attack, ops
from robustbench_lite import predict as _predict
from robustbench_lite.eval.diversity import compare_diversity

EPS, STEPS = 0.1, 100
CW_SEARCH, CW_STEPS = 5, 100


def predict(model, x):
    return _predict(model, x, "cpu", batch_size=500)


def ours(name, seed, **kw):
    attack = create_attack(name, eps=EPS, seed=seed, **kw)

    def run(model, x, y):
        return attack.run(model, x, y).x_adv

    return run


def torchattacks_apgd(loss, seed):
    import torchattacks

    def run(model, x, y):
        return torchattacks.APGD(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, loss=loss, seed=seed)(x, y)

    return run


def _keep(rows, only):
    """Rows whose label contains one of the comma-separated substrings of ``only`` (all if empty)."""
    keys = [k for k in only.split(",") if k]
    return [r for r in rows if not keys or any(k in r[0] for k in keys)]


def linf_table(models, x, y, only="", seed=0):
    rows = [
        ("ours apgd-ce", ours("apgd-ce", seed, steps=STEPS)),
        ("torchattacks APGD ce", torchattacks_apgd("ce", seed)),
        ("ours apgd-dlr", ours("apgd-dlr", seed, steps=STEPS)),
        ("torchattacks APGD dlr", torchattacks_apgd("dlr", seed)),
        ("ours acg (default: ce)", ours("acg", seed, steps=STEPS)),
        ("ours acg cw", ours("acg", seed, steps=STEPS, loss="cw")),
        ("ours acg dlr", ours("acg", seed, steps=STEPS, loss="dlr")),
    ]
    rows = _keep(rows, only)
    print(f"\n## Linf eps {EPS}, {STEPS} iterations, 1 restart, n = {len(x)} test points")
    print(f"{'model':<10} {'attack':<24} {'robust_acc':>10} {'seconds':>8} {'cpu_s':>8}")
    results = {}
    for mname, model in models.items():
        print(f"{mname:<10} {'clean':<24} {float((predict(model, x) == y).float().mean()):>10.3f}")
        for label, fn in rows:
            adv, sec, cpu = bc.timed(lambda fn=fn, model=model: fn(model, x, y))
            adv = adv.detach()
            assert float((adv - x).abs().max()) <= EPS + 1e-5
            acc = float((predict(model, adv) == y).float().mean())
            results[(mname, label)] = acc
            print(f"{mname:<10} {label:<24} {acc:>10.3f} {sec:>8.1f} {cpu:>8.1f}", flush=True)
    return results


def cw_ours(seed, **kw):
    attack = create_attack("cw-l2", norm="l2", eps=1e6, search_steps=CW_SEARCH, steps=CW_STEPS, seed=seed, **kw)

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


def cw_table(models, x, y, only="", seed=0):
    rows = [
        ("ours cw-l2 (default)", cw_ours(seed)),
        ("ours cw-l2 c0=1e-3", cw_ours(seed, c0=1e-3)),
        ("ours cw-l2 lr=0.01", cw_ours(seed, lr=0.01)),
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
    print(f"{'model':<10} {'attack':<24} {'success':>8} {'median_l2':>9} {'med_all':>8} {'seconds':>8} {'cpu_s':>8}  {curve}  "
          "shorter  common")
    results = {}
    for mname, model in models.items():
        correct = predict(model, x) == y
        xc, yc = x[correct], y[correct]
        for label, fn in rows:
            (adv, reported), sec, cpu = bc.timed(lambda fn=fn, model=model, xc=xc, yc=yc: fn(model, xc, yc))
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
            print(f"{mname:<10} {label:<24} {rate:>8.3f} {med:>9.4f} {med_all:>8.4f} {sec:>8.1f} {cpu:>8.1f}  {accs}  "
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
    ap = bc.parser(__doc__, n=500)
    ap.add_argument("--n-cw", type=int, default=100, help="test points for the CW table")
    ap.add_argument("--skip", default="", help="comma list of tables to skip: linf,cw,di")
    ap.add_argument("--rows", default="", help="comma list of substrings: keep only the rows whose label has one")
    args = bc.parse(ap)
    skip = set(filter(None, args.skip.split(",")))
    models = {}
    for name, fixture in (("standard", bc.standard_model()), ("pgd-at", bc.pgd_at_model())):
        models[name] = fixture.model
        print(f"model {name}: {fixture.describe()}")
    test = fixture.data.test
    print(bc.environment())
    if "linf" not in skip:
        linf_table(models, test.x[: args.n], test.y[: args.n], args.rows, args.seed)
    if "cw" not in skip:
        cw_table(models, test.x[: args.n_cw], test.y[: args.n_cw], args.rows, args.seed)
    if "di" not in skip:
        diversity_table(models, test.x, test.y)


if __name__ == "__main__":
    main()
