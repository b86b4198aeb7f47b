"""Square attack: schedule, patterns, no gradients, and strength next to PGD."""

from __future__ import annotations

import copy

import pytest
import torch

from robustbench_lite import EvasionAttack, Norm, create_attack

square_mod = pytest.importorskip("robustbench_lite.attacks.square")


def test_p_schedule_halves_at_the_papers_iterations_rescaled_to_the_budget():
    p = square_mod.p_schedule
    assert p(0.8, 1, 10000) == 0.8 and p(0.8, 10, 10000) == 0.8
    assert p(0.8, 11, 10000) == 0.4 and p(0.8, 51, 10000) == 0.2 and p(0.8, 201, 10000) == 0.1
    assert p(0.8, 9999, 10000) == pytest.approx(0.8 / 2**9)
    # a 1000-query budget reaches the same halvings ten times sooner
    assert p(0.8, 2, 1000) == 0.4 and p(0.8, 999, 1000) == pytest.approx(0.8 / 2**9)


def test_square_side_is_bounded_by_the_image():
    assert square_mod.square_side(0.05, 28, 28) == 6
    assert square_mod.square_side(1.0, 8, 8) == 7
    assert square_mod.square_side(1e-6, 8, 8) == 1


def test_nested_squares_peak_at_the_centre_and_two_halves_have_unit_norm_and_zero_sum():
    pat = square_mod.nested_squares(5, 5)
    assert pat[2, 2] == pat.max() and pat[0, 0] == pat.min()
    assert torch.allclose(pat, pat.flip(0)) and torch.allclose(pat, pat.t())
    halves = square_mod.two_halves(6)
    assert halves.norm() == pytest.approx(1.0, abs=1e-6)
    assert float(halves.sum()) == pytest.approx(0.0, abs=1e-6)


def test_linf_init_is_vertical_stripes_at_eps():
    att = create_attack("square", eps=0.1)
    x = torch.full((4, 1, 8, 8), 0.5)
    delta = att._linf_init(x, torch.Generator().manual_seed(0)) - x
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.1))
    assert torch.equal(delta, delta[:, :, :1, :].expand_as(delta))  # constant down each column


def test_l2_init_and_steps_stay_on_the_eps_sphere_away_from_the_box():
    att = create_attack("square", norm="l2", eps=1.0)
    x = torch.full((4, 1, 8, 8), 0.5)
    gen = torch.Generator().manual_seed(0)
    xb = att._l2_init(x, gen)
    assert torch.allclose(Norm.L2.geometry.distance(xb - x), torch.ones(4), atol=1e-5)
    for p in (0.5, 0.1, 0.02):
        xb = att._l2_step(x, xb, p, gen)
        assert torch.allclose(Norm.L2.geometry.distance(xb - x), torch.ones(4), atol=1e-4)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_square_needs_no_gradient(norm, eps, digits_model, digits):
    """It runs under torch.no_grad on a model whose parameters do not require grad."""
    frozen = copy.deepcopy(digits_model).requires_grad_(False)
    x, y = digits.test.x[:64], digits.test.y[:64]
    att = create_attack("square", norm=norm, eps=eps, queries=200)
    assert att.needs_grad is False
    with torch.no_grad():
        out = att.run(frozen, x, y)
        robust = float((frozen(out.x_adv).argmax(1) == y).float().mean())
        clean = float((frozen(x).argmax(1) == y).float().mean())
    assert out.grad_evals == 0
    assert out.forward_evals <= 200 * len(y)  # within the query budget
    assert robust < clean - 0.2


@pytest.mark.slow
def test_square_linf_comes_close_to_pgd_on_digits(digits_model, digits):
    x, y = digits.test.x[:100], digits.test.y[:100]

    def acc(attack: EvasionAttack) -> float:
        with torch.no_grad():
            return float((digits_model(attack.perturb(digits_model, x, y)).argmax(1) == y).float().mean())

    sq = acc(create_attack("square", eps=0.1, queries=1000))
    pgd = acc(create_attack("pgd", eps=0.1, steps=40))
    assert sq <= pgd + 0.05, (sq, pgd)
