"""The norm geometry's operations for minimum-norm attacks: projections with one radius per point,
the L0 projection, the dual norm and the budget steps (whole pixels for L0)."""

from __future__ import annotations

import pytest
import torch

from robustbench_lite import Norm


def _problem(seed: int = 0, b: int = 5, c: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, 6, 6, generator=gen)
    return x, x + 0.7 * torch.randn(b, c, 6, 6, generator=gen)


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2, Norm.L1, Norm.L0])
def test_one_radius_per_point_equals_each_point_alone(norm):
    x, far = _problem()
    radii = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0]) * (1.0 if norm in (Norm.L0, Norm.L1) else 0.1)
    together = norm.geometry.project(far, x, radii)
    for i in range(len(x)):
        alone = norm.geometry.project(far[i : i + 1], x[i : i + 1], float(radii[i]))
        assert torch.allclose(together[i], alone[0], atol=1e-6)
    assert (norm.geometry.distance(together - x) <= radii + 1e-5).all()
    assert together.min() >= 0 and together.max() <= 1
    assert torch.equal(together[0], x[0])  # radius 0: the point itself


def test_l0_projection_keeps_the_pixels_that_changed_most_and_stays_in_the_box():
    x, far = _problem(1, b=3, c=3)
    p = Norm.L0.geometry.project(far, x, 4)
    changed = (p != x).any(dim=1)
    assert (changed.flatten(1).sum(1) <= 4).all()
    assert p.min() >= 0 and p.max() <= 1
    power = (far - x).pow(2).sum(dim=1).flatten(1)
    top = power.topk(4, dim=1).indices
    for i in range(3):  # kept pixels hold the clipped values, every channel
        kept = changed[i].flatten().nonzero().flatten()
        assert set(kept.tolist()) <= set(top[i].tolist())
        assert torch.equal(p[i].flatten(1)[:, kept], far[i].clamp(0, 1).flatten(1)[:, kept])


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2, Norm.L1])
def test_the_dual_norm_is_the_largest_inner_product_over_the_unit_ball(norm):
    g = torch.randn(7, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    best = (g * norm.geometry.ascent(g)).flatten(1).sum(1)  # the steepest unit step attains the maximum
    assert torch.allclose(norm.geometry.dual_norm(g.flatten(1)), best, rtol=1e-5)
    with pytest.raises(ValueError, match="l0 has no dual norm"):
        Norm.L0.geometry.dual_norm(g.flatten(1))


def test_budget_steps_are_multiplicative_and_whole_pixels_for_l0():
    eps = torch.tensor([0.0, 1.0, 10.0, 40.0])
    assert torch.allclose(Norm.L2.geometry.scale_budget(eps, 1.05), eps * 1.05)
    assert Norm.L0.geometry.scale_budget(eps, 1.05).tolist() == [1.0, 2.0, 11.0, 42.0]
    assert Norm.L0.geometry.scale_budget(eps, 0.95).tolist() == [0.0, 0.0, 9.0, 38.0]
    assert Norm.L0.geometry.discrete and not Norm.L2.geometry.discrete
