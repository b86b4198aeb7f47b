"""The minimum-norm attacks FMN, DDN and DeepFool against adv-lib's at the same number of steps,
on digits (the full-size comparison is ``scripts/bench_min_norm.py``), and HopSkipJump's query
budget and label-only view; their distances are the sizes of real adversarial examples."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from robustbench_lite import LabelOnly, Norm, create_attack

sys.modules.setdefault("visdom", types.ModuleType("visdom"))  # adv-lib imports it for logging only
attacks = pytest.importorskip("adv_lib.attacks")
deepfool_ref = pytest.importorskip("adv_lib.attacks.deepfool")

STEPS = 30
P = {Norm.L0: 0, Norm.L1: 1, Norm.L2: 2, Norm.LINF: math.inf}
REFERENCE = {
    "fmn": lambda m, x, y, norm: attacks.fmn(m, x, y, norm=P[norm], steps=STEPS),
    "ddn": lambda m, x, y, norm: attacks.ddn(m, x, y, steps=STEPS, levels=None),
    "deepfool": lambda m, x, y, norm: deepfool_ref.df(m, x, y, steps=STEPS, norm=P[norm]),
}
PAIRS = [("fmn", n) for n in (Norm.L0, Norm.L1, Norm.L2, Norm.LINF)] + [("ddn", Norm.L2)] + [
    ("deepfool", n) for n in (Norm.L2, Norm.LINF)
]


@pytest.fixture(scope="module")
def points(digits_model, digits):
    """The clean-correct points among the first 160 digits test images."""
    x, y = digits.test.x[:160], digits.test.y[:160]
    with torch.no_grad():
        ok = digits_model(x).argmax(1) == y
    return x[ok], y[ok]


def _judged(model, x, y, x_adv, norm: Norm) -> torch.Tensor:
    """The size of each example the model misclassifies; ``inf`` elsewhere."""
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    d = norm.geometry.distance(x_adv - x)
    return torch.where(fooled, d, torch.full_like(d, math.inf))


@pytest.mark.parametrize("name,norm", PAIRS, ids=[f"{a}-{n.value}" for a, n in PAIRS])
def test_at_least_as_strong_as_adv_lib_at_the_same_steps(name, norm, digits_model, points):
    x, y = points
    ours = create_attack(name, norm=norm, eps=1.0, steps=STEPS).run(digits_model, x, y).distances
    ref = _judged(digits_model, x, y, REFERENCE[name](digits_model, x, y, norm), norm)
    found, ref_found = torch.isfinite(ours), torch.isfinite(ref)
    assert found.float().mean() >= ref_found.float().mean()
    both = found & ref_found
    assert both.sum() > 0.4 * len(x)
    assert float(ours[both].median()) <= 1.01 * float(ref[both].median())


@pytest.mark.parametrize("name,norm", PAIRS + [("hsj", Norm.L2), ("hsj", Norm.LINF)],
                         ids=[f"{a}-{n.value}" for a, n in PAIRS] + ["hsj-l2", "hsj-linf"])
def test_distances_are_sizes_of_real_examples_and_eps_cuts_them(name, norm, digits_model, points):
    x, y = points if name != "hsj" else (points[0][:60], points[1][:60])
    budget = {"queries": 250} if name == "hsj" else {"steps": 10}
    wide = create_attack(name, norm=norm, eps=1e6 if norm is not Norm.LINF else 1.0, **budget).run(digits_model, x, y)
    found = torch.isfinite(wide.distances)
    assert found.float().mean() > 0.8
    judged = _judged(digits_model, x, y, wide.x_adv, norm)
    assert torch.allclose(judged[found], wide.distances[found], rtol=1e-5, atol=1e-6)  # real examples, real sizes
    assert (wide.x_adv[~found] == x[~found]).all()
    eps = float(wide.distances[found].median())
    cut = create_attack(name, norm=norm, eps=eps, **budget).run(digits_model, x, y)
    assert torch.equal(cut.distances, wide.distances)  # the same search; eps only decides what is returned
    inside = cut.distances <= eps
    assert torch.equal(cut.x_adv[inside], wide.x_adv[inside]) and torch.equal(cut.x_adv[~inside], x[~inside])


def test_fmn_l0_budgets_are_whole_pixels(digits_model, points):
    x, y = points
    out = create_attack("fmn", norm="l0", eps=5, steps=20).run(digits_model, x, y)
    d = out.distances[torch.isfinite(out.distances)]
    assert torch.equal(d, d.round()) and (d >= 1).all()


def test_deepfool_overshoot_moves_past_the_boundary(digits_model, points):
    x, y = points
    plain = create_attack("deepfool", norm="l2", eps=10.0, overshoot=0.0, steps=50).run(digits_model, x, y).distances
    pushed = create_attack("deepfool", norm="l2", eps=10.0, steps=50).run(digits_model, x, y).distances
    both = torch.isfinite(plain) & torch.isfinite(pushed)
    assert torch.isfinite(pushed).float().mean() >= torch.isfinite(plain).float().mean()
    assert float(pushed[both].median()) > float(plain[both].median())


def test_deepfool_examples_are_misclassified_beyond_rounding():
    # a linear model with large logits and no overshoot: DeepFool's step lands 1e-4 past the
    # boundary, inside float rounding of logits near 100, so it must step on until the margin
    # is clear (else the example can flip back when the model is evaluated in another batch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.fill_(100.0)
    x = torch.rand(64, 1, 4, 4) * 0.5 + 0.25
    with torch.no_grad():
        y = model(x).argmax(1)
    out = create_attack("deepfool", norm="l2", eps=100.0, overshoot=0.0, steps=50).run(model, x, y)
    assert torch.isfinite(out.distances).all()
    with torch.no_grad():
        logits = model(out.x_adv)
    margin = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(1, y[:, None], -math.inf).amax(1)
    assert (margin < -1e-5 * logits.abs().amax(1)).all()


def test_hsj_keeps_to_its_query_budget_and_more_queries_find_smaller_examples(digits_model, points):
    x, y = points[0][:30], points[1][:30]
    runs = {q: create_attack("hsj", norm="l2", eps=10.0, queries=q).run(digits_model, x, y) for q in (150, 1000)}
    for q, out in runs.items():
        assert out.forward_evals <= q * len(x) and out.grad_evals == 0
    few, many = runs[150].distances, runs[1000].distances
    assert torch.isfinite(many).all()
    assert float(many.median()) < 0.8 * float(few[torch.isfinite(few)].median())


def test_hsj_sees_only_the_label(digits_model, points):
    x, y = points[0][:30], points[1][:30]
    attack = create_attack("hsj", norm="linf", eps=0.3, queries=400)
    whole, labels = attack.run(digits_model, x, y), attack.run(LabelOnly(digits_model), x, y)
    assert torch.equal(whole.x_adv, labels.x_adv) and torch.equal(whole.distances, labels.distances)


def test_bad_settings_get_one_line_naming_the_fix(digits_model, points):
    with pytest.raises(ValueError, match=r"unknown norm 'l3'; use one of .*l0.*l1") as bad_norm:
        create_attack("fmn", norm="l3", eps=1.0)
    with pytest.raises(ValueError, match="ddn supports norm l2, not linf"):
        create_attack("ddn", norm="linf", eps=0.1)
    with pytest.raises(ValueError, match="hsj: queries must be >= 1, got 0") as no_budget:
        create_attack("hsj", queries=0)
    x, y = points
    with pytest.raises(ValueError, match="pgd needs the model's input gradients.*labels.*hsj") as blind:
        create_attack("pgd", eps=0.1).run(LabelOnly(digits_model), x, y)
    with pytest.raises(ValueError, match="square needs the model's output scores"):
        create_attack("square", eps=0.1, queries=10).run(LabelOnly(digits_model), x, y)
    for exc in (bad_norm, no_budget, blind):
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["fmn", "ddn", "deepfool", "hsj"])
def test_the_curve_takes_each_in_one_run_at_the_largest_eps(name, digits_model, digits):
    from robustbench_lite import make_policy
    from robustbench_lite.core.models import predict
    from robustbench_lite.eval.curve import attack_curve

    split = digits.test.head(40)
    correct = predict(digits_model, split.x, "cpu") == split.y
    budget = {"queries": 200} if name == "hsj" else {"steps": 10}
    rec = attack_curve(digits_model, lambda e: create_attack(name, norm="l2", eps=e, **budget), [0.5, 1.0, 1.5], split,
                       correct, policy=make_policy("cpu", "off"))
    assert rec.attacked == int(correct.sum())  # one run, not one per eps
    own = create_attack(name, norm="l2", eps=1.5, **budget).run(digits_model, split.x[correct], split.y[correct])
    expected = torch.where(own.distances <= 1.5, own.distances, torch.full_like(own.distances, math.inf))
    assert torch.allclose(rec.distances[correct], expected, rtol=1e-5, atol=1e-6)
    assert (rec.distances[~correct] == 0).all()
