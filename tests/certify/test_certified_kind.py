"""The certified cell kind through the harness: the union column, the radius curve in the report,
the complete verifier's row (started from the saved adversarial examples) and the bracket it
closes, and bad input: an unsupported layer or a model torch.fx cannot trace is an error row for
every verifier (bab included) while the run goes on; a budget of 0 or less is refused by the plan."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robustbench_lite import ModelSpec, ThreatModel, register_model
from robustbench_lite.eval import flags as checks
from robustbench_lite.eval.adversarial import AdvExamples, write_examples
from robustbench_lite.harness.advsave import saved_starts
from robustbench_lite.harness.kinds.certified import counterexamples
from robustbench_lite.harness.presets import Extra, Preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard
from robustbench_lite.report.curves import curve_tables
from robustbench_lite.training.weights import state_fingerprint


@register_model("test-tanh-mlp")
def _tanh_mlp(input_shape, num_classes):
    d = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, num_classes))


class _Branchy(nn.Module):
    """Python control flow on a tensor value: it trains and attacks, but torch.fx cannot trace it."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, k)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        if h.sum() > 0:
            h = h.relu()
        return self.fc2(h)


@register_model("test-branchy-mlp")
def _branchy_mlp(input_shape, num_classes):
    return _Branchy(input_shape[0] * input_shape[1] * input_shape[2], num_classes)


@pytest.fixture(scope="module")
def certified_run(tmp_path_factory):
    eps = 0.03
    threat = ThreatModel("linf", eps)
    ibp = DefenseSpec("ibp", {"eps": eps, "epochs": 4, "warmup_epochs": 1, "ramp_epochs": 2, "batch_size": 64, "lr": 3e-3})
    plan = Preset(
        name="certified-test", description="digits, an IBP-trained cnn-cert-small and a tanh model",
        data=(DataSpec("digits"),), models=(ModelSpec("cnn-cert-small"),), defenses=(ibp,),
        grid=((threat, (AttackSpec("pgd", {"steps": 20}),)),), n=120,
        paired=((ModelSpec("test-tanh-mlp"), DefenseSpec("standard", {"epochs": 1, "batch_size": 64})),
                (ModelSpec("test-branchy-mlp"), DefenseSpec("standard", {"epochs": 1, "batch_size": 64}))),
        extra=(Extra(("ibp", "standard"), threat, (AttackSpec("ibp"), AttackSpec("crown", {"intermediate": "ibp"})), 120,
                     kind="certified"),
               Extra(("ibp", "standard"), threat, (AttackSpec("bab", {"timeout": 2.0}),), 120,
                     kind="certified")),
    ).plan()
    workdir = tmp_path_factory.mktemp("certified")
    run_plan(plan, workdir=workdir, progress=False, save_adv=workdir / "adv")
    with Store(workdir / "store.sqlite") as s:
        return s.rows(), eps


def test_certified_cells_hold_the_union_below_the_worst_case_and_their_curve(certified_run):
    rows, eps = certified_run
    cert = {r.attack: r for r in rows if r.kind == "certified" and r.defense == "ibp" and r.attack != "bab"}
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


@pytest.mark.parametrize("model,words", [("test-tanh-mlp", ("Tanh", "supported layers")),
                                         ("test-branchy-mlp", ("cannot trace", "control flow"))])
def test_an_unsupported_layer_or_untraceable_model_is_an_error_row_naming_it_and_the_run_goes_on(certified_run, model,
                                                                                                 words):
    rows, _ = certified_run
    bad = [r for r in rows if r.kind == "certified" and r.model == model]
    assert sorted(r.attack for r in bad) == ["bab", "crown", "ibp"] and all(r.status == "error" for r in bad)
    first = [r.error.splitlines()[0] for r in bad]  # the line the run logs (the stored error adds a traceback)
    assert all(line.startswith("ValueError: ") and all(w in line for w in words) for line in first), first
    evasion = [r for r in rows if r.kind == "evasion" and r.model == model]
    assert evasion and all(r.status == "ok" for r in evasion)  # the model's attacks still ran
    assert any(r.kind == "certified" and r.status == "ok" for r in rows)  # and the other rows' verifiers


def test_bab_decides_the_row_from_the_saved_examples_and_closes_its_bracket(certified_run):
    rows, eps = certified_run
    bab = next(r for r in rows if r.attack == "bab" and r.status == "ok")
    worst = next(r for r in rows if r.attack == "worst_case" and r.defense == "ibp")
    m = json.loads(bab.metrics)
    index, x_adv = counterexamples(bab)
    assert m["falsified_acc"] * bab.n == pytest.approx(len(index)) and len(index) > 0 and m["subdomains"] > 0
    assert bab.robust_acc + m["falsified_acc"] == pytest.approx(1.0)  # every point decided within 2 s
    assert checks.CERTIFIED_BROKEN not in bab.flags and m["rejected"] == 0
    assert bab.robust_acc <= worst.robust_acc and x_adv.shape[1:] == (1, 8, 8)
    wide = leaderboard.wide_tables(rows)["digits_linf_0.03"].set_index("defense")
    assert wide.loc["ibp", "undecided"] == 0 and wide.loc["ibp", "exact"]
    assert "bab" in wide.loc["ibp", "falsified_by"]


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_a_budget_of_zero_or_less_is_refused_by_the_plan_before_any_work(timeout):
    threat = ThreatModel("linf", 0.03)
    preset = Preset(name="bad-budget", description="", data=(DataSpec("digits"),), models=(ModelSpec("cnn-cert-small"),),
                    defenses=(DefenseSpec("standard", {"epochs": 1}),), grid=((threat, (AttackSpec("fgsm"),)),), n=10,
                    extra=(Extra(("standard",), threat, (AttackSpec("bab", {"timeout": timeout}),), 10, kind="certified"),))
    with pytest.raises(ValueError, match=r"bab: timeout must be > 0.0") as info:
        preset.plan()
    assert "\n" not in str(info.value)


def test_saved_starts_are_the_groups_examples_on_the_threat_and_nan_elsewhere(tmp_path, digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    trained = SimpleNamespace(key="k1", model=model)
    group = SimpleNamespace(trained=trained, data=digits)
    cell = SimpleNamespace(data=SimpleNamespace(name="digits"), model=SimpleNamespace(name="m"),
                           defense=SimpleNamespace(name="d"), attack=SimpleNamespace(name="bab"),
                           threat=ThreatModel("linf", 0.1))
    meta = {"dataset": "digits", "data_fingerprint": digits.test.head(20).fingerprint(), "n": "20", "norm": "linf",
            "eps": "0.1", "attack": "pgd", "attack_params": "{}", "model": "m", "model_key": "k1",
            "state_fingerprint": state_fingerprint(model)}
    x = digits.test.x[:20]
    ex = AdvExamples(torch.tensor([3, 15]), x[[3, 15]] + 0.05, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    write_examples(tmp_path / "digits__m__d__pgd__linf_0.1__aa.safetensors", ex, meta)
    write_examples(tmp_path / "digits__m__d__pgd__linf_0.2__bb.safetensors", AdvExamples(torch.tensor([4]), x[[4]],
                   torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)), {**meta, "eps": "0.2"})
    write_examples(tmp_path / "digits__m__d__pgd__linf_0.1__cc.safetensors", AdvExamples(torch.tensor([5]), x[[5]],
                   torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)), {**meta, "model_key": "other"})
    starts = saved_starts(tmp_path, cell, group, x[:10])  # the first 10 points: index 15 lies beyond them
    assert starts.shape == (10, 1, 8, 8)
    assert torch.equal(starts[3], x[3] + 0.05)
    assert bool(torch.isnan(starts[[i for i in range(10) if i != 3]]).all())  # other threat, other model: not used
    assert saved_starts(tmp_path / "none", cell, group, x[:10]) is None
