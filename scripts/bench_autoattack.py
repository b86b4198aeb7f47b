"""Side by side: the original AutoAttack (``pyautoattack``; Croce & Hein, ICML 2020, its standard
version: APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square with 5000 queries) against our
attacks on the same models and test points (CPU), in two comparisons.

``--compare full-preset`` (the default): speed.  The ``full`` preset's Linf 0.1 attacks (the basic
attacks, then APGD-CE/DLR/T-DLR, ACG, FAB-T and Square on the survivors) through
:func:`~robustbench_lite.evaluate` with its checks, probes and, where a check fires, the escalation
ladder, against AutoAttack at Linf 0.1.

    python scripts/bench_autoattack.py --n 500 --threads 1 --models standard,pgd-at,quick,ibp

``--compare sets``: parity.  Our attack sets (``autoattack``, ``standard``, ``full``; as
``benchmark()`` and ``eval --attacks`` run them: on survivors through ``evaluate``, checks and
escalation included) against AutoAttack at each of ``--threats``.

    python scripts/bench_autoattack.py --compare sets --n 500 --threats linf:0.1,l2:1.0,l2:1.5 \\
        --models standard,pgd-at,ibp,crown-ibp --sets autoattack,standard,full

Models: bench_common's small-cnn with standard training (2 epochs on 20k Fashion-MNIST images) and
with PGD-7 adversarial training (Linf eps 0.1, 2 epochs on 10k images); ``quick``: the quick
preset's standard-trained small-cnn (3 epochs on 60k images); ``ibp`` and ``crown-ibp``: the
certified preset's cnn-cert-small recipes.  Each is trained through its recipe into the benchmark
cache on first use (the preset ones take the harness's cache key).

For each model and threat: robust accuracies (clean-misclassified points count as not robust), the
points each side broke that the other did not (listed), the cumulative robust accuracy after each
attack on both sides, our flags, and the seconds of each (wall and process CPU, ``--threads`` torch
threads).  ``--rounds 2`` runs each twice, interleaved (the second round starts with AutoAttack).

Memory layout: our evaluation runs the model channels_last (the harness's device policy does so on
every device); AutoAttack gets its own copy of the model in the layout a user's model has when
loaded, contiguous, unless ``--aa-layout channels_last`` hands it the converted one.
"""

from __future__ import annotations

import copy
import logging
import re

import bench_common as bc
import torch

from robustbench_lite import ThreatModel, create_attack, evaluate, predict
from robustbench_lite.harness.attack_sets import attack_specs
from robustbench_lite.harness.presets import PRESETS

FIXTURES = {
    "standard": bc.standard_model,
    "pgd-at": bc.pgd_at_model,
    "quick": lambda: bc.preset_model("standard", bc.CACHE, preset="quick"),
    "ibp": lambda: bc.preset_model("ibp", bc.CACHE, preset="certified"),
    "crown-ibp": lambda: bc.preset_model("crown-ibp", bc.CACHE, preset="certified"),
}
_AA_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def full_preset_attacks(threat: ThreatModel):
    """The ``full`` preset's attacks at Linf 0.1, as the harness builds them."""
    (specs,) = [a for t, a in PRESETS["full"].grid if t == threat]
    return [create_attack(s.name, norm=threat.norm, eps=threat.eps, **s.params) for s in specs]


def set_attacks(name: str, threat: ThreatModel, num_classes: int):
    return [create_attack(s.name, norm=threat.norm, eps=threat.eps, **s.params)
            for s in attack_specs(name, threat.norm, num_classes)]


def ours(model, split, n, attacks):
    def run():
        ev = evaluate(model, attacks, split, n=n, survivors_only=True)
        return ev.worst_case[attacks[0].threat], ev

    return run


class _AALog(logging.Handler):
    """Keeps AutoAttack's cumulative robust accuracy after each attack, and its warnings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.after: list[tuple[str, float]] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = re.match(r"robust accuracy after (\S+): ([\d.]+)%", msg)
        if m:
            self.after.append((m.group(1).lower(), float(m.group(2)) / 100))
        elif record.levelno >= logging.WARNING:
            self.warnings.append(msg.split(".")[0])


def autoattack(model, x, y, threat: ThreatModel, seed: int):
    from pyautoattack import AutoAttack

    def run():
        log = logging.getLogger("auto-attack")
        handler = _AALog()
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        log.propagate = False
        try:
            aa = AutoAttack(model, norm=_AA_NORM[threat.norm.value], eps=threat.eps, version="standard", device="cpu",
                            seed=seed)
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=500)  # (adversarial images, their predictions)
        finally:
            log.removeHandler(handler)
        return predict(model, x_adv, "cpu", batch_size=500) == y, handler

    return run


def compare(name, fx, threat, impls, args):
    """Run ``impls`` (name -> our attack list) and AutoAttack on one model and threat; print and
    return one row per implementation of ours."""
    split = fx.data.test.head(args.n)
    x, y = split.x, split.y
    layout = torch.channels_last if args.aa_layout == "channels_last" else torch.contiguous_format
    aa_model = copy.deepcopy(fx.model).to(memory_format=layout)
    clean = predict(fx.model, x, "cpu") == y
    runs = {k: ours(fx.model, split, args.n, a) for k, a in impls.items()}
    runs["pyautoattack"] = autoattack(aa_model, x, y, threat, args.seed)
    t = bc.interleaved(runs, args.rounds)
    aa, log = t["pyautoattack"].result
    print(f"  {threat.label}: AutoAttack {float(aa.float().mean()):.3f} "
          f"({', '.join(f'{a} {v:.3f}' for a, v in log.after)}; {t['pyautoattack'].cpu_median:.1f} CPU s)"
          + (f"; warned: {'; '.join(log.warnings)}" if log.warnings else ""), flush=True)
    rows = []
    for k in impls:
        mine, ev = t[k].result
        only_mine, only_aa = clean & ~mine & aa, clean & ~aa & mine
        flags = sorted({f for key, fs in ev.flags.items() if key.startswith("worst_case") for f in fs})
        rows.append({
            "model": name, "threat": threat.label, "ours": k, "clean": float(clean.float().mean()),
            "robust": float(mine.float().mean()), "aa": float(aa.float().mean()), "only_ours": only_mine.nonzero().flatten().tolist(),
            "only_aa": only_aa.nonzero().flatten().tolist(), "wall": t[k].wall_median, "cpu": t[k].cpu_median,
            "aa_wall": t["pyautoattack"].wall_median, "aa_cpu": t["pyautoattack"].cpu_median, "flags": flags,
        })
        steps = ev.escalated.get(threat)
        ladder = "; ladder: " + ", ".join(f"{s.step} broke {s.broke} of {s.attacked} ({s.seconds:.1f} s)"
                                          for s in steps.steps) if steps else ""
        print(f"    ours {k}: {rows[-1]['robust']:.3f} ({rows[-1]['cpu']:.1f} CPU s, {rows[-1]['cpu'] / rows[-1]['aa_cpu']:.3f} "
              f"of AA's); only ours broke {rows[-1]['only_ours']}, only AA broke {rows[-1]['only_aa']}; flags {flags or 'none'}"
              f"; per attack (cumulative): "
              + ", ".join(f"{r.attack.name} {r.robust_acc:.3f} ({r.seconds:.1f} s)" for r in ev.records) + ladder, flush=True)
    return rows


def main() -> None:
    p = bc.parser(__doc__, n=500, rounds=1)
    p.add_argument("--models", default="standard,pgd-at", help=f"comma-separated: {', '.join(FIXTURES)}")
    p.add_argument("--compare", choices=("full-preset", "sets"), default="full-preset")
    p.add_argument("--threats", default="linf:0.1", help="comma-separated threats (full-preset: linf:0.1 only)")
    p.add_argument("--sets", default="autoattack,standard,full", help="comma-separated attack sets (--compare sets)")
    p.add_argument("--aa-layout", choices=("contiguous", "channels_last"), default="contiguous",
                   help="memory layout of AutoAttack's copy of the model (ours always runs channels_last)")
    args = bc.parse(p)
    threats = [ThreatModel.parse(t) for t in args.threats.split(",")]
    print(f"# {bc.environment()}; {args.compare}; first {args.n} Fashion-MNIST test points; AutoAttack's model "
          f"{args.aa_layout}")
    rows = []
    for name in args.models.split(","):
        fx = FIXTURES[name]()
        print(f"{name}: {fx.describe()}", flush=True)
        k = fx.data.num_classes
        for threat in threats:
            if args.compare == "full-preset":
                impls = {"full-preset": full_preset_attacks(threat)}
            else:
                impls = {s: set_attacks(s, threat, k) for s in args.sets.split(",")}
            rows += compare(name, fx, threat, impls, args)
    print()
    print("| model | threat | ours | clean | ours robust | AutoAttack robust | only ours broke | only AA broke "
          "| ours wall / CPU s | AA wall / CPU s | CPU ratio | flags |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['threat']} | {r['ours']} | {r['clean']:.3f} | {r['robust']:.3f} | {r['aa']:.3f} "
              f"| {len(r['only_ours'])} | {len(r['only_aa'])} | {r['wall']:.1f} / {r['cpu']:.1f} "
              f"| {r['aa_wall']:.1f} / {r['aa_cpu']:.1f} | {r['cpu'] / r['aa_cpu']:.3f} | {';'.join(r['flags']) or '-'} |")


if __name__ == "__main__":
    main()
