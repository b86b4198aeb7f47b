"""The report's robustness curves: a table per (dataset, model / defense, norm) with each attack's
robust accuracy at every eps of its grid, its AttackBench optimality and normalised area, and
one plot of the curves (the worst case drawn thick).

Where the row has certified cells with per-point certified radii (the certified kind), the table
gets a ``certified (<verifiers>)`` row: the share of the points whose largest certified radius over
the verifiers is at least eps, a lower bound on the attacked curve above it; the band between the
two is what is still unknown about the model.  A row with certified radii and no attacked curve
gets a table of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd
import torch

from ..harness.identity import distinguish
from ..harness.kinds import rows_of_kind
from ..harness.kinds.certified import label
from ..harness.rows import WORST_CASE, CellResult
from .plots import Plot, plot_text, to_png


def curve_tables(rows: Sequence[CellResult]) -> list[tuple[str, pd.DataFrame]]:
    """``(title, table)`` per (dataset, model, defense, norm, grid): one row per attack (worst case
    last), columns ``optimality``, ``area`` and the robust accuracy at each eps (``eps 0`` = clean).
    Models sharing display names are told apart by their labels (they are grouped by them)."""
    rows = distinguish(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows_of_kind(rows, "curve"):
        if r.status != "ok" or not r.metrics:
            continue
        m = json.loads(r.metrics)
        grid, curve = m.get("grid"), m.get("curve")
        if not grid or not curve:
            continue
        row = {"attack": r.attack, "optimality": m.get("optimality"), "area": m.get("area")}
        row.update({f"eps {e:g}": a for e, a in zip([0.0, *grid], [r.clean_acc, *curve], strict=True)})
        groups.setdefault((r.dataset, r.model, r.defense, r.norm, r.n, tuple(grid)), []).append(row)
    radii = certified_radii(rows)
    for key, (names, clean, r) in radii.items():
        grids = [g for g in groups if g[:5] == key] or [(*key, ())]
        for g in grids:
            grid = list(g[5]) or _own_grid(rows, key)
            row = {"attack": f"{CERTIFIED} ({names})", "optimality": None, "area": None}
            row["eps 0"] = clean  # certified at eps 0 = classified correctly
            row.update({f"eps {e:g}": float((r >= e - 1e-9).float().mean()) for e in grid if e > 0})
            groups.setdefault(g, []).append(row)
    out = []
    for (dataset, model, defense, norm, n, _), table_rows in sorted(groups.items()):
        t = pd.DataFrame(table_rows)
        t["_wc"] = t["attack"] == WORST_CASE
        t = t.sort_values(["_wc", "optimality", "attack"], ascending=[True, False, True], kind="stable")
        out.append((f"{dataset} — {model} / {defense} — {norm}, {n} points", t.drop(columns="_wc").reset_index(drop=True)))
    return out


CERTIFIED = "certified"


def certified_radii(rows: Sequence[CellResult]) -> dict[tuple, tuple[str, float, torch.Tensor]]:
    """Per (dataset, model, defense, norm, n): the verifiers, the clean accuracy and the per-point
    largest certified radius over them (0 where a point is misclassified or never certified)."""
    out: dict[tuple, tuple[list[str], float, torch.Tensor]] = {}
    for r in rows_of_kind(rows, CERTIFIED):
        if r.status != "ok" or not r.metrics:
            continue
        radii = json.loads(r.metrics).get("_radii")
        if not radii:
            continue
        key = (r.dataset, r.model, r.defense, r.norm, r.n)
        t = torch.tensor(radii, dtype=torch.float64)
        names, _, best = out.get(key, ([], r.clean_acc, torch.zeros_like(t)))
        if best.shape != t.shape:
            continue
        verifier = label(r.attack, json.loads(r.attack_params or "{}"))
        out[key] = ([*names, verifier], r.clean_acc, torch.maximum(best, t))
    return {k: ("+".join(sorted(set(names))), clean, t) for k, (names, clean, t) in out.items()}


def _own_grid(rows: Sequence[CellResult], key: tuple) -> list[float]:
    """The certified cells' own eps grid (their bisection's points), for a row without a curve."""
    for r in rows_of_kind(rows, CERTIFIED):
        if (r.dataset, r.model, r.defense, r.norm, r.n) == key and r.status == "ok" and r.metrics:
            grid = json.loads(r.metrics).get("curve_eps")
            if grid:
                return [e for e in grid if e > 0]
    return []


def curve_plots(rows: Sequence[CellResult]):
    """One PNG per report with a panel per curve table (robust accuracy vs eps, one line per attack)."""
    tables = curve_tables(rows)
    if not tables:
        return []
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.6 * len(tables), 4.0), squeeze=False)
    for ax, (title, t) in zip(axes[0], tables, strict=True):
        eps_cols = [c for c in t.columns if c.startswith("eps ")]
        xs = [float(c.split(" ", 1)[1]) for c in eps_cols]
        for _, r in t.iterrows():
            wc = r["attack"] == WORST_CASE
            if str(r["attack"]).startswith(CERTIFIED):
                ax.plot(xs, [r[c] for c in eps_cols], ls="--", lw=2.2, color="tab:green", label=plot_text(r["attack"]), zorder=3)
                continue
            label = r["attack"] if wc or pd.isna(r["optimality"]) else f"{r['attack']} ({r['optimality']:.2f})"
            ax.plot(xs, [r[c] for c in eps_cols], marker="" if wc else "o", ms=3, lw=2.6 if wc else 1.2,
                    color="black" if wc else None, label=plot_text(label), zorder=3 if wc else 2)
        ax.set_title(plot_text(title), fontsize=9)
        ax.set_xlabel("eps")
        ax.set_ylabel("robust (attacked) / certified accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="attack (optimality)", title_fontsize=7)
    fig.suptitle("Robust accuracy vs eps per attack")
    return [Plot("robustness_curves", "Robustness curves and attack optimality", to_png(fig, plt))]
