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


def test_linf_proposals_change_one_window_to_x_plus_or_minus_eps():
    att = create_attack("square", eps=0.1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 12, 12)
    xb = att._linf_init(x, gen)
    for p in (0.3, 0.05, 0.005):
        w = att._linf_proposal(x, xb, p, gen)
        cand = w.paste(xb)
        assert w.side == square_mod.square_side(p, 12, 12) and w.values.shape == (32, 1, w.side, w.side)
        inside = square_mod.window_mask(w.rows, w.cols, w.side, 12, 12)
        assert torch.equal(cand[~inside.expand_as(cand)], xb[~inside.expand_as(xb)])  # the rest stays
        win = cand[inside.expand_as(cand)]
        xs = x[inside.expand_as(x)]
        up, down = (xs + 0.1).clamp(0, 1), (xs - 0.1).clamp(0, 1)
        assert torch.all(torch.isclose(win, up) | torch.isclose(win, down))
        assert ((cand - xb).flatten(1).abs().amax(1) > 0).all()  # every proposal changes its image


def test_square_scores_windows_incrementally_with_the_full_passes_numbers(fmnist_model, fmnist, monkeypatch):
    """On a small-cnn (28x28 images) the Linf search scores its small windows with the box scorer; every score
    it uses equals the full model's logits on the candidate image (base images moved on correctly
    as proposals are accepted), and the search ends where a full-pass search ends to within a
    point or two (float rounding can steer a random search differently)."""
    from robustbench_lite.attacks import _incremental

    x, y = fmnist.test.x[:60], fmnist.test.y[:60]
    checked = []
    scorers = []
    plain_scorer = _incremental.window_scorer
    plain_logits = _incremental.BoxScorer.window_logits

    def spy_scorer(model, images):
        scorers.append(plain_scorer(model, images))
        return scorers[-1]

    def checked_logits(self, img, rows, cols, window):
        got = plain_logits(self, img, rows, cols, window)
        base = self.acts[0][img].permute(0, 3, 1, 2)
        cand = square_mod._paste(base, window.permute(0, 3, 1, 2), rows, cols, window.shape[1])
        with torch.no_grad():
            assert torch.allclose(got, fmnist_model(cand), atol=1e-4)
        checked.append(len(img))
        return got

    monkeypatch.setattr(square_mod, "window_scorer", spy_scorer)
    monkeypatch.setattr(_incremental.BoxScorer, "window_logits", checked_logits)
    att = create_attack("square", eps=0.1, queries=300, p_init=0.3)
    inc = att.run(fmnist_model, x, y, torch.Generator().manual_seed(0))
    assert len(checked) > 100  # most of the 300 iterations were scored incrementally
    survivors = (fmnist_model(inc.x_adv).argmax(1) == y)
    base = scorers[0].acts[0].permute(0, 3, 1, 2)
    assert torch.equal(base[survivors], inc.x_adv[survivors])  # the scorer's bases are the search's best points
    monkeypatch.setattr(square_mod.Square, "incremental", False)
    full = att.run(fmnist_model, x, y, torch.Generator().manual_seed(0))
    assert len(scorers) == 1  # the full-pass run built no scorer
    with torch.no_grad():
        robust_inc = int((fmnist_model(inc.x_adv).argmax(1) == y).sum())
        robust_full = int((fmnist_model(full.x_adv).argmax(1) == y).sum())
    assert abs(robust_inc - robust_full) <= 2, (robust_inc, robust_full)
    assert inc.forward_evals <= 300 * len(y) and full.forward_evals <= 300 * len(y)  # one query per candidate
