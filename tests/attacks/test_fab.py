"""FAB (Croce & Hein, ICML 2020): the exact projection onto hyperplane ∩ box, minimum-norm outputs,
the fixed-eps early stop, and strength against the original (pyautoattack's FAB) on digits."""

from __future__ import annotations

import pytest
import torch
from robustbench_lite.attacks._fab import project_hyperplane_box

from robustbench_lite import Norm, create_attack

cp = pytest.importorskip("cvxpy")

P = {Norm.LINF: "inf", Norm.L2: 2, Norm.L1: 1}


def _problems(seed: int, count: int = 12, d: int = 10):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.rand(1, d, generator=gen, dtype=torch.float64)
        x[0, :3] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # pixels at the box's faces
        w = torch.randn(1, d, generator=gen, dtype=torch.float64)
        w[0, 4] = 0.0
        b = torch.randn(1, generator=gen, dtype=torch.float64) * 0.5
        yield x, w, b


@pytest.mark.parametrize("norm", list(P))
def test_projection_is_the_smallest_step_onto_the_hyperplane_inside_the_box(norm):
    solved = 0
    for x, w, b in _problems(int(norm is Norm.L2) + 2 * int(norm is Norm.L1)):
        delta = project_hyperplane_box(norm, x, w, b)
        z = x + delta
        v = cp.Variable(x.shape[1])
        xn, wn = x.numpy()[0], w.numpy()[0]
        prob = cp.Problem(cp.Minimize(cp.norm(v, P[norm])), [wn @ (xn + v) + b.item() == 0, xn + v >= 0, xn + v <= 1])
        prob.solve()
        if prob.status != "optimal":  # out of reach: every coordinate at its room, towards the plane
            continue
        solved += 1
        assert abs(float((w * z).sum() + b)) < 1e-9 and float(z.min()) >= -1e-12 and float(z.max()) <= 1 + 1e-12
        assert float(norm.geometry.distance(delta)) <= prob.value + 1e-6
    assert solved >= 6


def test_projection_out_of_reach_stops_at_the_box_point_closest_to_the_hyperplane():
    x = torch.tensor([[0.2, 0.7, 0.5, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0, 0.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([-100.0], dtype=torch.float64)  # <w, z> = 100 is far outside the box's reach
    for norm in P:
        z = x + project_hyperplane_box(norm, x, w, b)
        assert torch.allclose(z, torch.tensor([[1.0, 0.0, 0.5, 1.0]], dtype=torch.float64)), norm


@pytest.fixture(scope="module")
def points(digits):
    return digits.test.x[:48], digits.test.y[:48]


EPS = {Norm.LINF: 0.15, Norm.L2: 1.0, Norm.L1: 3.0}


@pytest.mark.parametrize("name", ["fab", "fab-t"])
@pytest.mark.parametrize("norm", list(P))
def test_fab_reports_each_points_closest_adversarial_and_its_distance(name, norm, digits_model, points):
    x, y = points
    kw = {"n_targets": 3} if name == "fab-t" else {}
    out = create_attack(name, norm=norm, eps=EPS[norm], steps=20, **kw).run(digits_model, x, y)
    d = out.distances
    with torch.no_grad():
        correct = digits_model(x).argmax(1) == y
        fooled = digits_model(out.x_adv).argmax(1) != y
    assert bool((d[~correct] == 0).all())
    assert float(torch.isfinite(d[correct]).float().mean()) >= 0.9  # a boundary is found for nearly every point
    inside = correct & (d <= EPS[norm])
    # the images within eps are the adversarials at the distance reported; the others come back unchanged
    assert bool(fooled[inside].all())
    assert torch.allclose(norm.geometry.distance(out.x_adv - x)[inside], d[inside], rtol=1e-5, atol=1e-6)
    assert torch.equal(out.x_adv[correct & ~inside], x[correct & ~inside])
    assert out.grad_evals > 0


@pytest.mark.parametrize("name", ["fab", "fab-t"])
def test_early_stop_keeps_the_verdict_at_eps_for_less_work(name, digits_model, points):
    x, y = points
    kw = {"n_targets": 3} if name == "fab-t" else {}
    full = create_attack(name, eps=0.15, steps=20, **kw).run(digits_model, x, y)
    fast = create_attack(name, eps=0.15, steps=20, early_stop=True, **kw).run(digits_model, x, y)
    assert torch.equal(full.distances <= 0.15, fast.distances <= 0.15)
    assert fast.grad_evals < full.grad_evals


def test_fab_t_with_more_targets_than_classes_names_the_fix(digits_model, points):
    x, y = points
    with pytest.raises(ValueError, match="lower n_targets"):
        create_attack("fab-t", eps=0.1, n_targets=10, steps=2).run(digits_model, x, y)


@pytest.mark.parametrize("norm", list(P))
def test_fab_is_at_least_as_strong_as_the_original(norm, digits_model, points):
    """pyautoattack's FAB (one run from the clean point, the same 30 iterations and α_max, η, β):
    ours finds an adversarial for at least as many points, at a median distance no more than 1%
    larger on the points both break."""
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    x, y = points
    ours = create_attack("fab", norm=norm, eps=EPS[norm], steps=30).run(digits_model, x, y).distances
    ref = fab_pt.FABAttack_PT(digits_model, norm={Norm.LINF: "Linf", Norm.L2: "L2", Norm.L1: "L1"}[norm], n_restarts=1,
                              n_iter=30, eps=EPS[norm], seed=0, device="cpu")
    adv = ref.attack_single_run(x, y)
    with torch.no_grad():
        correct = digits_model(x).argmax(1) == y
        ref_d = torch.where(digits_model(adv).argmax(1) != y, norm.geometry.distance(adv - x), torch.tensor(float("inf")))
    both = correct & torch.isfinite(ours) & torch.isfinite(ref_d)
    assert int(torch.isfinite(ours[correct]).sum()) >= int(torch.isfinite(ref_d[correct]).sum())
    assert float(ours[both].median()) <= float(ref_d[both].median()) * 1.01
