"""Every evasion row with a verifier is a bracket: certified (the union of its verifiers, per point)
≤ robust accuracy ≤ worst case (attacked, lowered by a complete verifier's re-checked
counterexamples, the verifier named).  Checked through the harness with a fake complete verifier
registered here, on digits with a small MLP: the columns, the same numbers whichever verifier (or
kind, or run) came first, a counterexample outside the ball rejected, resume, and the report's bar."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from robustbench_lite import ModelSpec, ThreatModel, create_attack, create_defense, load, register_model
from robustbench_lite.certify import Verification, Verifier, create_verifier, register_verifier
from robustbench_lite.core.config import setting
from robustbench_lite.core.threat import Norm
from robustbench_lite.eval import flags as checks
from robustbench_lite.harness.kinds import evasion as evasion_kind
from robustbench_lite.harness.kinds.certified import counterexamples
from robustbench_lite.harness.plan import Cell, Plan
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard
from robustbench_lite.report.html import write_report
from robustbench_lite.training.cache import ModelCache, train_or_load

EPS, TINY, N = 0.04, 0.0005, 100
OLD_COLUMNS = ["dataset", "model", "defense", "norm", "eps", "n", "clean_acc", "least-likely", "worst_case", "worst_class",
               "seconds", "train_seconds", "flags"]  # a wide table without any verifier, as before brackets


@register_model("test-bracket-mlp")
def _mlp(input_shape, num_classes):
    d = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, num_classes))


@register_verifier("test-fake-bab")
@dataclass(frozen=True, kw_only=True)
class FakeBaB(Verifier):
    """A stand-in complete verifier with chosen statuses: ``verified`` the IBP-certified points of
    the chosen parity (sound), ``falsified`` the other points a 50-step PGD breaks, with its
    adversarial example (``pgd``) or with another test point's image, misclassified but far outside
    the ball (``outside``)."""

    norms = (Norm.LINF,)
    verified: str = setting("odd", choices=("odd", "even"))
    counterexample: str = setting("pgd", choices=("pgd", "outside", "none"))

    def _bounds(self, model, x, y, norm, eps):  # the radius curve: IBP's
        return create_verifier("ibp")._bounds(model, x, y, norm, eps)

    def _verify(self, model, x, y, threat):
        parity = torch.arange(len(x)) % 2 == (1 if self.verified == "odd" else 0)
        verified = create_verifier("ibp").certify(model, x, y, threat) & parity
        if self.counterexample == "none":
            return Verification(verified, torch.zeros_like(verified))
        pgd = create_attack("pgd", norm=threat.norm, eps=threat.eps, steps=50)
        x_adv = pgd.perturb(model, x, y, torch.Generator().manual_seed(0))
        pred = model(x_adv).argmax(1)
        falsified = (pred != y).cpu() & ~verified
        if self.counterexample == "outside":
            clean = model(x).argmax(1)
            for i in falsified.nonzero()[:, 0].tolist():  # a test image the model gives another class
                x_adv[i] = x[(clean != y[i]).nonzero()[0, 0]]
        return Verification(verified, falsified, counterexamples=x_adv, subdomains=falsified.long() * 7)


DIGITS = DataSpec("digits")
MODEL = ModelSpec("test-bracket-mlp")
STANDARD = DefenseSpec("standard", {"epochs": 4, "batch_size": 32, "lr": 1e-2})
ATTACK = AttackSpec("least-likely")  # a weak attack: the fake's PGD breaks points it leaves
A = AttackSpec("test-fake-bab", {"verified": "even", "counterexample": "none"})
B = AttackSpec("test-fake-bab")  # odd points verified, PGD counterexamples
OUTSIDE = AttackSpec("test-fake-bab", {"counterexample": "outside"})


def _cell(spec: AttackSpec, eps: float, kind: str = "") -> Cell:
    return Cell(DIGITS, MODEL, STANDARD, spec, ThreatModel("linf", eps), N, kind=kind)


def _evasion() -> list[Cell]:
    return [_cell(ATTACK, EPS), _cell(ATTACK, TINY)]


def _verifiers(*specs: AttackSpec) -> list[Cell]:
    return [_cell(s, EPS, "certified") for s in specs] + [_cell(AttackSpec("ibp"), TINY, "certified")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs over one trained model (its cache copied): verifiers A then B; B then A with the
    certified cells first in the plan; B alone, then everything in a second run; the rejected
    counterexample; and no verifier at all."""
    root = tmp_path_factory.mktemp("bracket")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evasion_kind, "ESCALATION", None)
        plans = {
            "ab": [Plan("ab", tuple(_evasion() + _verifiers(A, B)))],
            "ba": [Plan("ba", tuple(_verifiers(B, A) + _evasion()))],
            "split": [Plan("b", tuple(_verifiers(B)[:1])), Plan("all", tuple(_evasion() + _verifiers(A, B)))],
            "outside": [Plan("out", (_cell(ATTACK, EPS), _cell(OUTSIDE, EPS, "certified")))],
            "plain": [Plan("plain", (_cell(ATTACK, EPS),))],
        }
        out = {}
        for name, steps in plans.items():
            workdir = root / name
            if name != "ab":
                shutil.copytree(root / "ab" / "models", workdir / "models")
            for plan in steps:
                run_plan(plan, workdir=workdir, progress=False)
            with Store(workdir / "store.sqlite") as s:
                out[name] = (workdir, s.rows())
    return out


def _wide(rows, eps: float = EPS) -> pd.DataFrame:
    return leaderboard.wide_tables(rows)[f"digits_linf_{eps:g}"]


def _stored(workdir, row):
    with Store(workdir / "store.sqlite") as s:
        return s.get(row.key)


def test_a_row_with_verifiers_carries_the_bracket_columns_and_a_falsified_point_lowers_the_worst_case(runs):
    workdir, rows = runs["ab"]
    wide = _wide(rows).iloc[0]
    cols = list(_wide(rows).columns)
    at = cols.index("worst_class")
    assert cols[at + 1 : at + 5] == ["certified", "undecided", "exact", "falsified_by"]
    attack = next(r for r in rows if r.attack == "least-likely" and r.eps == EPS)
    fake = next(r for r in rows if r.kind == "certified" and r.attack == "test-fake-bab" and "even" not in r.attack_params)
    _, attacked = _stored(workdir, attack)
    falsified = torch.zeros(N, dtype=torch.bool)
    falsified[json.loads(fake.metrics)["_falsified"]] = True
    lowered = int((falsified & attacked).sum())
    assert lowered > 0  # the premise: the fake's PGD broke points the weak attack left robust
    assert wide["worst_case"] == pytest.approx(float((attacked & ~falsified).float().mean()))
    assert wide["worst_case"] < attack.robust_acc
    assert wide["falsified_by"] == f"test-fake-bab:{lowered}"  # the verifier that found them, named
    # certified = the per-point union of the two verifiers = IBP's certified points here
    data = load("digits")
    model = train_or_load(MODEL, create_defense(STANDARD.name, **STANDARD.params), data, ModelCache(workdir / "models"),
                          progress=False).model
    x, y = data.test.x[:N], data.test.y[:N]
    ibp = create_verifier("ibp").certify(model, x, y, ThreatModel("linf", EPS))
    assert 0 < wide["certified"] == pytest.approx(float(ibp.float().mean()))
    assert all(r.robust_acc < wide["certified"] for r in rows if r.kind == "certified" and r.eps == EPS)  # each half
    assert wide["undecided"] == pytest.approx(wide["worst_case"] - wide["certified"]) and wide["undecided"] > 0
    assert not wide["exact"] and checks.CERTIFIED_BROKEN not in wide["flags"]
    # the counterexamples are stored beside the row (never in a CSV): inside the ball and misclassified
    index, x_adv = counterexamples(fake)
    assert torch.equal(index, falsified.nonzero()[:, 0])
    assert float((x_adv - x[index]).abs().max()) <= EPS * (1 + 1e-4) + 1e-6
    assert bool((model(x_adv).argmax(1) != y[index]).all())
    assert json.loads(fake.metrics)["subdomains"] == 7 * len(index)
    assert "_counterexamples" not in leaderboard.tables(rows)["digits_certified"].columns


def test_nothing_undecided_is_exact(runs):
    _, rows = runs["ab"]
    tiny = _wide(rows, TINY).iloc[0]
    assert tiny["certified"] == pytest.approx(tiny["worst_case"]) and tiny["undecided"] == 0 and tiny["exact"]


@pytest.mark.parametrize("other", ["ba", "split"])
def test_the_bracket_does_not_depend_on_which_verifier_kind_or_run_came_first(runs, other):
    _, rows = runs["ab"]
    _, again = runs[other]
    for eps in (EPS, TINY):
        drop = ["seconds"]
        pd.testing.assert_frame_equal(_wide(rows, eps).drop(columns=drop), _wide(again, eps).drop(columns=drop))
    union = {r.attack_params: json.loads(r.metrics)["union_acc"] for r in rows if r.kind == "certified"}
    assert union == {r.attack_params: json.loads(r.metrics)["union_acc"] for r in again if r.kind == "certified"}
    assert len(set(union.values())) == 2  # one union per threat, whichever cell ran first


def test_a_counterexample_outside_the_ball_is_rejected_and_never_lowers_the_worst_case(runs):
    _, rows = runs["outside"]
    _, plain = runs["plain"]
    fake = next(r for r in rows if r.kind == "certified")
    metrics = json.loads(fake.metrics)
    assert metrics["rejected"] > 0 and metrics["falsified_acc"] == 0 and not metrics["_falsified"]
    assert checks.COUNTEREXAMPLE_REJECTED in fake.flags
    wide, before = _wide(rows).iloc[0], _wide(plain)
    assert wide["falsified_by"] == "" and checks.COUNTEREXAMPLE_REJECTED in wide["flags"]
    # a row without a verifier keeps exactly the old columns; with one, their values are unchanged
    assert list(before.columns) == OLD_COLUMNS
    same = [c for c in OLD_COLUMNS if c not in ("seconds", "flags")]
    pd.testing.assert_series_equal(wide[same], before.iloc[0][same], check_names=False)


def test_a_rerun_computes_nothing_and_changes_nothing(runs):
    workdir, rows = runs["ab"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evasion_kind, "ESCALATION", None)
        summary = run_plan(Plan("ab", tuple(_evasion() + _verifiers(A, B))), workdir=workdir, progress=False)
    assert summary.computed == 0
    with Store(workdir / "store.sqlite") as s:
        assert sorted(s.rows(), key=lambda r: r.key) == sorted(rows, key=lambda r: r.key)


def test_the_report_draws_the_bracket_bar_and_marks_exact_rows_with_names_escaped(runs, tmp_path):
    _, rows = runs["ab"]
    from dataclasses import replace

    evil = [replace(r, defense="<b>evil</b>") for r in rows]
    html_path, md_path = write_report(evil, tmp_path)
    text = html_path.read_text()
    assert text.count("class='bracket'") == 2  # one bar per row with a verifier (two threats)
    assert "class='proven'" in text and "class='undecided'" in text and "<span class='exact'>exact</span>" in text
    assert "<b>evil</b>" not in text and "&lt;b&gt;evil&lt;/b&gt;" in text
    assert "bracket \\[certified, attacked\\]" in md_path.read_text()  # Markdown-escaped brackets: the same text rendered
