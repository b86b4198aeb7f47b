"""The certified cell kind through the harness: the union column, the radius curve in the report,
and an unsupported layer stored as an error row while the run goes on."""

from __future__ import annotations

import json

import pytest
from torch import nn

from robustbench_lite import ModelSpec, ThreatModel, register_model
from robustbench_lite.eval import flags as checks
from robustbench_lite.harness.presets import Extra, Preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard
from robustbench_lite.report.curves import curve_tables


@register_model("test-tanh-mlp")
def _tanh_mlp(input_shape, num_classes):
    d = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, num_classes))


@pytest.fixture(scope="module")
def certified_run(tmp_path_factory):
    eps = 0.03
    threat = ThreatModel("linf", eps)
    ibp = DefenseSpec("ibp", {"eps": eps, "epochs": 4, "warmup_epochs": 1, "ramp_epochs": 2, "batch_size": 64, "lr": 3e-3})
    plan = Preset(
        name="certified-test", description="digits, an IBP-trained cnn-cert-small and a tanh model",
        data=(DataSpec("digits"),), models=(ModelSpec("cnn-cert-small"),), defenses=(ibp,),
        grid=((threat, (AttackSpec("pgd", {"steps": 20}),)),), n=120,
        paired=((ModelSpec("test-tanh-mlp"), DefenseSpec("standard", {"epochs": 1, "batch_size": 64})),),
        extra=(Extra(("ibp", "standard"), threat, (AttackSpec("ibp"), AttackSpec("crown", {"intermediate": "ibp"})), 120,
                     kind="certified"),),
    ).plan()
    workdir = tmp_path_factory.mktemp("certified")
    run_plan(plan, workdir=workdir, progress=False)
    with Store(workdir / "store.sqlite") as s:
        return s.rows(), eps


def test_certified_cells_hold_the_union_below_the_worst_case_and_their_curve(certified_run):
    rows, eps = certified_run
    cert = {r.attack: r for r in rows if r.kind == "certified" and r.defense == "ibp"}
    worst = next(r for r in rows if r.attack == "worst_case" and r.defense == "ibp")
    assert set(cert) == {"ibp", "crown"} and all(r.status == "ok" for r in cert.values())
    metrics = {k: json.loads(r.metrics) for k, r in cert.items()}
    union = max(m["union_acc"] for m in metrics.values())
    assert 0 < union <= worst.robust_acc  # not vacuous, and a lower bound of the attacked accuracy
    assert union >= max(r.robust_acc for r in cert.values())
    assert all(checks.CERTIFIED_BROKEN not in r.flags for r in cert.values())
    assert "crown[intermediate=ibp]" in "".join(m["verifiers"] for m in metrics.values())
    for r, m in zip(cert.values(), metrics.values(), strict=True):
        assert r.seconds > 0 and m["curve_seconds"] > 0
        grid, curve = m["curve_eps"], m["curve"]
        assert grid[0] == 0 and grid[-1] == pytest.approx(2 * eps)
        assert curve[grid.index(pytest.approx(eps))] == pytest.approx(r.robust_acc)  # the curve passes the cell's value
        assert all(a >= b for a, b in zip(curve, curve[1:], strict=False))  # a share of radii >= eps: non-increasing
    wide = leaderboard.wide_tables(rows)["digits_linf_0.03"].set_index("defense")
    assert wide.loc["ibp", "certified"] == pytest.approx(union)
    (title, table), = [t for t in curve_tables(rows) if "ibp" in t[0]]
    line = table[table["attack"].str.startswith("certified")].iloc[0]
    assert line["eps 0"] == pytest.approx(worst.clean_acc) and line[f"eps {eps:g}"] == pytest.approx(union)


def test_an_unsupported_layer_is_an_error_row_naming_it_and_the_run_goes_on(certified_run):
    rows, _ = certified_run
    bad = [r for r in rows if r.kind == "certified" and r.defense == "standard"]
    assert len(bad) == 2 and all(r.status == "error" for r in bad)
    assert all("ValueError" in r.error and "Tanh" in r.error and "supported layers" in r.error for r in bad)
    evasion = [r for r in rows if r.kind == "evasion" and r.defense == "standard"]
    assert evasion and all(r.status == "ok" for r in evasion)  # the tanh model's attacks still ran
