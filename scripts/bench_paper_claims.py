"""Orderings the papers claim, measured on the `full` preset's recipes: clean accuracy, worst-case
robust accuracy and the worst class's robust accuracy per defense, read from a harness store.

The rows are the `full` preset's evasion cells (Fashion-MNIST, Linf 0.1, the preset's attacks on
survivors, 500 test points): run them first (``--run``: the preset's grid attacks on the named
defenses, models from the workdir's cache, trained there if missing), or point ``--workdir`` at the
folder of a finished ``robustbench-lite run --preset full``.  Claims checked (one seed, 500 points):

* DONE (Sow, Lin, Wang & Liang, ICLR 2024) is above PGD-AT in worst case and in worst-class robust
  accuracy (its weights move the loss toward the hard, mostly worst-class, examples);
* adversarial comp-sum (Mao, Mohri & Zhong, ICML 2023) is above TRADES in clean accuracy and in
  worst case.

    python scripts/bench_paper_claims.py --workdir /path/to/full --run --defenses pgd-at,trades,done,adv-comp-sum
    python scripts/bench_paper_claims.py --workdir /path/to/full          # table of what is stored
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench_common import environment, parse, parser

from robustbench_lite.harness.presets import get_preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.store import Store

CLAIMS = (("done", "pgd-at", ("worst_case", "worst_class")), ("adv-comp-sum", "trades", ("clean_acc", "worst_case")))
DEFENSES = "pgd-at,trades,mart,done,adv-comp-sum,wrm"


def stored(workdir: Path, preset: str = "full") -> dict[str, dict]:
    """Per defense, the worst-case row of the preset's grid threat on its ``n`` points."""
    p = get_preset(preset)
    threat = next(t for t, _ in p.grid if t.norm.value == "linf")  # the Linf 0.1 threat of the claims
    out: dict[str, dict] = {}
    with Store(workdir / "store.sqlite", create=False) as store:
        for r in store.rows():
            if (r.kind, r.attack, r.status, r.n) != ("evasion", "worst_case", "ok", p.n):
                continue
            if (r.norm, r.eps) != (threat.norm.value, threat.eps):
                continue
            m = json.loads(r.metrics) if r.metrics else {}
            out[r.defense] = {"model": r.model, "clean_acc": r.clean_acc, "worst_case": r.robust_acc,
                              "worst_class": m.get("worst_class"), "worst_class_label": m.get("worst_class_label"),
                              "model_key": r.model_key}
    return out


def table(rows: dict[str, dict]) -> str:
    lines = [f"{'defense':<14}{'clean':>7}{'worst':>7}{'worst class':>14}   model key"]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["worst_case"]):
        wc = "" if r["worst_class"] is None else f"{r['worst_class']:.3f} ({r['worst_class_label']})"
        lines.append(f"{name:<14}{r['clean_acc']:>7.3f}{r['worst_case']:>7.3f}{wc:>14}   {r['model_key']}")
    for ours, ref, metrics in CLAIMS:
        if ours in rows and ref in rows:
            for m in metrics:
                a, b = rows[ours][m], rows[ref][m]
                if a is None or b is None:
                    continue
                verdict = "reproduced" if a > b else "not reproduced"
                lines.append(f"claim {ours} > {ref} on {m}: {a:.3f} vs {b:.3f} -> {verdict}")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--workdir", type=Path, required=True, help="the store and model cache of a full run")
    p.add_argument("--defenses", default=DEFENSES, help="comma-separated defenses of the full preset")
    p.add_argument("--run", action="store_true", help="run the preset's grid cells of these defenses first")
    args = parse(p)
    names = [d for d in args.defenses.split(",") if d]
    if args.run:
        preset = get_preset("full")
        attacks = [a.name for t, specs in preset.grid if t.norm.value == "linf" for a in specs]
        t0, c0 = time.perf_counter(), time.process_time()
        result = run_plan(preset.plan(defenses=names, attacks=attacks), workdir=args.workdir, progress=False)
        print(f"ran {result.computed} cells ({result.errors} errors) in {time.perf_counter() - t0:.0f} s wall, "
              f"{time.process_time() - c0:.0f} s CPU; {environment()}")
    rows = {k: v for k, v in stored(args.workdir).items() if k in names}
    print(f"full preset, {time.strftime('%Y-%m-%d')}, store {args.workdir / 'store.sqlite'}")
    print(table(rows))


if __name__ == "__main__":
    main()
