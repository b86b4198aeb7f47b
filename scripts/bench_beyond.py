"""Side-by-side numbers for issue 6: universal perturbations, one-pixel vs ART, BadNets, feature
collision, on a Fashion-MNIST small-cnn (standard training, 2 epochs on 20k images).

    python scripts/bench_beyond.py [--only a,b,c,d] [--threads 1]

(a) UAP and SGA fooling rates (vs the clean prediction) on held-out test points, next to random
    noise of the same norm, at Linf 0.1 and L2 1.5.
(b) one-pixel (k = 1) against ART's PixelAttack on the same correctly classified test images,
    equal population x generations; success rate and wall time.
(c) BadNets at poison rates 1% and 5%: clean accuracy and attack success rate per defense.
(d) feature collision (fixed feature extractor, retrained last layer) over 20 target images.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from robustbench_lite.core.data import Data, load
from robustbench_lite.core.models import ModelSpec, accuracy, predict
from robustbench_lite.core.registry import create_attack, create_defense
from robustbench_lite.eval.other import evaluate_poisoning, evaluate_universal
from robustbench_lite.training.cache import ModelCache, train_or_load

SPEC = ModelSpec("small-cnn")
CACHE = ModelCache(".rbl/models")


def table(rows: list[dict], cols: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)


def section_a(model, data, threats, n_fit, uap_passes):
    print(f"\n(a) universal perturbations: fit on {n_fit} training images, evaluated on 2000 held-out test images; "
          f"UAP {uap_passes} passes (DeepFool 10 steps, overshoot 0.02), SGA 20 epochs (batch 250, minibatch 10, "
          f"step 0.1 eps, beta 9)")
    print("    fooling rate = prediction under clip(x + delta) != clean prediction; noise = random sign (Linf) /"
          " Gaussian direction (L2) of the same norm, mean of 5 draws")
    fit, held = data.train.head(n_fit), data.test.head(2000)
    rows = []
    for norm, eps in threats:
        for name, kw in (("uap", {"passes": uap_passes}), ("sga", {}), ("sga", {"inner": False})):
            attack = create_attack(name, norm=norm, eps=eps, **kw)
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


def section_b(model, data, generations, n_images):
    from art.attacks.evasion import PixelAttack
    from art.estimators.classification import PyTorchClassifier

    test = data.test.head(2000)
    correct = (predict(model, test.x, "cpu") == test.y).nonzero().flatten()[:n_images]
    x, y = test.x[correct], test.y[correct]
    print(f"\n(b) one-pixel (k=1, untargeted) on the first {len(y)} correctly classified test images; "
          f"population 400 (ART: 399 = 133 x 3), {generations} generations after the initial population")
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0))
    art = PixelAttack(clf, th=1, es=1, max_iter=generations, targeted=False, verbose=False)
    t0, c0 = time.perf_counter(), time.process_time()
    adv_art = torch.from_numpy(art.generate(x.numpy(), y.numpy()).astype(np.float32))
    art_s, art_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours = create_attack("one-pixel", eps=1, population=400, generations=generations)
    t0, c0 = time.perf_counter(), time.process_time()
    out = ours.run(model, x, y)
    our_s, our_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = []
    for name, adv, secs, cpu, fwd in (("art PixelAttack", adv_art, art_s, art_cpu, None),
                                      ("ours one-pixel", out.x_adv, our_s, our_cpu, out.forward_evals)):
        with torch.no_grad():
            success = float((model(adv).argmax(1) != y).float().mean())
        l0 = (adv - x).abs().amax(1).flatten(1).gt(1e-6).sum(1)
        rows.append({"attack": name, "images": len(y), "success_rate": success, "max_l0": int(l0.max()),
                     "seconds": secs, "cpu_seconds": cpu, "cpu_s_per_image": cpu / len(y), "forward_evals": fwd})
    table(rows, ["attack", "images", "success_rate", "max_l0", "seconds", "cpu_seconds", "cpu_s_per_image",
                 "forward_evals"])
    print(f"    speed-up: wall {art_s / our_s:.1f}x, CPU time {art_cpu / our_cpu:.1f}x (one torch thread; the machine"
          f" is shared, so CPU time is the steadier measure); success difference (ours - ART) "
          f"{rows[1]['success_rate'] - rows[0]['success_rate']:+.3f}")


def section_c(model, data, defenses, patch, rates):
    print(f"\n(c) BadNets: {patch}x{patch} checkerboard trigger bottom-right, target class 0, retrained from scratch "
          "(small-cnn, 2 epochs, 20k images); attack success = triggered test points with true class != 0 "
          "classified as 0")
    rows = []
    clean_ref = accuracy(model, data.test, "cpu")
    trigger_attack = create_attack("badnets", rate=0.01, patch=patch, eps=patch**2)
    goal = trigger_attack.success_points(data.test)
    rows.append({"defense": "standard", "poison_rate": 0.0, "clean_acc": clean_ref,
                 "attack_success_rate": float((predict(model, goal.x, "cpu") == goal.y).float().mean()),
                 "clean_acc_drop": 0.0, "train_seconds": float("nan")})
    for dname in defenses:
        try:
            defense = create_defense(dname, epochs=2)
        except KeyError as exc:
            print(f"    defense {dname!r} is not on this branch ({str(exc)[:80]}...): left out")
            continue
        for rate in rates:
            attack = create_attack("badnets", rate=rate, patch=patch, eps=patch**2)
            r = evaluate_poisoning(attack, data, defense, spec=SPEC, cache=CACHE)
            rows.append({"defense": dname, "poison_rate": rate, "clean_acc": r.clean_acc,
                         "attack_success_rate": r.attack_success_rate, "clean_acc_drop": clean_ref - r.clean_acc,
                         "train_seconds": r.train_seconds})
            print(f"    done {dname} rate {rate}", flush=True)
    table(rows, ["defense", "poison_rate", "clean_acc", "clean_acc_drop", "attack_success_rate", "train_seconds"])


def section_d(model, data, n_targets, n_poisons, beta0, retrain_points, watermark, head_epochs):
    print(f"\n(d) feature collision (Poison Frogs), fixed feature extractor = the small-cnn above, last layer "
          f"re-initialized and retrained (standard, {head_epochs} epochs, lr 1e-2, on frozen features) on the first "
          f"{retrain_points} training images with the poisons; {n_poisons} poison(s) per target, beta0 {beta0}, "
          f"watermark {watermark}, 150 steps; success = target classified as the base class after retraining")
    retrain = Data(data.name, data.train.head(retrain_points), data.test, data.num_classes)
    test = data.test
    correct = (predict(model, test.x[:500], "cpu") == test.y[:500]).nonzero().flatten()[:n_targets]
    gen = torch.Generator().manual_seed(0)
    wins, rows = 0, []
    for ti in correct.tolist():
        yt = int(test.y[ti])
        base = int((yt + torch.randint(1, 10, (1,), generator=gen)) % 10)
        attack = create_attack("feature-collision", target_index=ti, base_class=base, n_poisons=n_poisons,
                               beta0=beta0, lr=0.1, steps=150, watermark=watermark)
        head = create_defense("standard", epochs=head_epochs, lr=1e-2)
        r = evaluate_poisoning(attack, retrain, head, model=model, retrain="last-layer", feature_space=True)
        wins += int(r.attack_success_rate == 1.0)
        rows.append({"target": ti, "true": yt, "base": base, "success": r.attack_success_rate, "clean_acc": r.clean_acc,
                     "poison_linf": r.poison_linf, "poison_l2": r.poison_l2, "seconds": r.poison_seconds + r.train_seconds})
    table(rows, ["target", "true", "base", "success", "clean_acc", "poison_linf", "poison_l2", "seconds"])
    print(f"    success {wins}/{len(rows)} = {wins / len(rows):.2f}; mean clean acc after retraining "
          f"{sum(r['clean_acc'] for r in rows) / len(rows):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="a,b,c,d")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--threats", default="linf:0.1,l2:1.5")
    parser.add_argument("--fit", type=int, default=500)
    parser.add_argument("--uap-passes", type=int, default=2)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--defenses", default="standard,pgd-at")
    parser.add_argument("--patch", type=int, default=3)
    parser.add_argument("--rates", default="0.01,0.05")
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--poisons", type=int, default=1)
    parser.add_argument("--beta0", type=float, default=0.25)
    parser.add_argument("--retrain-points", type=int, default=500)
    parser.add_argument("--watermark", type=float, default=0.0)
    parser.add_argument("--head-epochs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load("fashion-mnist", train_limit=20000)
    t0 = time.perf_counter()
    trained = train_or_load(SPEC, create_defense("standard", epochs=2), data, CACHE, progress=False)
    model = trained.model
    print(f"model: small-cnn, standard, 2 epochs on {len(data.train)} Fashion-MNIST images, test acc "
          f"{trained.sidecar['clean_acc']:.4f} ({'cached' if trained.from_cache else 'trained'}, key {trained.key}); "
          f"torch threads {args.threads}")
    only = set(args.only.split(","))
    if "a" in only:
        threats = [(t.split(":")[0], float(t.split(":")[1])) for t in args.threats.split(",")]
        section_a(model, data, threats, args.fit, args.uap_passes)
    if "b" in only:
        section_b(model, data, args.generations, args.images)
    if "c" in only:
        section_c(model, data, args.defenses.split(","), args.patch, [float(r) for r in args.rates.split(",")])
    if "d" in only:
        section_d(model, data, args.targets, args.poisons, args.beta0, args.retrain_points, args.watermark,
                  args.head_epochs)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
