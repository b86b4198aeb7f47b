"""The harness: evaluate, store, resume, errors, leaderboards, CLI plugins, checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap

import pandas as pd
import pytest
import torch

from robustbench_lite import create_attack, evaluate
from robustbench_lite.cli import main
from robustbench_lite.eval import flags as checks
from robustbench_lite.harness.presets import get_preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.store import Store


def test_evaluate_worst_case_is_the_per_point_minimum(digits_model, digits):
    attacks = [create_attack("fgsm", eps=0.1), create_attack("pgd", eps=0.1, steps=10)]
    ev = evaluate(digits_model, attacks, digits.test, n=120)
    assert ev.n == 120
    fgsm, pgd = ev.records
    wc = ev.worst_case[attacks[0].threat]
    assert torch.equal(wc, ev.correct & fgsm.robust & pgd.robust)
    assert float(wc.float().mean()) <= min(fgsm.robust_acc, pgd.robust_acc) <= ev.clean_acc
    assert pgd.grad_evals > fgsm.grad_evals > 0
    assert fgsm.attacked == int(ev.correct.sum())


def test_survivors_only_attacks_fewer_points_and_gives_the_same_worst_case(digits_model, digits):
    attacks = [create_attack("fgsm", eps=0.1), create_attack("pgd", eps=0.1, steps=10)]
    full = evaluate(digits_model, attacks, digits.test, n=120)
    surv = evaluate(digits_model, attacks, digits.test, n=120, survivors_only=True)
    t = attacks[0].threat
    assert torch.equal(full.worst_case[t], surv.worst_case[t])
    assert surv.records[1].attacked < full.records[1].attacked


def test_least_likely_reports_its_target_hit_rate(digits_model, digits):
    ev = evaluate(digits_model, [create_attack("least-likely", eps=0.2)], digits.test, n=100)
    rate = ev.records[0].target_hit_rate
    assert rate is not None and 0.0 < rate <= 1.0


def _smoke(tmp_path, **kw):
    return run_plan(get_preset("smoke").plan(**kw), workdir=tmp_path, progress=False)


def test_rerun_skips_finished_cells(tmp_path):
    first = _smoke(tmp_path)
    assert first.computed == 5 and first.errors == 0
    again = _smoke(tmp_path)
    assert again.computed == 0 and again.skipped == 5


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    import robustbench_lite.eval.evasion as evasion_mod
    import robustbench_lite.harness.store as store_mod

    real_put_stage, staged = store_mod.Store.put_stage, []

    def dying_put_stage(self, key, payload, mask=None):
        real_put_stage(self, key, payload, mask)
        if "/attack:" in key:
            staged.append(key.split("/attack:")[1].split(":")[0])
            if len(staged) == 2:
                raise KeyboardInterrupt  # the run is killed after two attacks are measured

    monkeypatch.setattr(store_mod.Store, "put_stage", dying_put_stage)
    with pytest.raises(KeyboardInterrupt):
        _smoke(tmp_path)
    monkeypatch.setattr(store_mod.Store, "put_stage", real_put_stage)
    with Store(tmp_path / "store.sqlite") as s:
        assert not [r for r in s.rows() if r.status == "ok"]  # no cell is finished without its flags
        assert len([k for k in s.stages("") if "/attack:" in k]) == 2
    real_run, ran = evasion_mod.run_attack, []

    def counting_run(model, attack, *args, **kwargs):
        ran.append(attack.name)
        return real_run(model, attack, *args, **kwargs)

    monkeypatch.setattr(evasion_mod, "run_attack", counting_run)
    resumed = _smoke(tmp_path)
    assert resumed.computed == 5 and resumed.errors == 0
    assert len(ran) == 3 and sorted(ran + staged) == sorted(["fgsm", "ifgsm", "least-likely", "pgd", "pgd"])
    with Store(tmp_path / "store.sqlite") as s:
        assert not s.stages("")  # the finished evaluation's stages are gone


PLUGIN = textwrap.dedent(
    '''
    """A test plugin: one attack that works, one that raises."""
    from dataclasses import dataclass

    from robustbench_lite import ops
    from robustbench_lite.core.attack import EvasionAttack
    from robustbench_lite.core.registry import register_attack


    @register_attack("noise-test")
    @dataclass(frozen=True, kw_only=True)
    class NoiseTest(EvasionAttack):
        """Uniform noise in the ball (a floor every real attack must beat)."""

        needs_grad = False

        def _perturb(self, model, x, y, target, gen):
            return self.norm.geometry.random_start(x, self.eps, gen)


    @register_attack("broken-test")
    @dataclass(frozen=True, kw_only=True)
    class BrokenTest(EvasionAttack):
        """Always raises."""

        def _perturb(self, model, x, y, target, gen):
            raise RuntimeError("this plugin is broken on purpose")
    '''
)


def test_plugin_file_shows_in_list_and_leaderboard_and_a_broken_one_is_stored_as_error(tmp_path, capsys):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    assert main(["--plugin", str(plugin), "list", "attacks"]) == 0
    assert "noise-test" in capsys.readouterr().out
    work, out = tmp_path / "work", tmp_path / "lb"
    code = main([
        "--plugin", str(plugin), "run", "--preset", "smoke", "--attacks", "fgsm,pgd,noise-test,broken-test",
        "--threats", "linf:0.1", "--n", "60", "--workdir", str(work), "--out", str(out), "--no-progress",
    ])
    assert code == 1  # a cell failed, and the exit code says so
    wide = pd.read_csv(out / "digits_linf_0.1.csv")
    assert {"noise-test", "fgsm", "pgd", "worst_case", "clean_acc", "seconds"} <= set(wide.columns)
    assert wide["noise-test"].iloc[0] >= wide["pgd"].iloc[0]
    assert "error:broken-test" in wide["flags"].iloc[0] and "incomplete" in wide["flags"].iloc[0]
    cells = pd.read_csv(out / "cells.csv")
    broken = cells[cells["attack"] == "broken-test"].iloc[0]
    assert broken["status"] == "error" and "broken on purpose" in broken["error"]
    assert set(cells[cells["status"] == "ok"]["attack"]) == {"fgsm", "pgd", "noise-test", "worst_case"}


def test_leaderboard_columns_and_files(tmp_path):
    _smoke(tmp_path)
    out = tmp_path / "lb"
    assert main(["leaderboard", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    wide = pd.read_csv(out / "digits_linf_0.1.csv")
    assert list(wide.columns[:8]) == ["dataset", "model", "defense", "norm", "eps", "n", "clean_acc", "fgsm"]
    assert list(wide.columns[-5:]) == ["worst_case", "worst_class", "seconds", "train_seconds", "flags"]
    for col in ["clean_acc", "fgsm", "ifgsm", "least-likely", "pgd", "worst_case", "worst_class"]:
        assert 0 <= wide[col].iloc[0] <= 1
    assert wide["worst_case"].iloc[0] <= wide[["fgsm", "ifgsm", "pgd", "least-likely"]].min(axis=1).iloc[0]
    assert wide["worst_class"].iloc[0] <= wide["worst_case"].iloc[0]  # a minimum over classes of a mean
    cells = pd.read_csv(out / "cells.csv")
    assert {"key", "code_version", "grad_evals", "robust_acc", "flags"} <= set(cells.columns)
    assert cells["key"].is_unique
    wc = cells[(cells["attack"] == "worst_case") & (cells["norm"] == "linf")].iloc[0]
    named = json.loads(wc["metrics"])
    assert round(named["worst_class"], 3) == wide["worst_class"].iloc[0] and 0 <= named["worst_class_label"] < 10


def test_worst_class_is_the_lowest_per_class_robust_accuracy():
    from robustbench_lite.eval.evasion import worst_class

    robust = torch.tensor([True, False, True, True, False, True, True, True])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert worst_class(robust, labels) == (0.5, 0)  # classes 0 and 2 tie at 1/2: the smaller label
    assert worst_class(torch.tensor([True, True, False]), torch.tensor([5, 5, 7])) == (0.0, 7)
    with pytest.raises(ValueError, match="one robust flag per labelled point"):
        worst_class(robust, labels[:3])


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["run", "--preset", "nope", "--workdir", str(tmp_path)]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", "--threats", "linf:0", "--workdir", str(tmp_path)]) == 2
    assert "eps" in capsys.readouterr().err


# -- checks -----------------------------------------------------------------------------------------
def test_zero_gradient_flag_fires_on_saturated_softmax_and_not_on_an_honest_model(digits_model, digits):
    class Scaled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x) * 1e4

    attacks = [create_attack("fgsm", eps=0.1), create_attack("pgd", eps=0.1, steps=5)]
    honest = evaluate(digits_model, attacks, digits.test, n=100)
    masked = evaluate(Scaled(digits_model), attacks, digits.test, n=100)
    assert not any(honest.flags.values())
    assert checks.ZERO_GRAD in masked.flags["pgd@linf_0.1"]
    assert checks.ZERO_GRAD in masked.flags["worst_case@linf_0.1"]


def test_zero_gradients_check_is_pure():
    assert checks.zero_gradients(torch.tensor([1.0, 2.0, 0.5])) is None
    assert checks.zero_gradients(torch.tensor([0.0, 0.0, 0.5])) == checks.ZERO_GRAD
    assert checks.zero_gradients(torch.tensor([float("nan"), 1.0, 1.0])) == checks.ZERO_GRAD


def test_single_step_beats_iterative_fires_and_stays_quiet():
    iterative = {"fgsm": False, "pgd": True, "ifgsm": True}
    assert checks.single_step_beats_iterative({"fgsm": 0.30, "pgd": 0.45, "ifgsm": 0.2}, iterative) == {"pgd"}
    assert checks.single_step_beats_iterative({"fgsm": 0.30, "pgd": 0.10, "ifgsm": 0.2}, iterative) == set()


def test_single_step_flag_fires_in_the_harness_when_the_iterative_attack_is_broken(digits_model, digits, tmp_path):
    from dataclasses import dataclass

    from robustbench_lite.core.attack import EvasionAttack
    from robustbench_lite.core.registry import register_attack

    @register_attack("do-nothing-iterative-test")
    @dataclass(frozen=True, kw_only=True)
    class DoNothing(EvasionAttack):
        """An 'iterative' attack that never moves: FGSM must beat it."""

        @property
        def grad_budget(self):
            return 10.0

        def _perturb(self, model, x, y, target, gen):
            return x.clone()

    ev = evaluate(digits_model, [create_attack("fgsm", eps=0.2), DoNothing(eps=0.2)], digits.test, n=100)
    assert checks.SINGLE_STEP_WINS in ev.flags["do-nothing-iterative-test@linf_0.2"]
    assert checks.SINGLE_STEP_WINS in ev.flags["worst_case@linf_0.2"]
    assert checks.SINGLE_STEP_WINS not in ev.flags["fgsm@linf_0.2"]


def test_min_norm_cells_report_success_rate_and_median_l2(digits_model, digits):
    cw = create_attack("cw-l2", norm="l2", eps=1.0, search_steps=3, steps=30)
    rec = evaluate(digits_model, [cw], digits.test, n=60).records[0]
    assert rec.success_rate is not None and 0 < rec.success_rate <= 1
    assert rec.median_l2 is not None and rec.median_l2 > 0
    # robust at eps = no adversarial within eps, so at least the points never broken stay robust
    assert rec.robust_acc >= (1 - rec.success_rate) * rec.attacked / 60 - 1e-6


def test_stores_of_split_runs_merge_and_the_merged_run_recomputes_nothing(tmp_path):
    _smoke(tmp_path / "a", attacks=["fgsm"])
    _smoke(tmp_path / "b", attacks=["pgd"])
    with Store(tmp_path / "c" / "store.sqlite") as merged:
        assert merged.merge_from(tmp_path / "a" / "store.sqlite") > 0
        assert merged.merge_from(tmp_path / "b" / "store.sqlite") > 0
        ok = {r.key: r for r in merged.rows()}
        # an error row elsewhere never replaces a finished cell
        some = next(r for r in ok.values() if r.attack == "pgd")
        with Store(tmp_path / "d.sqlite") as broken:
            broken.put(dataclasses.replace(some, status="error", error="boom", robust_acc=None))
        merged.merge_from(tmp_path / "d.sqlite")
        assert merged.get(some.key)[0].status == "ok"
    with pytest.raises(ValueError, match="no results store"):
        Store(tmp_path / "e.sqlite").merge_from(tmp_path / "missing.sqlite")
    # the same from the command line: workdirs or store files, then the leaderboard
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b" / "store.sqlite"), "--workdir", str(tmp_path / "m")]) == 0
    with Store(tmp_path / "m" / "store.sqlite", create=False) as m:
        assert {r.key for r in m.rows()} == set(ok)
    assert main(["leaderboard", "--workdir", str(tmp_path / "m"), "--out", str(tmp_path / "m-out")]) == 0
    assert main(["merge", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "m")]) == 2
    # the models are cached per workdir: copy them so the merged workdir needs no training either
    shutil.copytree(tmp_path / "a" / "models", tmp_path / "c" / "models")
    plan = get_preset("smoke").plan(attacks=["fgsm", "pgd"])
    again = run_plan(plan, workdir=tmp_path / "c", progress=False)
    assert again.computed == 0 and again.skipped == len(plan.cells)


def test_a_certified_cell_gets_a_certified_column_that_lower_bounds_the_worst_case(tmp_path):
    """convex-standard through the harness with a certified cell (the stable-relu verifier): its row
    holds the certified share of the same points, no certified point is broken, and the wide table
    shows it next to worst_case; a defense without a certified cell has no value there."""
    from robustbench_lite.core.models import ModelSpec
    from robustbench_lite.core.threat import ThreatModel
    from robustbench_lite.harness.presets import Extra, Preset
    from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
    from robustbench_lite.report import leaderboard

    threat = ThreatModel("linf", 0.01)
    plan = Preset(
        name="certified", description="digits, convex-standard with its certificate", data=(DataSpec("digits"),),
        models=(ModelSpec("small-cnn"),), defenses=(DefenseSpec("standard", {"epochs": 2, "batch_size": 64}),),
        grid=((threat, (AttackSpec("fgsm"), AttackSpec("pgd", {"steps": 10}))),), n=150,
        paired=((ModelSpec("one-hidden-relu", {"hidden": 100}),
                 DefenseSpec("convex-standard", {"iterations": 300, "max_points": 300, "epochs": 1, "certify_points": 0})),),
        extra=(Extra(("convex-standard",), threat, (AttackSpec("stable-relu"),), 150, kind="certified"),),
    ).plan()
    assert [c.kind for c in plan.cells].count("certified") == 1
    run_plan(plan, workdir=tmp_path, progress=False)
    with Store(tmp_path / "store.sqlite") as s:
        rows = s.rows()
    wc = {r.defense: r for r in rows if r.attack == "worst_case"}
    cert = next(r for r in rows if r.kind == "certified")
    certified = cert.robust_acc
    assert cert.attack == "stable-relu" and cert.defense == "convex-standard" and cert.status == "ok"
    assert 0 < certified <= wc["convex-standard"].robust_acc  # not vacuous, and a lower bound
    assert checks.CERTIFIED_BROKEN not in cert.flags
    table = leaderboard.wide_tables(rows)["digits_linf_0.01"]
    cols = list(table.columns)
    assert cols[cols.index("worst_case") + 1 : cols.index("worst_case") + 3] == ["worst_class", "certified"]
    by_defense = table.set_index("defense")["certified"]
    assert by_defense["convex-standard"] == pytest.approx(certified) and pd.isna(by_defense["standard"])
    assert "digits_certified" in leaderboard.tables(rows)
    again = run_plan(plan, workdir=tmp_path, progress=False)
    assert again.computed == 0


def test_a_certified_point_broken_by_an_attack_raises_certified_broken(tmp_path):
    """A verifier that (wrongly) certifies every clean-correct point is caught by the attacks."""
    from robustbench_lite import Verifier, register_verifier
    from robustbench_lite.core.models import ModelSpec
    from robustbench_lite.core.threat import Norm, ThreatModel
    from robustbench_lite.harness.presets import Extra, Preset
    from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec

    @register_verifier("test-unsound")
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Unsound(Verifier):
        """Claims a margin of 1 everywhere (unsound on purpose)."""

        norms = (Norm.LINF,)

        def _margin_bounds(self, model, x, y, threat):
            return torch.ones(x.shape[0], 10, device=x.device)

    threat = ThreatModel("linf", 0.1)
    plan = Preset(
        name="unsound", description="digits, an unsound verifier", data=(DataSpec("digits"),),
        models=(ModelSpec("small-cnn"),), defenses=(DefenseSpec("standard", {"epochs": 2, "batch_size": 64}),),
        grid=((threat, (AttackSpec("pgd", {"steps": 10}),)),), n=100,
        extra=(Extra(("standard",), threat, (AttackSpec("test-unsound"),), 100, kind="certified"),),
    ).plan()
    run_plan(plan, workdir=tmp_path, progress=False)
    with Store(tmp_path / "store.sqlite") as s:
        cert = next(r for r in s.rows() if r.kind == "certified")
    assert checks.CERTIFIED_BROKEN in cert.flags
