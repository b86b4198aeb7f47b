"""Randomized smoothing (certify/smoothing.py, certify/binomial.py) and the gaussian-aug defense:
exact statistics against scipy, CERTIFY/PREDICT on models whose smoothed behaviour is known in closed
form, input checks, and agreement with ART's implementation on a trained model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn

from robustbench_lite import ModelSpec, ThreatModel, create_defense, train_or_load
from robustbench_lite.certify.binomial import (
    all_agree_radius,
    betainc,
    binom_test_half,
    clopper_pearson_lower,
)
from robustbench_lite.certify.smoothing import (
    Smoothing,
    certified_accuracy,
    certify_from_counts,
    noise_counts,
)


class Constant(nn.Module):
    """Always class ``c`` (of ``k``), whatever the input."""

    def __init__(self, c: int, k: int = 10) -> None:
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x):
        out = torch.zeros(len(x), self.k, dtype=x.dtype, device=x.device)
        out[:, self.c] = 1.0
        return out


class NoiseReader(nn.Module):
    """Reads the noise at pixel 0 of an image whose pixel 0 is ``centre``: the class is the bin of
    ``Φ((z - centre) / σ)`` among ``k`` equal bins, so under smoothing at ``σ`` every class has
    probability exactly ``1/k`` (``k = 2``: a 50/50 coin)."""

    def __init__(self, sigma: float, k: int, centre: float = 0.5) -> None:
        super().__init__()
        self.sigma, self.k, self.centre = sigma, k, centre

    def forward(self, x):
        u = special_ndtr((x.reshape(len(x), -1)[:, 0] - self.centre) / self.sigma)
        cls = (u * self.k).long().clamp(0, self.k - 1)
        return nn.functional.one_hot(cls, self.k).to(x.dtype)


def special_ndtr(z):
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def _images(n: int, value: float = 0.5) -> torch.Tensor:
    return torch.full((n, 1, 4, 4), value)


# -- statistics ------------------------------------------------------------------------------------
def test_incomplete_beta_matches_scipy():
    rng = np.random.default_rng(0)
    a, b, x = rng.uniform(0.5, 3000, 300), rng.uniform(0.5, 3000, 300), rng.uniform(0, 1, 300)
    ours = betainc(torch.tensor(a), torch.tensor(b), torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours, special.betainc(a, b, x), rtol=1e-9, atol=1e-12)


def test_incomplete_beta_converges_per_element_in_a_mixed_batch():
    """Each element stops when its own continued fraction has converged; waiting for all elements to
    reach the tolerance at the same iteration would run to the iteration limit on a mixed batch."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(1, 100_000, 400), rng.uniform(1, 100_000, 400)
    x = np.clip(a / (a + b) + rng.normal(0, 0.002, 400), 1e-9, 1 - 1e-9)  # near the mean: the slow region
    ours = betainc(torch.tensor(a), torch.tensor(b), torch.tensor(x), max_iter=5_000).numpy()
    np.testing.assert_allclose(ours, special.betainc(a, b, x), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_lower_bound_matches_scipy_and_never_exceeds_the_exact_bound(n, alpha):
    ks = sorted({0, 1, n // 3, n // 2, max(n - 3, 0), n - 1, n})
    ours = clopper_pearson_lower(torch.tensor(ks), n, alpha).numpy()
    quantile = [stats.beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0 for k in ks]  # the exact bound
    np.testing.assert_allclose(ours, quantile, rtol=1e-7, atol=0)
    # the lower end of the two-sided (1 - 2 alpha) exact interval is the one-sided (1 - alpha) bound;
    # binomtest finds it by its own root search, to about 1e-5 at the extremes
    ci = [stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low for k in ks]
    np.testing.assert_allclose(ours, ci, rtol=1e-4, atol=0)
    # closed forms: P(X >= 1) = 1 - (1 - p)^n and P(X >= n) = p^n; rounding never lifts ours above them
    one, everything = -math.expm1(math.log1p(-alpha) / n), alpha ** (1 / n)
    assert ours[0] == 0.0 and everything * (1 - 1e-15) <= ours[-1] <= everything
    assert one * (1 - 1e-7) <= ours[1] <= one


def test_clopper_pearson_bound_equals_arts_bound():
    """ART takes its bound from statsmodels' proportion_confint(method="beta") at 2 alpha."""
    pytest.importorskip("statsmodels")
    from statsmodels.stats.proportion import proportion_confint

    counts = [(1, 10), (9, 10), (512, 1000), (990, 1000), (99_000, 100_000)]
    ours = clopper_pearson_lower(torch.tensor([k for k, _ in counts]), torch.tensor([n for _, n in counts]), 0.001)
    ref = [proportion_confint(k, n, alpha=0.002, method="beta")[0] for k, n in counts]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)


def test_binomial_test_p_value_matches_scipy():
    pairs = [(5, 5), (10, 3), (60, 40), (600, 400), (100, 0), (1, 0), (51, 49), (7000, 2900)]
    ours = binom_test_half(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])).numpy()
    ref = [stats.binomtest(a, a + b, 0.5).pvalue for a, b in pairs]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-300)


def test_radii_are_nonnegative_and_grow_with_the_top_count():
    n, alpha, sigma = 200, 0.001, 0.5
    k = torch.arange(n + 1)
    counts = torch.stack([k, n - k], 1)  # class 0 is picked by the selection counts below
    counts0 = torch.tensor([[100, 0]]).expand(n + 1, 2)
    pred, radius = certify_from_counts(counts0, counts, sigma, alpha)
    p_a = clopper_pearson_lower(k, n, alpha)
    assert (radius >= 0).all() and (torch.diff(radius) >= 0).all() and (torch.diff(p_a) >= 0).all()
    assert ((pred == -1) == (p_a < 0.5)).all() and (radius[pred == -1] == 0).all()
    assert (radius[p_a > 0.5] > 0).all()
    assert radius[-1] == pytest.approx(all_agree_radius(sigma, n, alpha), rel=1e-12)


def test_certified_accuracy_counts_correct_points_whose_radius_reaches():
    radii = torch.tensor([0.0, 0.3, 0.5, 1.2, 0.0])
    correct = torch.tensor([False, True, True, True, True])  # point 0 abstained (prediction -1 != label)
    acc = certified_accuracy(radii, correct, [0.0, 0.3, 0.31, 1.0, 1.2, 2.0])
    assert acc.tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2, 0.0])


# -- CERTIFY and PREDICT on models with a known smoothed behaviour ---------------------------------
@pytest.mark.parametrize("sigma,n", [(0.12, 100), (0.5, 1000)])
def test_a_constant_model_is_certified_with_the_all_agree_radius_and_never_abstains(sigma, n):
    cfg = Smoothing(sigma=sigma, n0=10, n=n, alpha=0.001, batch_size=256)
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    pred, radius = cfg.certify(Constant(3), x, torch.Generator().manual_seed(0))
    expected = sigma * float(stats.norm.ppf(0.001 ** (1 / n)))
    assert (pred == 3).all()
    assert torch.allclose(radius, torch.full_like(radius, expected), rtol=1e-12)
    assert (cfg.predict(Constant(3), x, torch.Generator().manual_seed(0)) == 3).all()


def test_a_model_that_ignores_the_image_and_reads_the_noise_abstains():
    sigma = 0.25
    cfg = Smoothing(sigma=sigma, n0=100, n=1000, alpha=0.001)
    model = NoiseReader(sigma, k=10)
    counts = noise_counts(model, _images(3), 20_000, sigma, torch.Generator().manual_seed(0))
    assert (counts.double() / 20_000 - 0.1).abs().max() < 0.01  # the reader really is uniform
    pred, radius = cfg.certify(model, _images(50), torch.Generator().manual_seed(1))
    assert (pred == -1).all() and (radius == 0).all()
    assert (cfg.predict(model, _images(50), torch.Generator().manual_seed(2)) == -1).all()


def test_predict_on_a_fifty_fifty_model_answers_at_the_rate_of_its_binomial_test():
    """Cohen et al.: PREDICT returns a class with probability at most alpha when the top two classes
    tie.  The exact rate is the size of the two-sided binomial test of n draws at alpha."""
    sigma, n, alpha, points = 0.5, 100, 0.05, 3000
    cfg = Smoothing(sigma=sigma, n=n, alpha=alpha, batch_size=10_000)
    answered = cfg.predict(NoiseReader(sigma, k=2), _images(points), torch.Generator().manual_seed(0)) != -1
    k = np.arange(n + 1)
    rejects = np.array([stats.binomtest(int(max(i, n - i)), n, 0.5).pvalue <= alpha for i in k])
    size = float(stats.binom.pmf(k, n, 0.5)[rejects].sum())  # about 0.035 (the test is discrete)
    rate = float(answered.double().mean())
    assert 0 < size <= alpha
    assert abs(rate - size) < 4 * math.sqrt(size * (1 - size) / points), (rate, size)


def test_seeded_runs_repeat_exactly_and_other_seeds_differ():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    cfg = Smoothing(sigma=1.0, n0=20, n=200, batch_size=64)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    a = cfg.certify(model, x, torch.Generator().manual_seed(7))
    b = cfg.certify(model, x, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c1 = noise_counts(model, x, 200, 1.0, torch.Generator().manual_seed(7), 64)
    c2 = noise_counts(model, x, 200, 1.0, torch.Generator().manual_seed(8), 64)
    assert torch.equal(c1, noise_counts(model, x, 200, 1.0, torch.Generator().manual_seed(7), 64))
    assert not torch.equal(c1, c2) and (c1.sum(1) == 200).all()


@pytest.mark.parametrize(
    "kwargs,fix",
    [({"sigma": 0.0}, "sigma must be > 0"), ({"sigma": -0.25}, "sigma must be > 0"), ({"n0": 0}, "n0 must be >= 1"),
     ({"n": 0}, "n must be >= 1"), ({"alpha": 0.0}, "alpha must be > 0"), ({"alpha": 1.0}, "alpha must be in (0, 1)"),
     ({"alpha": 1.5}, "alpha must be in (0, 1)")],
)
def test_bad_settings_raise_a_value_error_naming_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix.replace("(", r"\(").replace(")", r"\)")):
        Smoothing(**kwargs)


def test_bad_inputs_raise_naming_the_fix():
    cfg = Smoothing(sigma=0.25, n0=5, n=10)
    with pytest.raises(ValueError, match=r"scale the inputs to \[0, 1\]"):
        cfg.certify(Constant(0), _images(2, 1.5), torch.Generator())
    with pytest.raises(ValueError, match=r"scale the inputs to \[0, 1\]"):
        cfg.predict(Constant(0), _images(2, -0.1), torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        cfg.certify(Constant(0), _images(2), 0)
    with pytest.raises(ValueError, match="alpha must be in"):
        clopper_pearson_lower(torch.tensor([1]), 10, 1.0)


# -- a trained model: gaussian-aug helps the smoothed classifier, and ART agrees ----------------------
SIGMA = 0.5


@pytest.fixture(scope="module")
def digits_mlps(digits, model_cache):
    """An MLP trained on digits with Gaussian augmentation at SIGMA, and the same MLP trained plainly
    (an MLP keeps the Monte Carlo cheap: a few seconds for a thousand points and 600 draws each)."""
    common = {"epochs": 10, "batch_size": 64, "lr": 3e-3}
    return {
        name: train_or_load(ModelSpec("mlp"), create_defense(name, **kw, **common), digits, model_cache,
                            progress=False).model
        for name, kw in (("standard", {}), ("gaussian-aug", {"sigma": SIGMA}))
    }


def test_gaussian_augmentation_raises_smoothed_accuracy_over_standard_training(digits, digits_mlps):
    cfg = Smoothing(sigma=SIGMA, n0=20, n=100, alpha=0.001)
    x, y = digits.test.x[:200], digits.test.y[:200]
    acc = {name: cfg.evaluate(m, x, y, torch.Generator().manual_seed(0), radii=(0.0, 0.25)).certified_acc
           for name, m in digits_mlps.items()}
    assert acc["gaussian-aug"][0] > acc["standard"][0] + 0.05, acc
    assert acc["gaussian-aug"][1] > acc["standard"][1] + 0.15, acc


def test_certified_accuracy_agrees_with_arts_randomized_smoothing(digits, digits_mlps):
    """Same model, points, sigma, n0, n and alpha; different noise, so agreement up to Monte Carlo error."""
    pytest.importorskip("statsmodels")  # ART's certify takes its Clopper-Pearson bound from statsmodels
    from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

    n0, n, alpha, radii = 100, 500, 0.001, (0.0, 0.25, 0.5, 0.75)
    model = digits_mlps["gaussian-aug"]
    x = torch.cat([digits.test.x, digits.train.x[:720]])  # more points than the test split, less MC noise
    y = torch.cat([digits.test.y, digits.train.y[:720]])
    ours = Smoothing(sigma=SIGMA, n0=n0, n=n, alpha=alpha).evaluate(model, x, y, torch.Generator().manual_seed(0), radii)
    art = PyTorchRandomizedSmoothing(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
        device_type="cpu", sample_size=n0, scale=SIGMA, alpha=alpha,
    )
    np.random.seed(0)  # ART draws its noise from numpy's global generator
    pred, radius = art.certify(x.numpy(), n=n, batch_size=1000)
    theirs = certified_accuracy(torch.as_tensor(radius), torch.as_tensor(pred) == y, radii).tolist()
    assert ours.certified_acc[0] > 0.6 and ours.certified_acc[2] > 0.2  # most points certified: a real test
    gap = max(abs(a - b) for a, b in zip(ours.certified_acc, theirs, strict=True))
    assert gap <= 0.02, (ours.certified_acc, theirs)


def test_a_smoothing_cell_runs_through_the_harness_into_its_own_table(tmp_path):
    from robustbench_lite.harness.presets import Extra, Preset
    from robustbench_lite.harness.run import run_plan
    from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
    from robustbench_lite.harness.store import Store
    from robustbench_lite.report import leaderboard

    l2 = ThreatModel("l2", 0.25)
    smoothing = AttackSpec("smoothing", {"sigma": 0.25, "n0": 10, "n": 100, "batch_size": 500})
    plan = Preset(
        name="smoothed", description="digits, gaussian-aug with its smoothed certificate", data=(DataSpec("digits"),),
        models=(ModelSpec("small-cnn"),), defenses=(DefenseSpec("gaussian-aug", {"sigma": 0.25, "epochs": 2, "batch_size": 64}),),
        grid=((l2, (AttackSpec("pgd", {"steps": 5}),)),), n=60,
        extra=(Extra(("gaussian-aug",), l2, (smoothing,), 60, kind="smoothing"),),
    ).plan()
    assert run_plan(plan, workdir=tmp_path, progress=False).errors == 0
    with Store(tmp_path / "store.sqlite") as s:
        rows = s.rows()
    row = next(r for r in rows if r.kind == "smoothing")
    assert row.status == "ok" and 0 <= row.robust_acc <= 1
    tables = leaderboard.tables(rows)
    table = tables["digits_smoothing"]
    assert {"sigma", "draws", "alpha", "certified_acc", "abstain_rate", "max_radius", "r0_00", "r0_25"} <= set(table.columns)
    assert table["r0_25"].iloc[0] <= table["r0_00"].iloc[0] and table["certified_acc"].iloc[0] == table["r0_25"].iloc[0]
    assert "certified" not in tables["digits_l2_0.25"].columns  # probabilistic: never in the deterministic column
    assert run_plan(plan, workdir=tmp_path, progress=False).computed == 0
