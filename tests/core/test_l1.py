"""The L1 threat model: exact projections (against cvxpy, an optimality certificate and a bisection
reference), steepest ascent, random points, and the L1 geometry's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustbench_lite import Norm, ThreatModel
from robustbench_lite.core.l1 import (
    l1_ascent,
    l1_norm,
    l1_random_sphere,
    l1_random_start,
    project_l1_ball,
    project_l1_box,
)

GEO = Norm.L1.geometry


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _box_problem(gen, b=4, d=12, scale=2.0):
    """Points with coordinates exactly at 0 and 1 and next to them, and targets far outside."""
    x = torch.rand(b, d, generator=gen, dtype=torch.float64)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = 0.0, 1.0, 1e-9, 1 - 1e-9
    return x, x + scale * torch.randn(b, d, generator=gen, dtype=torch.float64)


def _support_value(r: torch.Tensor, x: torch.Tensor, eps: float) -> float:
    """``max ⟨r, δ⟩`` over ``‖δ‖₁ ≤ ε, x + δ ∈ [0, 1]``, exactly: a fractional knapsack, filled greedily
    by decreasing ``|rᵢ|`` up to each coordinate's room to the box."""
    room = torch.where(r > 0, 1 - x, x)
    budget, value = eps, 0.0
    for i in r.abs().argsort(descending=True).tolist():
        take = min(float(room[i]), budget)
        value += abs(float(r[i])) * take
        budget -= take
        if budget <= 0:
            break
    return value


def _bisection_reference(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The same projection by a different route: bisection on the multiplier ``λ`` of the clipped soft
    threshold (200 halvings, float64), one sample at a time."""
    w = x_adv - x
    cap = torch.where(w > 0, 1 - x, x)

    def delta(lam: float) -> torch.Tensor:
        return w.sign() * torch.minimum((w.abs() - lam).clamp_min(0), cap)

    if float(delta(0.0).abs().sum()) <= eps:
        return x + delta(0.0)
    lo, hi = 0.0, float(w.abs().max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(delta(mid).abs().sum()) > eps else (lo, mid)
    return x + delta(hi)


# -- projections ------------------------------------------------------------------------------------
def test_box_projection_matches_cvxpy_including_points_at_the_box():
    cp = pytest.importorskip("cvxpy")
    x, x_adv = _box_problem(_gen(1), b=4)
    for eps in (0.05, 0.7, 3.0, 20.0):  # 20: only the box binds
        p = project_l1_box(x_adv, x, eps)
        for i in range(x.shape[0]):
            v = cp.Variable(x.shape[1])
            cons = [cp.norm1(v - x[i].numpy()) <= eps, v >= 0, v <= 1]
            cp.Problem(cp.Minimize(cp.sum_squares(v - x_adv[i].numpy())), cons).solve(
                solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
            assert np.abs(p[i].numpy() - v.value).max() < 1e-6, (eps, i)


def test_box_projection_matches_a_bisection_reference_on_random_points():
    gen = _gen(2)
    for d, eps, scale in ((10, 0.5, 1.0), (64, 2.0, 0.3), (784, 5.0, 0.2), (784, 12.0, 0.05)):
        x, x_adv = _box_problem(gen, b=5, d=d, scale=scale)
        p = project_l1_box(x_adv, x, eps)
        for i in range(5):
            assert torch.allclose(p[i], _bisection_reference(x_adv[i], x[i], eps), atol=1e-9), (d, eps, i)


def test_box_projection_satisfies_the_optimality_condition():
    """``p`` is the projection iff ``p ∈ C`` and ``⟨x_adv − p, q − p⟩ ≤ 0`` for every ``q ∈ C``; the max
    over ``q`` is an exact greedy knapsack, so this check needs no solver."""
    gen = _gen(3)
    for d, eps in ((7, 0.3), (50, 2.0), (300, 5.0), (300, 400.0)):
        x, x_adv = _box_problem(gen, b=3, d=d, scale=0.5)
        p = project_l1_box(x_adv, x, eps)
        for i in range(3):
            r, delta = x_adv[i] - p[i], p[i] - x[i]
            assert _support_value(r, x[i], eps) - float((r * delta).sum()) <= 1e-9 * max(1.0, eps), (d, eps)
            assert float(delta.abs().sum()) <= eps * (1 + 1e-12)
            assert p[i].min() >= 0 and p[i].max() <= 1


def test_box_projection_differs_from_ball_then_clip():
    """Clipping after the ball projection frees budget, so ball-then-clip is not the projection onto
    the intersection; the exact one is at least as close to the target."""
    x = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
    x_adv = torch.tensor([[-2.0, 1.5]], dtype=torch.float64)  # the first coordinate cannot move at all
    exact = project_l1_box(x_adv, x, 0.4)
    naive = (x + project_l1_ball(x_adv - x, 0.4)).clamp(0, 1)
    assert torch.allclose(exact, torch.tensor([[0.0, 0.9]], dtype=torch.float64))
    assert float(l1_norm(naive - x)) < 0.4 - 1e-3  # budget left unused
    assert (exact - x_adv).norm() < (naive - x_adv).norm()


def test_box_projection_is_idempotent_and_keeps_points_of_the_set():
    gen = _gen(4)
    x = torch.rand(5, 1, 6, 6, generator=gen)
    x_adv = (x + torch.randn(5, 1, 6, 6, generator=gen)).clamp(-1, 2)
    p = GEO.project(x_adv, x, 1.5)
    assert p.shape == x.shape and p.dtype == x.dtype
    assert GEO.inside(p - x, 1.5).all() and p.min() >= 0 and p.max() <= 1
    assert torch.allclose(GEO.project(p, x, 1.5), p, atol=1e-6)
    inside = GEO.random_start(x, 1.5, gen)
    assert torch.allclose(GEO.project(inside, x, 1.5), inside, atol=1e-7)


def test_box_projection_takes_one_radius_per_sample_and_rejects_bad_input():
    x, x_adv = _box_problem(_gen(5), b=3)
    eps = torch.tensor([0.1, 1.0, 2.0], dtype=torch.float64)
    p = project_l1_box(x_adv, x, eps)
    for i in range(3):
        assert torch.allclose(p[i], project_l1_box(x_adv[i : i + 1], x[i : i + 1], float(eps[i]))[0])
    # radius 0 is the point itself (a minimum-norm attack's budget of a point misclassified already)
    assert torch.equal(project_l1_box(x_adv, x, torch.tensor([0.0, 1.0, 2.0]))[0], x[0])
    with pytest.raises(ValueError, match="eps"):
        project_l1_box(x_adv, x, -0.1)
    with pytest.raises(ValueError, match="same shape"):
        project_l1_box(x_adv[:, :3], x, 1.0)


def test_ball_projection_matches_cvxpy_and_leaves_the_inside_alone():
    cp = pytest.importorskip("cvxpy")
    v0 = 2 * torch.randn(4, 2, 5, generator=_gen(6), dtype=torch.float64)
    p = GEO.project_ball(v0, 3.0)
    for i in range(4):
        v = cp.Variable(10)
        cp.Problem(cp.Minimize(cp.sum_squares(v - v0[i].flatten().numpy())), [cp.norm1(v) <= 3.0]).solve()
        assert np.abs(p[i].flatten().numpy() - v.value).max() < 1e-5
    assert torch.allclose(GEO.project_ball(p, 3.0), p)
    small = v0 / l1_norm(v0).view(-1, 1, 1) * 2.0
    assert torch.equal(GEO.project_ball(small, 3.0), small)


# -- ascent and random points -----------------------------------------------------------------------
def test_ascent_is_a_unit_vertex_that_maximises_the_inner_product():
    g = torch.randn(8, 3, 4, 4, generator=_gen(7))
    d = GEO.ascent(g)
    assert torch.allclose(GEO.distance(d), torch.ones(8))
    # the max of <g, d> over the unit L1 ball is ||g||_inf
    assert torch.allclose((g * d).flatten(1).sum(1), g.flatten(1).abs().amax(1))
    tie = torch.tensor([0.0, -2.0, 2.0, -2.0]).view(1, 1, 2, 2)
    assert l1_ascent(tie).flatten().tolist() == [0.0, -1.0, 0.0, 0.0]
    assert torch.equal(l1_ascent(torch.zeros(2, 1, 2, 2)), torch.zeros(2, 1, 2, 2))


def test_sphere_points_have_norm_eps_are_uniform_and_repeat_with_the_seed():
    a = GEO.random_sphere((16, 1, 8, 8), 2.5, _gen(8))
    assert torch.equal(a, GEO.random_sphere((16, 1, 8, 8), 2.5, _gen(8)))
    assert torch.allclose(GEO.distance(a), torch.full((16,), 2.5), atol=1e-5)
    # uniform on the sphere: by symmetry every coordinate's mean |δ_i| is eps/d, and signs are balanced
    many = l1_random_sphere((4000, 10), 1.0, _gen(9), dtype=torch.float64)
    assert torch.allclose(many.abs().mean(0), torch.full((10,), 0.1, dtype=torch.float64), atol=0.006)
    assert abs(float((many > 0).double().mean()) - 0.5) < 0.02


def test_starts_lie_in_ball_and_box_and_repeat_with_the_seed():
    x = torch.rand(32, 1, 8, 8, generator=_gen(10))
    x[:, :, 0], x[:, :, 1] = 0.0, 1.0
    for start in (GEO.random_start, GEO.sphere_start):
        s = start(x, 3.0, _gen(11))
        assert torch.equal(s, start(x, 3.0, _gen(11)))
        assert GEO.inside(s - x, 3.0).all() and s.min() >= 0 and s.max() <= 1
        assert not torch.equal(s, x)
    assert torch.equal(l1_random_start(x, 3.0, _gen(12)), GEO.random_start(x, 3.0, _gen(12)))
    noise = GEO.noise((3, 50), _gen(13), torch.float64)
    assert noise.dtype == torch.float64 and (noise > 0).any() and (noise < 0).any()


# -- the threat model -------------------------------------------------------------------------------
def test_l1_parses_with_aliases_and_measures_every_coordinate():
    assert Norm.parse("l1") is Norm.L1 and Norm.parse("1") is Norm.L1 and Norm.parse("L-1") is Norm.L1
    t = ThreatModel("l1", 12)
    assert t.norm is Norm.L1 and t.eps == 12.0 and t.label == "l1_12" and t.geometry is GEO
    assert ThreatModel.parse("l1:5") == ThreatModel(Norm.L1, 5.0)
    with pytest.raises(ValueError, match="eps"):
        ThreatModel("l1", 0)
    d = torch.zeros(2, 3, 2, 2)
    d[0, 0, 0, 0], d[0, 2, 1, 1], d[1, 1, 0, 1] = 0.5, -0.25, 1.0  # channels count separately
    assert GEO.distance(d).tolist() == [0.75, 1.0]
    assert GEO.inside(d, 0.75).tolist() == [True, False]
