"""Strong attacks: APGD (CE, DLR, targeted DLR), ACG, CW-L2 and the diversity index."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from robustbench_lite.attacks._apgd import auto_search, checkpoints, conjugate_beta, search_points
from torch import nn

from robustbench_lite import Norm, ThreatModel, create_attack, evaluate, ops
from robustbench_lite.eval.diversity import compare_diversity, diversity_index


def _correct(model, x, y):
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return x[keep], y[keep]


# ------------------------------------------------------------------------------------------ DLR


def test_dlr_is_invariant_to_shifting_and_positive_scaling_of_logits():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=gen, dtype=torch.float64) * 3  # float64: 1e4·z + 1e3 loses digits in float32
    y = torch.randint(0, 10, (64,), generator=gen)
    t = (y + 1 + torch.randint(0, 9, (64,), generator=gen)) % 10
    for a, b in [(1e-2, 5.0), (7.0, -3.0), (1e4, 1e3)]:
        torch.testing.assert_close(ops.dlr(a * z + b, y), ops.dlr(z, y), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ops.dlr_targeted(a * z + b, y, t), ops.dlr_targeted(z, y, t), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ops.ce(1e4 * z, y), ops.ce(z, y))  # CE is not: the invariance is a property


# ---------------------------------------------------------------------------------------- APGD


def _paper_checkpoints(n: int) -> list[int]:
    """w_j = ceil(p_j N) with exact fractions: p0 = 0, p1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return [math.ceil(q * n) for q in p]


def test_apgd_checkpoints_match_the_paper():
    assert checkpoints(100)[:5] == [0, 22, 41, 57, 70]  # p = 0, .22, .41, .57, .70
    assert checkpoints(100) == _paper_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    for n in (10, 37, 250, 1000):
        want = sorted(set(w for w in _paper_checkpoints(n) if w <= n))
        assert checkpoints(n) == want


def test_conjugate_beta_is_clamped_and_guarded():
    g = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 1.0]])
    g_prev = torch.tensor([[0.0, 1.0], [1.0, 2.0], [0.0, 0.0]])
    s_prev = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-3.0, 0.0]])
    beta = conjugate_beta(g, g_prev, s_prev)
    # row 0: y = (1,-1), <g,y> = 1, <s,y> = 0 -> guarded to 0; row 1: y = 0 -> 0; row 2: 2 / -3 -> clamped 0
    assert beta.tolist() == [0.0, 0.0, 0.0]
    beta = conjugate_beta(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
    assert beta.tolist() == [1.0]  # y = (1, 0): <g,y> = 2, <s,y> = 2


@pytest.mark.parametrize("method", ["apgd", "acg"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_search_keeps_each_points_best_iterate(digits, digits_model, method, loss):
    x, y = _correct(digits_model, digits.test.x[:120], digits.test.y[:120])
    loss_fn = {"ce": ops.ce, "dlr": ops.dlr}[loss]
    eps = 0.03
    start = Norm.LINF.geometry.random_start(x, eps, torch.Generator().manual_seed(1))
    with torch.no_grad():
        res = auto_search(digits_model, x, y, loss_fn, norm=Norm.LINF, eps=eps, steps=30, x_start=start,
                          method=method, stop_on_success=False)
        at_start = loss_fn(digits_model(start), y)
        at_end = loss_fn(digits_model(res.x_adv), y)
    assert (at_end >= at_start - 1e-6).all()
    torch.testing.assert_close(at_end, res.best_loss, rtol=1e-5, atol=1e-5)
    assert (at_end > at_start + 1e-4).float().mean() > 0.5  # the search moved most points uphill
    assert float((res.x_adv - x).abs().max()) <= eps + 1e-6


@pytest.mark.parametrize(("name", "kw"), [("apgd-ce", {}), ("apgd-dlr", {}), ("acg", {"loss": "cw"}),
                                          ("acg", {"loss": "dlr"}), ("acg", {})])
def test_attacks_return_a_point_no_worse_than_the_start(digits, digits_model, name, kw):
    """Points not broken come back at their best iterate; for ACG (start at x) that means a loss
    at least the clean one; APGD's start is random, so compare against a fresh search's start."""
    x, y = _correct(digits_model, digits.test.x[:120], digits.test.y[:120])
    attack = create_attack(name, eps=0.02, steps=20, **kw)
    x_adv = attack.perturb(digits_model, x, y)
    loss_fn = {"ce": ops.ce, "dlr": ops.dlr, "cw": ops.cw_loss}[kw.get("loss", "ce" if name == "acg" else name[5:])]
    with torch.no_grad():
        broken = digits_model(x_adv).argmax(1) != y
        gain = loss_fn(digits_model(x_adv), y) - loss_fn(digits_model(x), y)
    assert broken.any() and (~broken).any(), "eps should leave both broken and robust points"
    if name == "acg":
        assert (gain[~broken] >= -1e-6).all()
    assert (gain[~broken] > 0).float().mean() > 0.8


def test_apgd_l2_and_targeted_dlr_are_at_least_as_strong_as_pgd(digits, digits_model):
    x, y = _correct(digits_model, digits.test.x[:100], digits.test.y[:100])
    pairs = [
        (create_attack("apgd-ce", norm="l2", eps=1.0, steps=20), create_attack("pgd", norm="l2", eps=1.0, steps=20)),
        (create_attack("apgd-t-dlr", eps=0.05, steps=20, n_targets=3), create_attack("pgd", eps=0.05, steps=20)),
    ]
    for attack, pgd in pairs:
        out = attack.run(digits_model, x, y)
        assert attack.norm.geometry.distance(out.x_adv - x).max() <= attack.eps * (1 + 1e-4) + 1e-6
        assert out.grad_evals <= attack.grad_budget * len(x)
        with torch.no_grad():
            acc = float((digits_model(out.x_adv).argmax(1) == y).float().mean())
            acc_pgd = float((digits_model(pgd.perturb(digits_model, x, y)).argmax(1) == y).float().mean())
        assert acc < 0.9 and acc <= acc_pgd + 0.03, (attack.name, acc, acc_pgd)


# ---------------------------------------------------------------------------------------- CW-L2


def test_cw_l2_returns_images_in_range_and_honest_distances(digits, digits_model):
    x, y = digits.test.x[:60], digits.test.y[:60]
    with torch.no_grad():
        clean_wrong = digits_model(x).argmax(1) != y
    unbounded = create_attack("cw-l2", norm="l2", eps=50.0, search_steps=4, steps=40, lr=0.1).run(digits_model, x, y)
    d = unbounded.distances
    assert d is not None and d.shape == (60,)
    assert float(unbounded.x_adv.min()) >= 0.0 and float(unbounded.x_adv.max()) <= 1.0
    found = torch.isfinite(d)
    assert found.float().mean() > 0.7
    assert (d[clean_wrong] == 0).all()
    l2 = (unbounded.x_adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(l2[found], d[found], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (digits_model(unbounded.x_adv[found]).argmax(1) != y[found]).all()
    assert torch.equal(unbounded.x_adv[~found], x[~found])
    # at a finite eps the returned points are the adversarials within eps, the rest are x
    eps = float(d[found & ~clean_wrong].median())
    bounded = create_attack("cw-l2", norm="l2", eps=eps, search_steps=4, steps=40, lr=0.1).run(digits_model, x, y)
    within = bounded.distances <= eps
    assert float(bounded.x_adv.min()) >= 0.0 and float(bounded.x_adv.max()) <= 1.0
    assert torch.equal(bounded.x_adv[~within], x[~within])
    with torch.no_grad():
        robust = digits_model(bounded.x_adv).argmax(1) == y
    assert torch.equal(robust, ~within)


# ------------------------------------------------------------------------- saturated softmax


class _Scaled(nn.Module):
    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


@pytest.mark.slow
def test_saturated_softmax_is_not_reported_robust(digits, digits_model):
    eps = 0.05
    attacks = [create_attack(n, eps=eps, **kw) for n, kw in
               [("fgsm", {}), ("pgd", {}), ("apgd-ce", {}), ("apgd-dlr", {}), ("acg", {"loss": "dlr"})]]
    threat = ThreatModel("linf", eps)
    # adaptive=False: the attack set itself must see through the scaling, without the harness's
    # adaptive rerun (tests/test_trust.py covers that one)
    plain = evaluate(digits_model, attacks, digits.test, n=300, adaptive=False)
    scaled = evaluate(_Scaled(digits_model, 1e4), attacks, digits.test, n=300, adaptive=False)
    wc_plain = float(plain.worst_case[threat].float().mean())
    wc_scaled = float(scaled.worst_case[threat].float().mean())
    assert abs(wc_scaled - wc_plain) <= 0.02, (wc_plain, wc_scaled)
    # the CE attacks are fooled by the scaling (so this test can tell a masking-proof set from one that is not)
    fgsm_scaled = scaled.records[0].robust_acc
    assert fgsm_scaled > wc_scaled + 0.1, (fgsm_scaled, wc_scaled)


# ------------------------------------------------------------------------------ diversity index


def test_diversity_index_on_known_configurations():
    h_max = 10.0
    same = torch.zeros(5, 3)
    assert diversity_index(same, h_max=h_max) == pytest.approx(0.0)
    far = torch.eye(4) * 100.0  # pairwise 141 > h_max: never an edge
    assert diversity_index(far, h_max=h_max) == pytest.approx(1.0)
    a = 4.0  # equilateral triangle of side a: C = 0 below a, 1 from a on
    tri = torch.tensor([[0.0, 0.0], [a, 0.0], [a / 2, a * math.sqrt(3) / 2]])
    assert diversity_index(tri, h_max=h_max) == pytest.approx(a / h_max, abs=1e-6)
    assert diversity_index(tri, eps=3.0) == pytest.approx(a / (6 * math.sqrt(2)), abs=1e-6)  # h_max = 2·eps·√d
    with pytest.raises(ValueError, match="eps"):
        diversity_index(tri)


def test_compare_diversity_of_acg_and_apgd_searches(digits, digits_model):
    x, y = digits.test.x[:8], digits.test.y[:8]
    pts = {m: search_points(digits_model, x, y, ops.ce, method=m, eps=0.05, steps=20, x_start=x.clone())
           for m in ("acg", "apgd")}
    assert pts["acg"].shape == (8, 10, 64)
    cmp = compare_diversity(pts["acg"], pts["apgd"], 0.05)
    assert 0.0 <= cmp["di_a"] <= 1.0 and 0.0 <= cmp["di_b"] <= 1.0
    assert 0.0 <= cmp["a_more_diverse"] <= 1.0
