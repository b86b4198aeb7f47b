"""Universal perturbations, the one-pixel attack and poisoning attacks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from robustbench_lite import (
    DataSplit,
    ModelSpec,
    Norm,
    PoisoningAttack,
    UniversalAttack,
    apply_delta,
    create_attack,
    create_defense,
)
from robustbench_lite.eval.poisoning import evaluate_poisoning
from robustbench_lite.eval.universal import evaluate_universal

UNIVERSAL = [
    ("uap", {"passes": 1, "batch_size": 32}),
    ("sga", {"epochs": 2}),
]
THREATS = [(Norm.LINF, 0.2), (Norm.L2, 1.5)]


@pytest.mark.parametrize("name,kw", UNIVERSAL)
@pytest.mark.parametrize("norm,eps", THREATS)
def test_universal_delta_is_one_tensor_inside_its_ball_for_every_input(digits, digits_model, name, kw, norm, eps):
    attack = create_attack(name, norm=norm, eps=eps, **kw)
    delta = attack.fit(digits_model, digits.train.head(200))
    assert delta.shape == (1, *digits.train.x.shape[1:])
    assert torch.isfinite(delta).all()
    assert float(norm.geometry.distance(delta)[0]) <= eps * (1 + 1e-4)
    x = digits.test.x
    moved = norm.geometry.distance(apply_delta(x, delta) - x)
    assert (moved <= eps * (1 + 1e-4)).all()
    assert float(moved.max()) > 0  # the perturbation is not empty


def test_universal_same_seed_same_delta(digits, digits_model):
    attack = create_attack("sga", eps=0.2, epochs=1, seed=3)
    a = attack.fit(digits_model, digits.train.head(200))
    b = attack.fit(digits_model, (digits.train.x[:200], digits.train.y[:200]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,kw", [("uap", {"passes": 2, "batch_size": 16}), ("sga", {"epochs": 4})])
def test_universal_fooling_rate_beats_random_noise_floor(digits, digits_model, name, kw):
    result = evaluate_universal(digits_model, create_attack(name, eps=0.2, **kw), digits.train.head(400), digits.test)
    assert result.n == len(digits.test)
    assert result.fooling_rate > result.noise_fooling_rate + 0.1, result
    assert result.acc_under_delta < result.clean_acc - 0.1


def test_universal_base_rejects_per_point_or_oversized_perturbations(digits, digits_model):
    @dataclass(frozen=True, kw_only=True)
    class PerPoint(UniversalAttack):
        def _fit(self, model, x, y, gen):
            return torch.zeros_like(x)

    @dataclass(frozen=True, kw_only=True)
    class TooBig(UniversalAttack):
        def _fit(self, model, x, y, gen):
            return torch.full_like(x[:1], 2 * self.eps)

    with pytest.raises(RuntimeError, match="one perturbation"):
        PerPoint(eps=0.1).fit(digits_model, digits.train.head(20))
    with pytest.raises(RuntimeError, match="left the linf ball"):
        TooBig(eps=0.1).fit(digits_model, digits.train.head(20))
    with pytest.raises(TypeError, match="DataSplit"):
        create_attack("sga", eps=0.1).fit(digits_model, 3)


def test_random_sphere_points_have_the_stated_norm():
    gen = torch.Generator().manual_seed(0)
    for norm, eps in ((Norm.LINF, 0.1), (Norm.L2, 1.5)):
        geo = norm.geometry
        assert float(geo.distance(geo.random_sphere((1, 1, 8, 8), eps, gen))[0]) == pytest.approx(eps, rel=1e-5)


# -- one pixel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_one_pixel_changes_at_most_k_pixels(digits, digits_model, k):
    x, y = digits.test.x[:24], digits.test.y[:24]
    attack = create_attack("one-pixel", eps=k, population=40, generations=5)
    out = attack.run(digits_model, x, y)
    changed = (out.x_adv - x).abs().amax(1).flatten(1).gt(0).sum(1)
    assert int(changed.max()) <= k
    assert out.grad_evals == 0 and out.forward_evals > 0
    broken = digits_model(out.x_adv).argmax(1) != y
    clean_wrong = digits_model(x).argmax(1) != y
    assert (changed[broken & ~clean_wrong] >= 1).all()  # a success never comes from an unchanged image


def test_one_pixel_finds_more_with_more_pixels(digits, digits_model):
    x, y = digits.test.x[:60], digits.test.y[:60]
    keep = digits_model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    rates = []
    for k in (1, 5):
        adv = create_attack("one-pixel", eps=k, population=60, generations=6).perturb(digits_model, x, y)
        rates.append(float((digits_model(adv).argmax(1) != y).float().mean()))
    assert rates[1] > rates[0] > 0.0


def test_one_pixel_render_writes_each_value_at_its_pixel():
    from robustbench_lite.attacks.one_pixel import render

    x = torch.zeros(2, 3, 4, 5)
    cand = torch.tensor([[[1.5, 2.2, 0.1, 0.2, 0.3]], [[3.9, 4.9, 1.0, 0.5, 0.0]]])  # one pixel, three channels
    imgs = render(x, cand)
    assert imgs.shape == (2, 3, 4, 5)
    assert imgs[0, :, 1, 2].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert imgs[1, :, 3, 4].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert int((imgs != 0).any(1).sum()) == 2


def test_one_pixel_rejects_other_norms():
    with pytest.raises(ValueError, match="l0"):
        create_attack("one-pixel", norm="linf", eps=0.1)


# -- poisoning ------------------------------------------------------------------------------------

POISONS = [
    ("badnets", {"rate": 0.05, "patch": 2, "eps": 4}),
    ("label-flip", {"rate": 0.1}),
    ("label-flip", {"rate": 0.03, "mode": "targeted", "source": 3, "target": 8}),
    ("feature-collision", {"n_poisons": 3, "steps": 20, "base_class": 0, "target_index": 1}),
]


def _poison(name, kw, digits, model, seed=0):
    attack = create_attack(name, seed=seed, **kw)
    return attack, attack.poison(digits.train, model=model, test=digits.test)


@pytest.mark.parametrize("name,kw", POISONS)
def test_poisoned_split_keeps_length_and_changes_exactly_the_stated_fraction(digits, digits_model, name, kw):
    attack, out = _poison(name, kw, digits, digits_model)
    n = len(digits.train)
    assert len(out) == n and out.x.shape == digits.train.x.shape
    changed = (out.x != digits.train.x).flatten(1).any(1) | (out.y != digits.train.y)
    expected = round(kw["rate"] * n) if "rate" in kw else kw["n_poisons"]
    assert int(changed.sum()) == expected == attack.n_poison(n)
    assert torch.equal(digits.train.x, load_clean(digits).x)  # the input split is untouched


def load_clean(digits):
    from robustbench_lite.core.data import load

    return load("digits").train


@pytest.mark.parametrize("name,kw", POISONS)
def test_same_seed_same_poisons(digits, digits_model, name, kw):
    _, a = _poison(name, kw, digits, digits_model, seed=1)
    _, b = _poison(name, kw, digits, digits_model, seed=1)
    _, c = _poison(name, kw, digits, digits_model, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not (torch.equal(a.x, c.x) and torch.equal(a.y, c.y))


def test_badnets_poisons_carry_the_trigger_and_the_target_label(digits, digits_model):
    attack, out = _poison("badnets", {"rate": 0.05, "patch": 2, "eps": 4, "target": 7}, digits, digits_model)
    changed = (out.y != digits.train.y).nonzero().flatten()
    assert (out.y[changed] == 7).all()
    assert torch.equal(out.x[changed], attack.trigger(digits.train.x[changed]))
    goal = attack.success_points(digits.test)
    assert (goal.y == 7).all() and len(goal) == int((digits.test.y != 7).sum())


def test_badnets_backdoor_works_on_digits(digits):
    defense = create_defense("standard", epochs=8, batch_size=64, lr=3e-3)
    result = evaluate_poisoning(create_attack("badnets", rate=0.1, patch=2, eps=4), digits, defense, spec=ModelSpec("small-cnn"))
    assert result.attack_success_rate > 0.8, result
    assert result.clean_acc > 0.9


def test_poisoning_base_checks_the_stated_rate(digits):
    @dataclass(frozen=True, kw_only=True)
    class Liar(PoisoningAttack):
        def n_poison(self, n_train):
            return 5

        def _poison(self, train, gen, model, test):
            return DataSplit(train.x.clone(), torch.zeros_like(train.y))

    with pytest.raises(RuntimeError, match="rate says 5"):
        Liar().poison(digits.train)
    with pytest.raises(ValueError, match="eps >= 9"):
        create_attack("badnets", patch=3, eps=4)
    with pytest.raises(TypeError, match="test split"):
        create_attack("feature-collision").poison(digits.train, model=torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_last_layer_retraining_changes_only_the_head(digits, digits_model):
    from robustbench_lite.core.data import Data
    from robustbench_lite.eval.poisoning import retrain_last_layer

    defense = create_defense("standard", epochs=30, lr=1e-2)
    small = Data("digits", digits.train.head(300), digits.test, 10)
    for feature_space in (True, False):
        fresh = retrain_last_layer(digits_model, small, defense, feature_space=feature_space)
        before, after = dict(digits_model.named_parameters()), dict(fresh.named_parameters())
        last = list(after)[-2:]
        assert all(torch.equal(before[k], after[k]) for k in after if k not in last)
        assert not torch.equal(before[last[0]], after[last[0]])
        assert (fresh(digits.test.x).argmax(1) == digits.test.y).float().mean() > 0.8


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 15, 13), (1, 8, 8)])
def test_window_scorer_gives_the_full_models_logits(shape):
    from robustbench_lite.attacks._incremental import window_scorer
    from torch import nn

    from robustbench_lite.core.models import Normalize, create_model

    torch.manual_seed(0)
    c, h, w = shape
    if shape == (3, 15, 13):  # BatchNorm, GELU, avg pooling, a 5x5 conv, a 3x3 max pool, odd sizes
        model = nn.Sequential(Normalize([0.5] * 3, [0.2] * 3), nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.GELU(),
                              nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3), nn.Flatten(),
                              nn.Linear(8 * 2 * 2, 10))
        model[2].running_mean.uniform_(-0.5, 0.5)
    else:
        model = create_model("small-cnn", shape, 10)
    model.eval()
    x = torch.rand(4, c, h, w)
    n = 300
    img, rows, cols, vals = torch.randint(0, 4, (n,)), torch.randint(0, h, (n,)), torch.randint(0, w, (n,)), torch.rand(n, c)
    rows[:4], cols[:4] = torch.tensor([0, 0, h - 1, h - 1]), torch.tensor([0, w - 1, 0, w - 1])  # the corners
    full = x[img].clone()
    full[torch.arange(n), :, rows, cols] = vals
    with torch.no_grad():
        got = window_scorer(model, x).logits(img, rows, cols, vals)
        want = model(full)
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        assert (got - model(x[img])).abs().max() > 1e-3  # the candidates do change the logits


@pytest.mark.parametrize("side", [1, 2, 3, 5])
def test_window_scorer_scores_square_windows_and_moves_its_bases(side):
    """A ``side x side`` window at any corner gives the full model's logits, before and after some
    base images are replaced (``rebase``, whose own logits are a full pass's)."""
    from robustbench_lite.attacks._incremental import window_scorer

    from robustbench_lite.core.models import create_model

    torch.manual_seed(side)
    model = create_model("small-cnn", (1, 28, 28), 10).eval()
    x = torch.rand(6, 1, 28, 28)
    scorer = window_scorer(model, x)
    n = 200
    img = torch.randint(0, 6, (n,))
    rows, cols = torch.randint(0, 28 - side + 1, (n,)), torch.randint(0, 28 - side + 1, (n,))
    rows[:2], cols[:2] = torch.tensor([0, 28 - side]), torch.tensor([28 - side, 0])
    window = torch.rand(n, side, side, 1)
    for moved in (False, True):
        if moved:
            new = torch.rand(3, 1, 28, 28)
            with torch.no_grad():
                assert torch.allclose(scorer.rebase(torch.tensor([0, 2, 5]), new), model(new), atol=1e-5)
            x = x.clone()
            x[[0, 2, 5]] = new
        full = x[img].clone()
        for i in range(n):
            full[i, :, rows[i] : rows[i] + side, cols[i] : cols[i] + side] = window[i].permute(2, 0, 1)
        with torch.no_grad():
            got, want = scorer.window_logits(img, rows, cols, window), model(full)
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert 0 < scorer.final_box_share(1) < scorer.final_box_share(8) <= 1


def test_window_scorer_declines_models_it_cannot_window():
    from robustbench_lite.attacks._incremental import window_scorer
    from torch import nn

    x = torch.rand(2, 1, 8, 8)
    assert window_scorer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x) is None
    assert window_scorer(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(10)), x) is None


def test_one_pixel_incremental_and_full_forward_agree(digits, digits_model):
    x, y = digits.test.x[:12], digits.test.y[:12]
    runs = [create_attack("one-pixel", eps=1, population=40, generations=4, incremental=inc).run(digits_model, x, y)
            for inc in (True, False)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert runs[0].forward_evals >= runs[1].forward_evals > 0


def test_one_pixel_triplets_are_distinct_and_cover_every_ordering():
    from robustbench_lite.attacks.one_pixel import distinct_triplets

    t = distinct_triplets(300, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.shape == (300, 4, 3) and int(t.min()) >= 0 and int(t.max()) <= 3
    assert ((t[..., 0] != t[..., 1]) & (t[..., 0] != t[..., 2]) & (t[..., 1] != t[..., 2])).all()
    assert len({tuple(v) for v in t.view(-1, 3).tolist()}) == 24  # all 4 * 3 * 2 ordered triplets occur
