"""The complete verifier ``bab`` (β-CROWN branch and bound): on random and trained networks,
Sequential and residual (at most 48 ReLUs), with no budget it decides every instance and agrees
with an exact MILP; its bounds are sound; every falsified point's example is re-checked here; the
β multipliers and the LP leaves are both needed; budgets, starts and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from certify_exact import ResidualCNN, ResidualMLP, margins, milp_min_margin, mlp, random_mlp, trained
from torch import nn

from robustbench_lite import ThreatModel, create_attack
from robustbench_lite.certify import InputSet, Status, create_verifier, layer_bounds, parse_network
from robustbench_lite.certify._beta import Layout, optimize

# (name, model, input shape, [(point, eps)]): each eps sits within 3-7% of the point's exact
# robust radius (found offline by bisection on the MILP), below it (robust) or above (broken),
# where CROWN alone does not decide and the search has to branch.
CASES = [
    ("random-mlp-30", lambda: random_mlp(22, 4, (10, 10, 10)), (1, 2, 2), [(0, 0.2699), (0, 0.2865), (1, 0.0952)]),
    ("trained-mlp-16", lambda: trained(mlp(4, 4, (8, 8)), (1, 2, 2), 4), (1, 2, 2), [(0, 0.1962)]),
    ("random-residual-mlp-24", lambda: ResidualMLP(7, 4, 8).double().eval(), (1, 2, 2),
     [(0, 0.3714), (0, 0.4251), (2, 0.3144)]),
    ("trained-residual-mlp-24", lambda: trained(ResidualMLP(8, 4, 8), (1, 2, 2), 8), (1, 2, 2), [(2, 0.0529), (0, 0.1568)]),
    ("trained-residual-cnn-48", lambda: trained(ResidualCNN(10), (1, 4, 4), 10), (1, 4, 4), [(1, 0.0133), (0, 0.0656)]),
]


def _points(shape):
    return torch.rand(6, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def instances():
    out = []
    for name, build, shape, picks in CASES:
        model = build()
        x = _points(shape)
        y = model(x).argmax(1)
        for b, eps in picks:
            out.append((name, model, x[b : b + 1], y[b : b + 1], eps))
    return out


def _pick(instances, name: str, eps: float):
    return next(i for i in instances if i[0] == name and i[4] == eps)


def _recheck(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, example: torch.Tensor) -> None:
    """The example is in the ball ∩ [0, 1] and misclassified in float32 and in float64."""
    assert example.dtype == torch.float32 and not bool(torch.isnan(example).any())
    assert float((example.double() - x.double()).abs().max()) <= eps
    assert float(example.min()) >= 0 and float(example.max()) <= 1
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32):
            logits = copy.deepcopy(model).to(dtype).eval()(example[None].to(dtype))
            assert int(logits.argmax(1)[0]) != int(y[0])


def test_bab_without_a_budget_decides_every_instance_and_agrees_with_the_milp(instances):
    bab = create_verifier("bab", timeout=1e9, max_subdomains=10**9)
    branched = 0
    for name, model, x, y, eps in instances:
        exact = {c: milp_min_margin(model, x[0], int(y[0]), c, eps)[0] for c in range(3) if c != int(y[0])}
        robust = min(exact.values()) > 0
        d = bab.decide(model, x, y, ThreatModel("linf", eps))
        v = d.verification
        assert v.status()[0] is (Status.VERIFIED if robust else Status.FALSIFIED), (name, eps, exact)
        for c, value in exact.items():
            assert float(d.lower[0, c]) <= value + 1e-9, (name, eps, c)  # sound
        if robust:
            assert bool((d.lower[0] > 0).all())
        else:
            _recheck(model, x, y, eps, v.counterexamples[0])
            assert float(margins(model, v.counterexamples.double(), int(y[0])).max()) > 0
        branched += int(v.subdomains[0]) > 2
    assert branched >= 8  # the search did the deciding, not CROWN or the first attack


def test_dropping_the_beta_multipliers_loosens_the_bounds_of_split_subdomains():
    model = ResidualMLP(7, 4, 8).double().eval()
    x, eps = _points((1, 2, 2))[:1], 0.3714
    y = model(x).argmax(1)
    net = parse_network(model, x)
    inset = InputSet.make(x, ThreatModel("linf", eps).norm, torch.full((1,), eps, dtype=torch.float64))
    bounds, _ = layer_bounds(net, inset, "crown")
    layout = Layout.make(net, inset, bounds)
    assert layout.size >= 4
    patterns = torch.cartesian_prod(*[torch.tensor([1, -1])] * 4).to(torch.int8)  # the first 4 unstable ReLUs split
    signs = torch.zeros(len(patterns), layout.size, dtype=torch.int8)
    signs[:, :4] = patterns
    c = (int(y[0]) + 1) % 3
    spec = (torch.eye(3, dtype=torch.float64)[y] - torch.eye(3, dtype=torch.float64)[c]).expand(len(signs), 3)
    alpha = layout.root_alpha().expand(len(signs), -1)
    with_beta = optimize(layout, spec, signs, alpha, torch.zeros_like(alpha), 30, 0.1, 0.05, use_beta=True)[0]
    without = optimize(layout, spec, signs, alpha, torch.zeros_like(alpha), 30, 0.1, 0.05, use_beta=False)[0]
    gain = with_beta - without  # the split constraints tighten the bound (projected gradient ascent on
    assert float((gain > 0).double().mean()) >= 0.75  # both: the two trajectories may end a little apart)
    assert float(gain.mean()) > 0.05 and float(gain.max()) > 0.3 and float(gain.min()) > -0.01
    assert int((with_beta > 0).sum()) > int((without > 0).sum())  # subdomains closed only with beta


def test_skipping_the_lp_leaves_leaves_instances_undecided(instances):
    undecided = 0
    for name, model, x, y, eps in instances:
        if name == "random-residual-mlp-24":
            d = create_verifier("bab", timeout=1e9, lp_leaves=False).decide(model, x, y, ThreatModel("linf", eps))
            assert d.verification.status()[0] is not Status.VERIFIED or bool((d.lower > 0).all())
            undecided += d.verification.status()[0] is Status.UNDECIDED
    assert undecided >= 1


def test_a_budget_leaves_a_hard_point_undecided_never_guessed(instances):
    name, model, x, y, eps = _pick(instances, "random-mlp-30", 0.2699)  # robust, 13 subdomains without a budget
    d = create_verifier("bab", max_subdomains=4, batch=2).decide(model, x, y, ThreatModel("linf", eps))
    assert d.verification.status() == [Status.UNDECIDED] and 0 < int(d.verification.subdomains[0]) <= 4 + 2
    assert bool((d.lower[0] <= 0).any())
    v = create_verifier("bab", timeout=1e-6).verify(model, x, y, ThreatModel("linf", eps))
    assert v.status() == [Status.UNDECIDED]


def test_starts_are_checked_first_and_only_real_counterexamples_count(instances):
    name, model, x, y, eps = _pick(instances, "random-mlp-30", 0.2865)  # broken
    v = create_verifier("bab").verify(model, x, y, ThreatModel("linf", eps))
    assert v.status() == [Status.FALSIFIED]
    again = create_verifier("bab", attack_restarts=0).verify(model, x, y, ThreatModel("linf", eps),
                                                              starts=v.counterexamples.double())
    assert again.status() == [Status.FALSIFIED] and int(again.subdomains[0]) == 0  # the start did it
    torch.testing.assert_close(again.counterexamples, v.counterexamples)
    outside = (x + 2 * eps).clamp(0, 1)  # clipped into the ball, then checked: not a counterexample by itself
    nan = torch.full_like(x, float("nan"))
    for starts in (outside, nan):
        got = create_verifier("bab").verify(model, x, y, ThreatModel("linf", eps), starts=starts)
        assert got.status() == [Status.FALSIFIED]
        _recheck(model, x, y, eps, got.counterexamples[0])
    with pytest.raises(ValueError, match="starts must be a float tensor of the points' shape"):
        create_verifier("bab").verify(model, x, y, ThreatModel("linf", eps), starts=x[0])
    # an incomplete verifier ignores starts: it verifies what it certifies and falsifies nothing
    crown = create_verifier("crown").verify(model, x, y, ThreatModel("linf", eps), starts=v.counterexamples.double())
    assert crown.status() == [Status.UNDECIDED]


@pytest.mark.parametrize("kwargs,match", [
    ({"timeout": 0}, "timeout"), ({"timeout": -1.0}, "timeout"), ({"max_subdomains": 0}, "max_subdomains"),
    ({"batch": 1}, "batch"),
])
def test_a_budget_of_zero_or_less_is_refused_naming_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_verifier("bab", **kwargs)


def test_other_norms_are_refused_and_a_train_mode_model_is_decided_in_eval_mode(instances):
    name, model, x, y, eps = _pick(instances, "trained-residual-cnn-48", 0.0133)  # batch norms
    with pytest.raises(ValueError, match="bab bounds linf balls, not l2"):
        create_verifier("bab").decide(model, x, y, ThreatModel("l2", 0.1))
    want = create_verifier("bab").decide(model, x, y, ThreatModel("linf", eps))
    model.train()
    got = create_verifier("bab").decide(model, x, y, ThreatModel("linf", eps))
    assert all(m.training for m in model.modules())
    model.eval()
    assert got.verification.status() == want.verification.status()
    torch.testing.assert_close(got.lower, want.lower)


def test_on_a_certified_trained_cnn_bab_verifies_more_than_crown_and_attacks_break_none_of_it(certified_model, digits):
    model, eps = certified_model, 0.05
    x, y = digits.test.x[:60], digits.test.y[:60]
    threat = ThreatModel("linf", eps)
    d = create_verifier("bab", timeout=2.0).verify(model, x, y, threat)
    crown = create_verifier("crown").certify(model, x, y, threat)
    verified, falsified = d.verified, d.falsified
    assert bool((verified >= crown).all()) and int(verified.sum()) > int(crown.sum())
    broken = torch.zeros(len(y), dtype=torch.bool)
    for name, kw in [("pgd", {"steps": 30}), ("apgd-t-dlr", {"steps": 30, "n_targets": 3})]:
        with torch.no_grad():
            broken |= model(create_attack(name, eps=eps, seed=0, **kw).perturb(model, x, y)).argmax(1) != y
    assert not bool((verified & broken).any())
    assert bool((broken <= falsified | d.undecided).all())
    for i in falsified.nonzero()[:, 0].tolist():
        _recheck(model, x[i : i + 1], y[i : i + 1], eps, d.counterexamples[i])
    assert int(d.undecided.sum()) <= 3 and not bool(d.rejected.any())
