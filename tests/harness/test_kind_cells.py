"""The universal, sparse (L0) and poisoning kinds through run_plan: store rows, resume, error
isolation and their own leaderboard CSVs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from robustbench_lite import ModelSpec, ThreatModel
from robustbench_lite.harness.presets import Extra, Preset, get_preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard

_STD = DefenseSpec("standard", {"epochs": 8, "batch_size": 64, "lr": 3e-3})


def _preset(extra: tuple[Extra, ...], grid=()) -> Preset:
    return Preset(
        name="beyond-test", description="digits, the universal, sparse and poisoning kinds", data=(DataSpec("digits"),),
        models=(ModelSpec("small-cnn"),), defenses=(_STD,), grid=grid, n=100, extra=extra,
    )


EXTRA = (
    Extra(("standard",), ThreatModel("linf", 0.15), (AttackSpec("uap", {"passes": 1, "df_steps": 10, "batch_size": 16}), AttackSpec("sga", {"epochs": 1})), 150),
    Extra(("standard",), ThreatModel("l0", 1), (AttackSpec("one-pixel", {"population": 40, "generations": 5}),), 40),
    Extra(("standard",), ThreatModel("l0", 9), (AttackSpec("badnets", {"rate": 0.1, "target": 7}),
                                                AttackSpec("label-flip", {"rate": 0.1}),
                                                AttackSpec("badnets", {"rate": 0.99})), 0),  # 0.99: too many poisons
)


@pytest.fixture(scope="module")
def beyond_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("beyond")
    plan = _preset(EXTRA, grid=((ThreatModel("linf", 0.15), (AttackSpec("fgsm"),)),)).plan()
    first = run_plan(plan, workdir=work, progress=False)
    return plan, work, first


def test_other_kinds_are_stored_with_their_metrics_and_a_bad_cell_is_isolated(beyond_run):
    plan, work, first = beyond_run
    assert len(plan.cells) == 7
    assert first.computed == 7 and first.errors == 1
    with Store(work / "store.sqlite") as s:
        rows = {(r.attack, r.attack_params): r for r in s.rows()}
    kinds = {r.attack: r.kind for r in rows.values()}
    assert kinds["uap"] == kinds["sga"] == "universal" and kinds["one-pixel"] == "sparse"
    assert kinds["label-flip"] == "poisoning" and kinds["fgsm"] == kinds["worst_case"] == "evasion"
    by_attack = {}
    for r in rows.values():
        by_attack.setdefault(r.attack, []).append(r)
    uap = json.loads(by_attack["uap"][0].metrics)
    assert uap["fooling_rate"] > uap["noise_fooling_rate"] and by_attack["uap"][0].n == 150
    pix = json.loads(by_attack["one-pixel"][0].metrics)
    assert pix["pixels"] == 1 and pix["queries"] > 0
    bad = [r for r in by_attack["badnets"] if r.status == "ok"]
    err = [r for r in by_attack["badnets"] if r.status == "error"]
    assert len(bad) == 1 and len(err) == 1 and "poisons" in err[0].error
    m = json.loads(bad[0].metrics)
    assert m["n_poison"] == round(0.1 * 1437) and m["attack_success_rate"] > 0.5
    assert m["clean_acc_drop"] == pytest.approx(m["clean_acc_unpoisoned"] - bad[0].clean_acc)
    assert bad[0].model_key != rows[("fgsm", by_attack["fgsm"][0].attack_params)].model_key  # its own model
    # the evasion worst case covers only the evasion cell (the universal cells at the same threat have no mask)
    wc = by_attack["worst_case"][0]
    assert "incomplete" not in wc.flags and wc.robust_acc == by_attack["fgsm"][0].robust_acc


def test_rerun_skips_finished_other_cells_and_retries_the_error(beyond_run):
    plan, work, _ = beyond_run
    again = run_plan(plan, workdir=work, progress=False)
    assert again.skipped == 6 and again.computed == 1 and again.errors == 1


def test_one_csv_per_kind_with_its_metric_columns(beyond_run, tmp_path):
    _, work, _ = beyond_run
    with Store(work / "store.sqlite") as s:
        rows = s.rows()
    names = {p.name for p in leaderboard.write(rows, tmp_path)}
    assert {"cells.csv", "digits_linf_0.15.csv", "digits_universal.csv", "digits_sparse.csv", "digits_poisoning.csv"} <= names
    wide = pd.read_csv(tmp_path / "digits_linf_0.15.csv")
    assert "uap" not in wide.columns and "fgsm" in wide.columns
    uni = pd.read_csv(tmp_path / "digits_universal.csv")
    assert {"fooling_rate", "noise_fooling_rate", "acc_under_delta"} <= set(uni.columns) and len(uni) == 2
    sparse = pd.read_csv(tmp_path / "digits_sparse.csv")
    assert {"success_rate", "queries", "pixels"} <= set(sparse.columns)
    pois = pd.read_csv(tmp_path / "digits_poisoning.csv")
    assert {"poison_rate", "clean_acc", "clean_acc_drop", "attack_success_rate", "train_seconds"} <= set(pois.columns)
    assert sorted(pois["status"]) == ["error", "ok", "ok"]
    assert "digits_poisoning" in leaderboard.render(rows)


def test_full_and_poisoning_presets_hold_their_universal_sparse_and_poisoning_cells():
    full = get_preset("full").plan()
    kinds = {c.attack.name for c in full.cells}
    assert {"uap", "sga", "one-pixel", "badnets", "label-flip"} <= kinds
    assert {c.defense.name for c in full.cells if c.attack.name == "badnets"} == {"standard"}
    pois = get_preset("poisoning").plan()
    rates = sorted((c.defense.name, c.attack.params["rate"]) for c in pois.cells)
    assert rates == [("pgd-at", 0.01), ("pgd-at", 0.05), ("standard", 0.01), ("standard", 0.05)]
    assert all(c.data.train_limit is None for c in pois.cells)  # the full 60k training set
    assert get_preset("full").plan(threats=[ThreatModel("linf", 0.1)]).cells  # --threats keeps only the evasion grid
    assert not {c.attack.name for c in get_preset("full").plan(threats=[ThreatModel("linf", 0.1)]).cells} & {"uap", "badnets"}


def test_attacks_option_runs_extra_attacks_only_on_their_own_cells():
    plan = get_preset("full").plan(attacks=["pgd", "uap", "badnets"], defenses=["standard"])
    names = sorted((c.attack.name, c.threat.label) for c in plan.cells)
    assert names == [("badnets", "l0_9"), ("pgd", "linf_0.1"), ("uap", "linf_0.1")]


def test_a_group_whose_training_fails_files_each_error_under_its_own_kind(tmp_path):
    broken = DefenseSpec("standard", {"epochs": 1, "lr": 1e12})  # the loss diverges: the loop raises
    plan = Preset(
        name="broken", description="digits, training that fails", data=(DataSpec("digits"),),
        models=(ModelSpec("small-cnn"),), defenses=(broken,), n=50,
        grid=((ThreatModel("linf", 0.1), (AttackSpec("fgsm"),)),),
        extra=(Extra(("standard",), ThreatModel("linf", 0.1), (AttackSpec("uap", {"passes": 1}),), 50),
               Extra(("standard",), ThreatModel("l0", 1), (AttackSpec("one-pixel", {"generations": 2}),), 20)),
    ).plan()
    result = run_plan(plan, workdir=tmp_path, progress=False)
    assert result.errors == len(plan.cells) == 3
    with Store(tmp_path / "store.sqlite") as s:
        rows = {r.attack: r for r in s.rows()}
    assert {a: r.kind for a, r in rows.items()} == {"fgsm": "evasion", "uap": "universal", "one-pixel": "sparse"}
    assert all(r.status == "error" and r.error.startswith("training failed") and r.code_version for r in rows.values())
    leaderboard.write(list(rows.values()), tmp_path / "lb")
    assert list(pd.read_csv(tmp_path / "lb" / "digits_universal.csv")["status"]) == ["error"]
