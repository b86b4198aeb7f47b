"""Complete verification on the ``certified`` preset's certified-trained rows: ``bab`` (β-CROWN
branch and bound; Wang et al., NeurIPS 2021) on the first ``n`` Fashion-MNIST test points at
Linf 0.1, started from a run's saved adversarial examples (``--save-adv``) as the preset's cell
is, with the preset's ``bab`` settings.  Prints per row the verified / falsified / undecided split,
the process CPU seconds, the subdomains bounded and subdomains per CPU second, and the slowest
points; every falsified point's example is re-checked by ``verify`` (none may be rejected).

Run after ``robustbench-lite run --preset certified --defenses ibp,crown-ibp --workdir W
--save-adv W/adv`` (the models come from ``W/models``: the script never trains)::

    OMP_NUM_THREADS=1 python scripts/bench_bab.py --workdir W --adv W/adv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from robustbench_lite import ModelCache, ThreatModel, create_defense, load, train_or_load
from robustbench_lite.certify import create_verifier
from robustbench_lite.harness.advsave import saved_starts
from robustbench_lite.harness.presets import get_preset
from robustbench_lite.training.cache import model_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--adv", type=Path, default=None, help="the run's --save-adv folder (default: no starts)")
    ap.add_argument("--defenses", default="ibp,crown-ibp")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset("certified")
    (bab_spec,) = [a for e in preset.extra for a in e.attacks if a.name == "bab"]
    threat = ThreatModel("linf", 0.1)
    data = load("fashion-mnist")
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    for name in args.defenses.split(","):
        (dspec,) = [d for d in preset.defenses if d.name == name]
        defense = create_defense(dspec.name, **dspec.params)
        (mspec,) = preset.models
        key = model_key(mspec, defense, data)
        if not (args.workdir / "models" / f"{key}.safetensors").exists():
            raise SystemExit(f"{name}: model {key} is not in {args.workdir / 'models'}; run the preset first")
        trained = train_or_load(mspec, defense, data, ModelCache(args.workdir / "models"), progress=False)
        model = trained.model.eval()
        starts = None
        if args.adv is not None:
            cell = SimpleNamespace(data=SimpleNamespace(name="fashion-mnist"), model=SimpleNamespace(name=mspec.name),
                                   defense=SimpleNamespace(name=name), attack=SimpleNamespace(name="bab"), threat=threat)
            starts = saved_starts(args.adv, cell, SimpleNamespace(trained=trained, data=data), x)
        bab = create_verifier("bab", **bab_spec.params)
        cpu, wall = time.process_time(), time.perf_counter()
        v = bab.verify(model, x, y, threat, starts=starts)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        subs = int(v.subdomains.sum())
        given = 0 if starts is None else int((~torch.isnan(starts).flatten(1).any(1)).sum())
        print(f"{name}: n {args.n}, starts {given}, verified {int(v.verified.sum())}, falsified {int(v.falsified.sum())}, "
              f"undecided {int(v.undecided.sum())}, rejected {0 if v.rejected is None else int(v.rejected.sum())}; CPU {cpu:.1f} s (wall {wall:.1f} s), "
              f"subdomains {subs} ({subs / max(cpu, 1e-9):.1f} per CPU s), points searched {int((v.subdomains > 0).sum())}")
        for i in v.seconds.argsort(descending=True)[:5].tolist():
            print(f"  point {i}: {v.status()[i].value}, {int(v.subdomains[i])} subdomains, {float(v.seconds[i]):.1f} s")


if __name__ == "__main__":
    main()
