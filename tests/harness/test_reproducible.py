"""Same config and seed -> byte-identical leaderboard CSVs apart from the timing columns."""

from __future__ import annotations

import pandas as pd

from robustbench_lite.harness.presets import get_preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard

TIMING = ["seconds", "train_seconds"]


def _run(workdir):
    run_plan(get_preset("smoke").plan(), workdir=workdir, progress=False)
    with Store(workdir / "store.sqlite") as store:
        rows = store.rows()
    return {p.name: p for p in leaderboard.write(rows, workdir / "leaderboards")}


def _without_timing(path) -> bytes:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df.drop(columns=[c for c in TIMING if c in df.columns]).to_csv(index=False).encode()


def test_smoke_preset_twice_from_empty_stores_gives_identical_csvs(tmp_path):
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert sorted(first) == sorted(second) and "cells.csv" in first and len(first) >= 3
    for name in first:
        assert _without_timing(first[name]) == _without_timing(second[name]), name
    cells = pd.read_csv(first["cells.csv"])
    assert cells["key"].notna().all() and cells["code_version"].notna().all()
    assert cells["key"].is_unique
