"""l1-APGD (Croce & Hein, ICML 2021) inside apgd-ce / apgd-dlr / apgd-t-dlr: its sparse step and
start, its budget, its settings, and its strength against the original AutoAttack APGD-L1.
(The attack contract tests cover the L1 cases of every attack whose ``norms`` list L1.)"""

from __future__ import annotations

import logging

import pytest
import torch
from robustbench_lite.attacks._apgd_l1 import l1_apgd_start, sparse_step
from robustbench_lite.attacks.apgd import APGD, SEARCHES

from robustbench_lite import Norm, create_attack
from robustbench_lite.core.registry import ATTACKS

GEO = Norm.L1.geometry


@pytest.fixture(scope="module")
def points(digits, digits_model):
    """The clean-correct digits test points."""
    x, y = digits.test.x, digits.test.y
    with torch.no_grad():
        ok = digits_model(x).argmax(1) == y
    return x[ok], y[ok]


def _robust(model, x_adv, y) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def test_sparse_step_moves_the_top_k_coordinates_that_are_free_to_move():
    x = torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.0, 0.2]]).view(1, 1, 2, 3)
    g = torch.tensor([[-9.0, 8.0, 3.0, -2.0, 1.0, 0.5]]).view(1, 1, 2, 3)  # the two largest are pinned
    assert sparse_step(g, x, torch.tensor([2.0])).flatten().tolist() == [0.0, 0.0, 0.5, -0.5, 0.0, 0.0]
    s = sparse_step(g, x, torch.tensor([10.0])).flatten()  # k beyond the free coordinates
    assert torch.allclose(s, torch.tensor([0.0, 0.0, 0.25, -0.25, 0.25, 0.25]))
    assert torch.equal(sparse_step(torch.zeros_like(g), x, torch.tensor([3.0])), torch.zeros_like(g))


def test_start_is_sparse_and_inside_ball_and_box():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    start = l1_apgd_start(x, 2.0, torch.Generator().manual_seed(1))
    assert start.min() >= 0 and start.max() <= 1 and GEO.inside(start - x, 2.0).all()
    assert ((start - x).flatten(1) != 0).sum(1).float().mean() < 32  # a few large coordinates of 64


def test_every_apgd_loss_searches_the_l1_ball_within_its_budget(digits_model, points):
    x, y = points[0][:100], points[1][:100]
    for name, kw in (("apgd-ce", {}), ("apgd-dlr", {}), ("apgd-t-dlr", {"n_targets": 3})):
        attack = create_attack(name, norm="l1", eps=2.0, steps=20, **kw)
        out = attack.run(digits_model, x, y)
        assert GEO.inside(out.x_adv - x, 2.0).all() and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
        assert out.grad_evals <= attack.grad_budget * len(y), name
        assert _robust(digits_model, out.x_adv, y) < 0.6, name  # all 100 were correct before


def test_the_l1_search_is_chosen_by_the_norm_table_and_refuses_momentum():
    assert set(APGD.norms) == set(SEARCHES) and Norm.L1 in SEARCHES
    assert not SEARCHES[Norm.L1].momentum and SEARCHES[Norm.LINF].momentum
    for name in ("apgd-ce", "apgd-dlr", "apgd-t-dlr"):
        assert Norm.L1 in ATTACKS.get(name).norms
    with pytest.raises(ValueError, match="momentum"):
        create_attack("apgd-ce", norm="l1", eps=2.0, momentum=0.5)
    assert create_attack("apgd-ce", norm="linf", eps=0.1, momentum=0.5).momentum == 0.5
    # same settings (and config keys) as in the other norms; only norm and eps differ
    a = create_attack("apgd-ce", norm="l1", eps=2.0)
    assert a.get_params() == {**create_attack("apgd-ce").get_params(), "norm": "l1", "eps": 2.0}


def test_plain_pgd_does_not_claim_l1():
    """PGD's L1 step is the steepest vertex (one coordinate per step), which the box soon stops: a
    weak L1 attack, so PGD leaves L1 out of its norms."""
    assert Norm.L1 not in ATTACKS.get("pgd").norms


def test_at_least_as_strong_as_autoattack_apgd_l1(digits_model, points):
    """Same points, eps, iterations (50) and restarts (1), CE and DLR, two seeds: our robust
    accuracy, averaged over the four runs, is at most AutoAttack's APGDAttack(norm="L1") + 0.005."""
    autopgd = pytest.importorskip("pyautoattack.autopgd_base")
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    x, y = points
    ours = theirs = 0.0
    for loss in ("ce", "dlr"):
        for seed in (0, 1):
            mine = create_attack(f"apgd-{loss}", norm="l1", eps=2.0, steps=50, seed=seed).perturb(digits_model, x, y)
            ref = autopgd.APGDAttack(digits_model, n_iter=50, norm="L1", eps=2.0, seed=seed, loss=loss,
                                     device="cpu").perturb(x, y)
            assert GEO.inside(ref - x, 2.0 * 1.001).all()  # the reference attacks the same ball
            ours += _robust(digits_model, mine, y) / 4
            theirs += _robust(digits_model, ref, y) / 4
    assert ours <= theirs + 0.005, (ours, theirs)
