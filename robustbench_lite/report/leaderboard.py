"""Store rows -> pandas tables -> CSV files and printable text.

* ``cells.csv``: the long table, every stored cell of every kind (errors included).
* each cell kind's own tables (:meth:`~robustbench_lite.harness.kinds.CellKind.tables`): the
  evasion kind's wide ``<dataset>_<norm>_<eps>.csv`` (one row per model, one column per attack,
  the worst case, the certified share where a verifier ran), and ``<dataset>_<kind>.csv`` for the
  others (universal, sparse, poisoning, certified, a plugin's kind).

A row is one model: models that share display names are told apart by their labels
(:func:`~robustbench_lite.harness.identity.distinguish`), in ``cells.csv`` as in every table.
File names come from dataset names through :func:`~robustbench_lite.core.names.safe_stem`, so a
plugin's name cannot write outside ``--out``; text cells that a spreadsheet would run as a
formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) get a leading
``'`` (OWASP's CSV-injection rule).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..core.names import safe_stem
from ..harness.identity import distinguish
from ..harness.kinds import KINDS, kind
from ..harness.rows import CellResult, long_table

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula
_STORE_ONLY = ("model_id", "identity")  # cells.csv tells models apart by their labels (and model_key)


def _public(long: pd.DataFrame) -> pd.DataFrame:
    """The long table as ``cells.csv`` shows it: a kind's private metrics (keys starting with
    ``_``, e.g. the curve kind's per-point distances) left out, and an ``optimality`` column (the
    curve kind's AttackBench score) where any row has one."""
    long = long.drop(columns=[c for c in _STORE_ONLY if c in long])
    if long.empty or "metrics" not in long:
        return long
    parsed = [json.loads(m) if isinstance(m, str) and m else {} for m in long["metrics"]]
    out = long.copy()
    out["metrics"] = [json.dumps({k: v for k, v in m.items() if not k.startswith("_")}) if m else "" for m in parsed]
    if any("optimality" in m for m in parsed):
        at = list(out.columns).index("robust_acc") + 1
        out.insert(at, "optimality", [m.get("optimality") for m in parsed])
    return out


def _by_kind(rows: Sequence[CellResult]) -> list[tuple[str, str, pd.DataFrame]]:
    """``(kind, file stem, table)`` for every kind's tables, evasion's wide tables first."""
    return [
        (name, stem, table)
        for name in sorted(KINDS.list(), key=lambda n: (n != "evasion", n))
        for stem, table in kind(name).tables(rows).items()
    ]


def tables(rows: Sequence[CellResult]) -> dict[str, pd.DataFrame]:
    """Every kind's tables, by file stem (evasion's wide tables first)."""
    return {stem: table for _, stem, table in _by_kind(rows)}


def wide_tables(rows: Sequence[CellResult]) -> dict[str, pd.DataFrame]:
    """The evasion kind's wide tables, one per ``<dataset>_<norm>_<eps>``."""
    return kind("evasion").tables(rows)


def guard_cell(value: object) -> object:
    """A text cell a spreadsheet would run as a formula, with a leading ``'`` (OWASP's
    CSV-injection rule); any other value as it is (numbers, negative ones included, stay numbers)."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_START) else value


def guarded(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with :func:`guard_cell` applied to its text cells (and column names)."""
    out = table.copy()
    for col in out.columns:
        if pd.api.types.is_object_dtype(out[col]) or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(guard_cell)
    out.columns = [guard_cell(c) for c in out.columns]
    return out


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` to ``path`` atomically: a temporary file beside it, then ``os.replace``, so
    a kill mid-write leaves the old file (or none), never a truncated one.  Text cells are
    :func:`guarded`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        guarded(table).to_csv(tmp, index=False, float_format="%.6g")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(rows: Sequence[CellResult], out_dir: str | Path) -> list[Path]:
    """Write ``cells.csv`` and every kind's tables under ``out_dir`` (each atomically); return the paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a folder for the leaderboard CSVs; pick another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = distinguish(rows)
    long = _public(long_table(rows))
    if not long.empty:
        p = out_dir / "cells.csv"
        write_csv(long, p)
        paths.append(p)
    for name, table in tables(rows).items():
        p = out_dir / f"{safe_stem(name)}.csv"
        write_csv(table, p)
        paths.append(p)
    return paths


def render(rows: Sequence[CellResult]) -> str:
    """Every table as plain text, for the terminal."""
    parts = []
    for name, stem, table in _by_kind(rows):
        shown = table.drop(columns=[c for c in kind(name).hidden_in_terminal if c in table])
        parts.append(f"== {stem} ==\n{shown.to_string(index=False, float_format=lambda v: f'{v:.3f}')}")
    return "\n\n".join(parts) if parts else "(no results yet)"
