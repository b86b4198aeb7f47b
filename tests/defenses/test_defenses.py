"""Defenses: properties of each loss, a few training steps lower each defense's loss, and the
convex programs (solver against CVXPY, recovery, certificate against PGD, robust vs standard)."""

from __future__ import annotations

import math

import pytest
import torch
from robustbench_lite.defenses._convex import (
    ConvexProblem,
    load_network,
    project_linf_cone,
    sample_patterns,
    solve,
)
from robustbench_lite.defenses._inner_max import local_linearity_error, maximize
from torch import nn

from robustbench_lite import (
    Data,
    ModelSpec,
    ThreatModel,
    create_attack,
    create_defense,
    create_verifier,
    list_defenses,
    ops,
)
from robustbench_lite.training.defense import Defense, TrainState, lr_factor

# --------------------------------------------------------------------------------------------
# loss properties
# --------------------------------------------------------------------------------------------


def _mlp(seed: int = 0, d: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 10))


def test_vat_lds_is_nonnegative_and_zero_for_a_constant_model(digits):
    from robustbench_lite.defenses.vat import lds

    x = digits.train.x[:64]
    model = _mlp()
    value = lds(model, x, model(x), eps=2.0, xi=1e-2, gen=torch.Generator().manual_seed(0))
    assert value.shape == (64,)
    assert (value >= -1e-7).all() and value.max() > 1e-6
    constant = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(constant[1].weight)
    nn.init.normal_(constant[1].bias)
    flat = lds(constant, x, constant(x), eps=2.0, xi=1e-2, gen=torch.Generator().manual_seed(0))
    assert flat.abs().max() == 0


def test_vat_refuses_a_float32_unsafe_xi():
    with pytest.raises(ValueError, match="xi"):
        create_defense("vat", xi=1e-6)


def test_elle_e_lin_is_zero_for_a_linear_model_and_positive_otherwise(digits):
    x, y = digits.train.x[:64], digits.train.y[:64]
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    logit = lambda logits, lab: logits.gather(1, lab[:, None]).squeeze(1)  # noqa: E731  linear in x
    e = local_linearity_error(linear, x.double(), y, eps=0.3, gen=torch.Generator().manual_seed(0), loss=logit)
    assert e.max() < 1e-20
    e_relu = local_linearity_error(_mlp().double(), x.double(), y, eps=0.3, gen=torch.Generator().manual_seed(0), loss=logit)
    assert e_relu.mean() > 1e-8


def test_mart_and_arow_weights_fall_as_the_true_class_probability_rises():
    from robustbench_lite.defenses.arow import arow_loss
    from robustbench_lite.defenses.mart import boosted_ce, mart_loss
    from robustbench_lite.defenses.trades import robustness_weight, true_class_prob

    y = torch.zeros(50, dtype=torch.long)
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0)).repeat(50, 1)
    logits[:, 0] = torch.linspace(-5, 5, 50)  # true-class logit rises
    p, w = true_class_prob(logits, y), robustness_weight(logits, y)
    assert (p.diff() > 0).all() and (w.diff() < 0).all()
    # the weight multiplies the KL term: MART on the clean point, ARoW on the adversarial one
    adv = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    kl = ops.kl_div(logits, adv)
    torch.testing.assert_close(mart_loss(logits, adv, y, 6.0) - boosted_ce(adv, y), 6.0 * kl * w)
    smooth = nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=0.2)
    torch.testing.assert_close(arow_loss(logits, adv, y, 3.5, 0.2) - smooth, 7.0 * kl * robustness_weight(adv, y))


def test_inner_maximization_stays_in_the_ball_and_raises_the_loss(digits):
    x, y = digits.train.x[:64], digits.train.y[:64]
    model = _mlp()
    ce = lambda logits: ops.ce(logits, y)  # noqa: E731
    x_adv = maximize(model, x, ce, eps=0.1, step=0.025, steps=10, gen=torch.Generator().manual_seed(0))
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert ce(model(x_adv)).mean() > ce(model(x)).mean()


def test_elle_a_lambda_jumps_on_a_spike_and_decays_otherwise():
    d = create_defense("elle-a")
    state = TrainState()
    for v in [1.0, 1.1, 0.9, 1.0, 1.05]:
        d.regularization_weight(v, state)
    assert state.extra["elle_lam"] == 0.0
    assert d.regularization_weight(50.0, state) == 4000.0
    assert d.regularization_weight(1.0, state) == pytest.approx(0.99 * 4000.0)


@pytest.mark.parametrize("total", [1, 7, 100])
def test_learning_rate_schedules(total):
    steps = range(total)
    assert [lr_factor("constant", total)(s) for s in steps] == [1.0] * total
    cosine = [lr_factor("cosine", total)(s) for s in steps]
    assert cosine[0] == 1.0 and all(a >= b for a, b in zip(cosine[:-1], cosine[1:], strict=True))
    cyclic = [lr_factor("cyclic", total)(s) for s in steps]
    peak = cyclic.index(max(cyclic))
    assert max(cyclic) == 1.0 and all(0.0 <= f <= 1.0 for f in cyclic)
    assert all(a < b for a, b in zip(cyclic[:peak], cyclic[1 : peak + 1], strict=True))  # up, then down
    assert all(a >= b for a, b in zip(cyclic[peak:-1], cyclic[peak + 1 :], strict=True))
    if total >= 10:
        assert cyclic[0] < 0.1 and cyclic[-1] < 0.1 and abs(peak - 0.4 * total) <= 1
    with pytest.raises(ValueError, match="cyclic"):
        lr_factor("step", total)


# --------------------------------------------------------------------------------------------
# every registered defense: a few steps lower its training loss on digits
# --------------------------------------------------------------------------------------------

_FAST = {"convex-standard": {"iterations": 200, "max_points": 100, "epochs": 2, "certify_points": 0},
         "convex-robust": {"iterations": 200, "max_points": 100, "epochs": 2, "certify_points": 0, "eps": 0.05}}


@pytest.mark.parametrize("name", list_defenses())
def test_a_few_steps_lower_the_training_loss(name, digits):
    defense = create_defense(name, seed=0, **_FAST.get(name, {}))
    if hasattr(defense, "steps"):  # a short inner search keeps the test fast
        defense = create_defense(name, seed=0, steps=3)
    if type(defense).fit is not Defense.fit:  # not a loss: check its own training curve
        model = ModelSpec("one-hidden-relu", {"hidden": 2 * digits.num_classes * 4}).build(digits)
        log = defense.fit(model, digits, progress=False).epochs
        curve, violation = [r.train_loss for r in log], [r.metrics["violation"] for r in log]
        assert curve[0] == pytest.approx(1.0) and violation[0] == 0  # the all-zero start
        assert curve[-1] < curve[0] and violation[-1] < violation[1], (curve, violation)
        return
    x, y = digits.train.x[:64], digits.train.y[:64]
    model = _mlp()

    def loss() -> float:
        return float(defense.batch_loss(model, x, y, TrainState(gen=torch.Generator().manual_seed(0))).detach())

    before = loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(10):
        out = defense.batch_loss(model, x, y, TrainState(step=step, gen=torch.Generator().manual_seed(step + 1)))
        opt.zero_grad()
        out.backward()
        opt.step()
    after = loss()
    assert math.isfinite(after) and after < before, (before, after)


# --------------------------------------------------------------------------------------------
# convex programs
# --------------------------------------------------------------------------------------------


def _pair(digits: Data, n: int, a: int = 3, b: int = 8):
    sel = (digits.train.y == a) | (digits.train.y == b)
    x = digits.train.x[sel][:n].flatten(1).double()
    y = torch.where(digits.train.y[sel][:n] == a, 1.0, -1.0).double()
    return x, y


def _cvxpy_objective(x: torch.Tensor, y: torch.Tensor, pats: torch.Tensor, beta: float, eps: float) -> float:
    cp = pytest.importorskip("cvxpy")
    xn, yn, dn = x.numpy(), y.numpy(), pats.numpy()
    n, d = xn.shape
    p = dn.shape[1]
    v, w = cp.Variable((p, d)), cp.Variable((p, d))
    r = dn @ (v - w)  # row k: r_k = sum_i d_ik (v_i - w_i)
    margin = cp.multiply(yn, cp.sum(cp.multiply(xn, r), axis=1))
    if eps > 0:
        margin = margin - eps * cp.sum(cp.abs(r), axis=1)
    cons = []
    for i in range(p):
        c = (2 * dn[:, i] - 1)[:, None] * xn
        cons += [c @ v[i] >= eps * cp.norm1(v[i]), c @ w[i] >= eps * cp.norm1(w[i])]
    reg = cp.sum(cp.norm(v, 2, axis=1)) + cp.sum(cp.norm(w, 2, axis=1))
    prob = cp.Problem(cp.Minimize(cp.sum(cp.pos(1 - margin)) / n + beta * reg), cons)
    prob.solve(solver="CLARABEL")
    return float(prob.value)


@pytest.fixture(scope="module")
def small_instance(digits):
    """Digits 3 vs 8, 150 points, 8 patterns, beta 0.03: the standard program solved once."""
    x, y = _pair(digits, 150)
    pats = sample_patterns(x, 8, torch.Generator().manual_seed(0))
    problem = ConvexProblem(x, y[None], pats, 3e-2, 0.0)
    return problem, solve(problem, 3000)


def test_convex_solver_matches_cvxpy(small_instance):
    problem, u = small_instance
    ours = float(problem.objective(u)[0])
    ref = _cvxpy_objective(problem.x, problem.y[0], problem.pats, problem.beta, problem.eps)
    assert abs(ours - ref) / ref <= 1e-3, (ours, ref)
    assert float(problem.violation(u)[0]) < 5e-3  # cone constraints, on pre-activations of size ~1


@pytest.mark.slow
def test_robust_convex_solver_matches_cvxpy(digits):
    x, y = _pair(digits, 150)
    pats = sample_patterns(x, 8, torch.Generator().manual_seed(0))
    problem = ConvexProblem(x, y[None], pats, 3e-2, 0.01)
    u = solve(problem, 4000)
    ours, ref = float(problem.objective(u)[0]), _cvxpy_objective(x, y, pats, 3e-2, 0.01)
    assert abs(ours - ref) / ref <= 1e-3, (ours, ref)
    assert float(problem.violation(u)[0]) < 5e-3


def test_recovered_network_equals_the_convex_model(small_instance):
    problem, u = small_instance
    x = problem.x
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 1, bias=False)).double()
    load_network(net, u)
    with torch.no_grad():
        # equal up to the solver's feasibility tolerance (exactly equal where the cones hold)
        torch.testing.assert_close(net(x)[:, 0], problem.outputs(u)[0], atol=5e-3, rtol=0)
        direct = sum((x @ u[0, i]).clamp_min(0) * s for i, s in enumerate([1.0] * 8 + [-1.0] * 8))
        torch.testing.assert_close(net(x)[:, 0], direct)  # the balanced rescaling changes nothing


def test_linf_cone_projection_is_the_nearest_point():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, generator=gen, dtype=torch.float64), torch.randn(200, 6, generator=gen, dtype=torch.float64)
    lam, mu = project_linf_cone(a, b, 0.5, 0.8)
    assert (lam >= 0).all() and (lam <= 0.8).all() and (mu.abs() <= 0.5 * lam[:, None] + 1e-12).all()
    best = (lam - a) ** 2 + ((mu - b) ** 2).sum(1)
    for _ in range(50):  # random feasible points are never closer
        lt = torch.rand(200, generator=gen, dtype=torch.float64) * 0.8
        mt = (2 * torch.rand(200, 6, generator=gen, dtype=torch.float64) - 1) * 0.5 * lt[:, None]
        assert ((lt - a) ** 2 + ((mt - b) ** 2).sum(1) >= best - 1e-12).all()


@pytest.fixture(scope="module")
def convex_pair(digits):
    """convex-standard and convex-robust on digits (one-vs-rest), trained once."""
    eps = 0.2
    models = {}
    for name in ("convex-standard", "convex-robust"):
        params = {"iterations": 600, "max_points": 400, "epochs": 2, "certify_eps": eps, "beta": 1e-2}
        if name == "convex-robust":
            params["eps"] = eps
        model = ModelSpec("one-hidden-relu", {"hidden": 2 * 10 * 5}).build(digits)
        create_defense(name, **params).fit(model, digits, progress=False)
        models[name] = model
    return eps, models


def _certify(model, x, y, radius):
    return create_verifier("stable-relu").certify(model, x, y, ThreatModel("linf", radius))


def test_no_certified_point_is_broken_by_pgd(convex_pair, digits):
    eps, models = convex_pair
    x, y = digits.test.x, digits.test.y
    for name, model in models.items():
        for radius in (eps, eps / 4, eps / 20):
            cert = _certify(model, x, y, radius)
            x_adv = create_attack("pgd", eps=radius, steps=50, restarts=2).perturb(model, x, y)
            with torch.no_grad():
                broken = model(x_adv).argmax(1) != y
            assert not (cert & broken).any(), f"{name}: {int((cert & broken).sum())} certified points broken"
    assert _certify(models["convex-robust"], x, y, eps / 20).any()  # the check is not vacuous


def test_convex_robust_beats_convex_standard_under_pgd(convex_pair, digits):
    eps, models = convex_pair
    x, y = digits.test.x, digits.test.y
    acc = {}
    for name, model in models.items():
        x_adv = create_attack("pgd", eps=eps, steps=40).perturb(model, x, y)
        with torch.no_grad():
            acc[name] = float((model(x_adv).argmax(1) == y).float().mean())
    assert acc["convex-robust"] > acc["convex-standard"], acc
