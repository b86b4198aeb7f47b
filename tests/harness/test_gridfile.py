"""Grids as TOML files: the built-in presets are TOML package data that give exactly the cells the
Python presets gave (so existing stores resume), and a user's config with its own model, data and
curves runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from robustbench_lite.cli import main
from robustbench_lite.core.threat import ThreatModel
from robustbench_lite.harness.gridfile import load_grid, toml_loads
from robustbench_lite.harness.presets import PRESET_DIR, PRESETS, get_preset
from robustbench_lite.harness.store import Store

ROOT = Path(__file__).resolve().parents[2]
# the sorted cell keys of the Python presets (and of six override variants), frozen before the
# presets moved to TOML
FROZEN = json.loads((Path(__file__).parent / "data" / "preset_keys.json").read_text())
VARIANTS = {
    "quick|attacks=fgsm,pgd|n=200": dict(attacks=["fgsm", "pgd"], n=200),
    "quick|threats=linf:0.1,l2:1.5": dict(threats=[ThreatModel.parse("linf:0.1"), ThreatModel.parse("l2:1.5")]),
    "full|defenses=standard,pgd-at,convex-robust": dict(defenses=["standard", "pgd-at", "convex-robust"]),
    "full|attacks=fgsm,uap,stable-relu": dict(attacks=["fgsm", "uap", "stable-relu"]),
    "poisoning|n=500": dict(n=500),
    "smoke|datasets=digits|defenses=standard,pgd-at": dict(datasets=["digits"], defenses=["standard", "pgd-at"]),
}


def test_toml_presets_give_exactly_the_cells_of_the_python_presets():
    assert sorted(PRESETS) == ["certified", "full", "poisoning", "quick", "smoke"]
    for name in PRESETS:
        assert sorted(c.key for c in get_preset(name).plan().cells) == FROZEN[name], name
    for label, overrides in VARIANTS.items():
        assert sorted(c.key for c in get_preset(label.split("|")[0]).plan(**overrides).cells) == FROZEN[label], label


def test_presets_are_package_data_and_list_shows_where(capsys):
    assert all((PRESET_DIR / f"{name}.toml").is_file() for name in PRESETS)
    pyproject = toml_loads((ROOT / "pyproject.toml").read_text())
    assert "presets/*.toml" in pyproject["tool"]["setuptools"]["package-data"]["robustbench_lite"]
    assert main(["list", "presets"]) == 0
    out = capsys.readouterr().out
    assert str(PRESET_DIR / "quick.toml") in out and "--config" in out


def test_a_copied_preset_runs_like_the_preset(tmp_path):
    copy = tmp_path / "mine.toml"
    copy.write_text((PRESET_DIR / "smoke.toml").read_text())
    assert sorted(c.key for c in load_grid(copy).plan().cells) == FROZEN["smoke"]


def test_a_config_with_a_user_model_its_data_and_a_curve_runs_end_to_end(user_checkpoint, digits, tmp_path, capsys):
    _, folder = user_checkpoint
    u8 = (digits.test.x[:60, 0] * 255).round().byte().numpy()
    np.savez(tmp_path / "points.npz", x=u8, y=digits.test.y[:60].numpy())
    (tmp_path / "weights.safetensors").write_bytes((folder / "digits_cnn.safetensors").read_bytes())
    (tmp_path / "bench.toml").write_text(
        'name = "mine"\nn = 60\n\n[[datasets]]\npath = "points.npz"\n\n[[models]]\nname = "small-cnn"\n'
        'weights = "weights.safetensors"\n\n[[threats]]\nthreat = "linf:8/255"\nattacks = "quick"\n\n'
        '[[curves]]\ncurve = "linf:0:0.2:5"\nattacks = ["fgsm", { name = "pgd", steps = 10 }]\n'
    )
    args = ["run", "--config", str(tmp_path / "bench.toml"), "--workdir", str(tmp_path / "w"),
            "--out", str(tmp_path / "lb"), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "preset mine: 4 cells computed" in capsys.readouterr().out
    wide = pd.read_csv(tmp_path / "lb" / "points.npz_linf_0.0313725.csv")
    assert wide["defense"].iloc[0] == "weights.safetensors" and {"fgsm", "pgd"} <= set(wide.columns)
    curve = pd.read_csv(tmp_path / "lb" / "points.npz_curve.csv")
    assert sorted(curve["eps"].unique()) == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert main(args) == 0
    assert "0 cells computed" in capsys.readouterr().out
    with Store(tmp_path / "w" / "store.sqlite") as store:
        assert {r.status for r in store.rows()} == {"ok"}


def test_the_main_job_writes_the_html_report_and_prints_its_path(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    import pytest

    argv = ["run_benchmark.py", "--preset", "smoke", "--attacks", "fgsm", "--threats", "linf:0.1", "--n", "40",
            "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "lb"), "--report", str(tmp_path / "rep"),
            "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "scripts" / "run_benchmark.py"), run_name="__main__")
    assert done.value.code == 0
    report = tmp_path / "rep" / "report.html"
    assert report.is_file() and f"report: {report.resolve()}" in capsys.readouterr().out
    assert (tmp_path / "lb" / "digits_linf_0.1.csv").is_file()
