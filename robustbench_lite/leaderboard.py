"""Store rows -> pandas tables -> CSV files and printable text.

* ``cells.csv``: the long table, every stored cell (errors included).
* ``<dataset>_<norm>_<eps>.csv``: the wide table per dataset and threat, one row per
  model/defense: ``clean_acc``, one robust-accuracy column per attack, ``worst_case``,
  ``seconds`` (all attacks), ``train_seconds`` and ``flags``; sorted by ``worst_case``.
* ``<dataset>_universal.csv``, ``<dataset>_sparse.csv``, ``<dataset>_poisoning.csv``: one row per
  non-evasion cell with its kind's own metric columns (:data:`KIND_COLUMNS`; fooling rate and the
  random-noise floor; success rate and queries; clean accuracy, its drop and attack success rate).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .rows import WORST_CASE, CellResult

ID_COLUMNS = ["dataset", "model", "defense", "norm", "eps", "n"]
CERTIFIED = "certified"  # wide-table column: the certified share, for defenses with a certificate
OTHER_KINDS = ("universal", "sparse", "poisoning")
# per kind: the columns of its CSV after dataset/model/defense/attack (metrics come from the row's
# JSON ``metrics``), and how rows are sorted
KIND_COLUMNS: dict[str, list[str]] = {
    "universal": ["norm", "eps", "n", "clean_acc", "fooling_rate", "noise_fooling_rate", "acc_under_delta", "noise_acc",
                  "delta_norm", "n_fit", "seconds", "grad_evals"],
    "sparse": ["norm", "pixels", "n", "clean_acc", "attacked", "success_rate", "robust_acc", "queries",
               "queries_per_point", "seconds"],
    "poisoning": ["poison_rate", "n_poison", "clean_acc_unpoisoned", "clean_acc", "clean_acc_drop", "attack_success_rate",
                  "n_success_points", "retrain", "train_seconds", "poison_seconds", "poison_linf", "attack_params"],
}
_KIND_SORT = {
    "universal": (["norm", "eps", "model", "defense", "fooling_rate"], [True, True, True, True, False]),
    "sparse": (["pixels", "model", "defense", "success_rate"], [True, True, True, False]),
    "poisoning": (["attack", "model", "defense", "poison_rate"], [True, True, True, True]),
}


def long_table(rows: Sequence[CellResult]) -> pd.DataFrame:
    df = pd.DataFrame([r.as_row() for r in rows])
    if df.empty:
        return df
    df["_wc"] = df["attack"] == WORST_CASE
    df = df.sort_values(["dataset", "norm", "eps", "model", "defense", "_wc", "grad_evals", "attack"], kind="stable")
    return df.drop(columns="_wc").reset_index(drop=True)


def wide_tables(rows: Sequence[CellResult]) -> dict[str, pd.DataFrame]:
    """One table per ``<dataset>_<norm>_<eps>``, as written to CSV."""
    df = long_table([r for r in rows if r.kind not in OTHER_KINDS])
    out: dict[str, pd.DataFrame] = {}
    if df.empty:
        return out
    for (dataset, norm, eps), part in df.groupby(["dataset", "norm", "eps"], sort=True):
        attacks = [a for a in dict.fromkeys(part["attack"]) if a != WORST_CASE]
        table_rows = []
        for _, g in part.groupby(["model", "defense", "n"], sort=True):
            by_attack = {r.attack: r for r in g.itertuples()}
            first = g.iloc[0]
            ok = g[g["status"] == "ok"]
            row = {k: first[k] for k in ID_COLUMNS}
            row["clean_acc"] = ok["clean_acc"].iloc[0] if len(ok) else float("nan")
            for a in attacks:
                r = by_attack.get(a)
                row[a] = r.robust_acc if r is not None and r.status == "ok" else float("nan")
            wc = by_attack.get(WORST_CASE)
            row[WORST_CASE] = wc.robust_acc if wc is not None else float("nan")
            certified = json.loads(wc.metrics).get("certified_acc") if wc is not None and wc.metrics else None
            if certified is not None:  # a defense with a certificate (convex-robust): the certified share
                row[CERTIFIED] = certified
            row["seconds"] = float(g.loc[g["attack"] != WORST_CASE, "seconds"].sum())
            row["train_seconds"] = first["train_seconds"]
            flags = set()
            for r in g.itertuples():
                flags.update(f for f in str(r.flags).split(";") if f)
                if r.status == "error":
                    flags.add(f"error:{r.attack}")
            row["flags"] = ";".join(sorted(flags))
            table_rows.append(row)
        table = pd.DataFrame(table_rows).sort_values(WORST_CASE, ascending=False, kind="stable").reset_index(drop=True)
        if CERTIFIED in table:  # right after the worst case it lower-bounds
            cols = [c for c in table.columns if c != CERTIFIED]
            cols.insert(cols.index(WORST_CASE) + 1, CERTIFIED)
            table = table[cols]
        out[f"{dataset}_{norm}_{eps:g}"] = table
    return out


def kind_tables(rows: Sequence[CellResult]) -> dict[str, pd.DataFrame]:
    """One table per ``<dataset>_<kind>`` for the universal, sparse and poisoning cells."""
    out: dict[str, pd.DataFrame] = {}
    by_name: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.kind not in OTHER_KINDS:
            continue
        metrics = json.loads(r.metrics) if r.metrics else {}
        row = {"dataset": r.dataset, "model": r.model, "defense": r.defense, "attack": r.attack}
        fields = r.as_row()
        for col in KIND_COLUMNS[r.kind]:
            value = metrics.get(col, fields.get(col))
            row[col] = float("nan") if value is None else value
        row["status"] = r.status
        row["error"] = r.error.splitlines()[0][:200] if r.error else ""
        by_name.setdefault((r.dataset, r.kind), []).append(row)
    for (dataset, kind), table_rows in sorted(by_name.items()):
        cols, asc = _KIND_SORT[kind]
        table = pd.DataFrame(table_rows).sort_values(cols, ascending=asc, na_position="last", kind="stable")
        out[f"{dataset}_{kind}"] = table.reset_index(drop=True)
    return out


def write(rows: Sequence[CellResult], out_dir: str | Path) -> list[Path]:
    """Write ``cells.csv`` and every wide table under ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    long = long_table(rows)
    if not long.empty:
        p = out_dir / "cells.csv"
        long.to_csv(p, index=False, float_format="%.6g")
        paths.append(p)
    for name, table in {**wide_tables(rows), **kind_tables(rows)}.items():
        p = out_dir / f"{name}.csv"
        table.to_csv(p, index=False, float_format="%.6g")
        paths.append(p)
    return paths


def render(rows: Sequence[CellResult]) -> str:
    """The wide tables as plain text, for the terminal."""
    parts = []
    for name, table in wide_tables(rows).items():
        shown = table.drop(columns=["dataset", "norm", "eps"])
        parts.append(f"== {name} ==\n{shown.to_string(index=False, float_format=lambda v: f'{v:.3f}')}")
    for name, table in kind_tables(rows).items():
        shown = table.drop(columns=[c for c in ("dataset", "attack_params", "error") if c in table])
        parts.append(f"== {name} ==\n{shown.to_string(index=False, float_format=lambda v: f'{v:.3f}')}")
    return "\n\n".join(parts) if parts else "(no results yet)"
