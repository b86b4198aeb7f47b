"""Side-by-side numbers for attacks beyond Lp evasion: universal perturbations, BadNets and
feature collision, on a Fashion-MNIST small-cnn (standard training, 2 epochs on 20k images).

    python scripts/bench_beyond.py [--only a,c,d] [--threads 1]

(a) UAP (Moosavi-Dezfooli et al., CVPR 2017) and SGA (Liu et al., ICCV 2023) fooling rates (vs
    the clean prediction) on held-out test points, next to random noise of the same norm, at
    Linf 0.1 and L2 1.5.
(c) BadNets (Gu et al., 2017) at poison rates 1% and 5%: clean accuracy and attack success rate
    per defense.
(d) feature collision (Shafahi et al., "Poison frogs!", NeurIPS 2018; fixed feature extractor,
    retrained last layer) over 20 target images.

Section (b), one-pixel against ART's PixelAttack, is ``scripts/bench_attacks.py --one-pixel``
(equal population x generations, forward evaluations counted on both sides).
"""

from __future__ import annotations

import time

import bench_common as bc
import torch

from robustbench_lite import Data, ModelCache, accuracy, create_attack, create_defense, predict
from robustbench_lite.eval.poisoning import evaluate_poisoning
from robustbench_lite.eval.universal import evaluate_universal


def table(rows: list[dict], cols: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)


def section_a(model, data, threats, n_fit, uap_passes, seed):
    print(f"\n(a) universal perturbations: fit on {n_fit} training images, evaluated on 2000 held-out test images; "
          f"UAP {uap_passes} passes (DeepFool 10 steps, overshoot 0.02), SGA 20 epochs (batch 250, minibatch 10, "
          f"step 0.1 eps, beta 9)")
    print("    fooling rate = prediction under clip(x + delta) != clean prediction; noise = random sign (Linf) /"
          " Gaussian direction (L2) of the same norm, mean of 5 draws")
    fit, held = data.train.head(n_fit), data.test.head(2000)
    rows = []
    for norm, eps in threats:
        for name, kw in (("uap", {"passes": uap_passes}), ("sga", {}), ("sga", {"inner": False})):
            attack = create_attack(name, norm=norm, eps=eps, seed=seed, **kw)
            r = evaluate_universal(model, attack, fit, held)
            label = name if kw.get("inner", True) else "sgd-uap (sga inner=False)"
            rows.append({"attack": label, "threat": f"{norm}:{eps}", "fooling_rate": r.fooling_rate,
                         "noise_fooling_rate": r.noise_fooling_rate, "clean_acc": r.clean_acc,
                         "acc_under_delta": r.acc_under_delta, "noise_acc": r.noise_acc, "seconds": r.seconds,
                         "grad_evals": r.grad_evals})
            print(f"    done {label} {norm}:{eps} in {r.seconds:.0f}s", flush=True)
    table(rows, ["attack", "threat", "fooling_rate", "noise_fooling_rate", "clean_acc", "acc_under_delta",
                 "noise_acc", "seconds", "grad_evals"])
    for threat in (f"{norm}:{eps}" for norm, eps in threats):
        fr = {r["attack"]: r["fooling_rate"] for r in rows if r["threat"] == threat}
        print(f"    {threat}: SGA {'beats' if fr['sga'] > fr['uap'] else 'does not beat'} UAP "
              f"({fr['sga']:.3f} vs {fr['uap']:.3f})")


def section_c(model, data, defenses, patch, rates, seed):
    print(f"\n(c) BadNets: {patch}x{patch} checkerboard trigger bottom-right, target class 0, retrained from scratch "
          "(small-cnn, 2 epochs, 20k images); attack success = triggered test points with true class != 0 "
          "classified as 0")
    rows = []
    clean_ref = accuracy(model, data.test, "cpu")
    trigger_attack = create_attack("badnets", rate=0.01, patch=patch, eps=patch**2, seed=seed)
    goal = trigger_attack.success_points(data.test)
    rows.append({"defense": "standard", "poison_rate": 0.0, "clean_acc": clean_ref,
                 "attack_success_rate": float((predict(model, goal.x, "cpu") == goal.y).float().mean()),
                 "clean_acc_drop": 0.0, "train_seconds": float("nan")})
    for dname in defenses:
        defense = create_defense(dname, epochs=2)
        for rate in rates:
            attack = create_attack("badnets", rate=rate, patch=patch, eps=patch**2, seed=seed)
            r = evaluate_poisoning(attack, data, defense, spec=bc.SMALL_CNN, cache=ModelCache(bc.CACHE))
            rows.append({"defense": dname, "poison_rate": rate, "clean_acc": r.clean_acc,
                         "attack_success_rate": r.attack_success_rate, "clean_acc_drop": clean_ref - r.clean_acc,
                         "train_seconds": r.train_seconds})
            print(f"    done {dname} rate {rate}", flush=True)
    table(rows, ["defense", "poison_rate", "clean_acc", "clean_acc_drop", "attack_success_rate", "train_seconds"])


def section_d(model, data, n_targets, n_poisons, beta0, retrain_points, watermark, head_epochs, seed):
    print(f"\n(d) feature collision (Poison Frogs), fixed feature extractor = the small-cnn above, last layer "
          f"re-initialized and retrained (standard, {head_epochs} epochs, lr 1e-2, on frozen features) on the first "
          f"{retrain_points} training images with the poisons; {n_poisons} poison(s) per target, beta0 {beta0}, "
          f"watermark {watermark}, 150 steps; success = target classified as the base class after retraining")
    retrain = Data(data.name, data.train.head(retrain_points), data.test, data.num_classes)
    test = data.test
    correct = (predict(model, test.x[:500], "cpu") == test.y[:500]).nonzero().flatten()[:n_targets]
    gen = torch.Generator().manual_seed(seed)
    wins, rows = 0, []
    for ti in correct.tolist():
        yt = int(test.y[ti])
        base = int((yt + torch.randint(1, 10, (1,), generator=gen)) % 10)
        attack = create_attack("feature-collision", target_index=ti, base_class=base, n_poisons=n_poisons,
                               beta0=beta0, lr=0.1, steps=150, watermark=watermark, seed=seed)
        head = create_defense("standard", epochs=head_epochs, lr=1e-2)
        r = evaluate_poisoning(attack, retrain, head, model=model, retrain="last-layer", feature_space=True)
        wins += int(r.attack_success_rate == 1.0)
        rows.append({"target": ti, "true": yt, "base": base, "success": r.attack_success_rate, "clean_acc": r.clean_acc,
                     "poison_linf": r.poison_linf, "poison_l2": r.poison_l2, "seconds": r.poison_seconds + r.train_seconds})
    table(rows, ["target", "true", "base", "success", "clean_acc", "poison_linf", "poison_l2", "seconds"])
    print(f"    success {wins}/{len(rows)} = {wins / len(rows):.2f}; mean clean acc after retraining "
          f"{sum(r['clean_acc'] for r in rows) / len(rows):.3f}")


def main() -> None:
    parser = bc.parser(__doc__)
    parser.add_argument("--only", default="a,c,d", help="sections to run")
    parser.add_argument("--threats", default="linf:0.1,l2:1.5")
    parser.add_argument("--fit", type=int, default=500)
    parser.add_argument("--uap-passes", type=int, default=2)
    parser.add_argument("--defenses", default="standard,pgd-at")
    parser.add_argument("--patch", type=int, default=3)
    parser.add_argument("--rates", default="0.01,0.05")
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--poisons", type=int, default=1)
    parser.add_argument("--beta0", type=float, default=0.25)
    parser.add_argument("--retrain-points", type=int, default=500)
    parser.add_argument("--watermark", type=float, default=0.0)
    parser.add_argument("--head-epochs", type=int, default=200)
    args = bc.parse(parser)
    only = set(args.only.split(","))
    if not only <= {"a", "c", "d"}:
        parser.error(f"--only takes sections a, c, d (one-pixel vs ART is bench_attacks.py --one-pixel), got {args.only}")
    t0 = time.perf_counter()
    fixture = bc.standard_model()
    model, data = fixture.model, fixture.data
    print(f"model: {fixture.describe()}; {bc.environment()}")
    if "a" in only:
        threats = [(t.split(":")[0], float(t.split(":")[1])) for t in args.threats.split(",")]
        section_a(model, data, threats, args.fit, args.uap_passes, args.seed)
    if "c" in only:
        section_c(model, data, args.defenses.split(","), args.patch, [float(r) for r in args.rates.split(",")],
                  args.seed)
    if "d" in only:
        section_d(model, data, args.targets, args.poisons, args.beta0, args.retrain_points, args.watermark,
                  args.head_epochs, args.seed)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
