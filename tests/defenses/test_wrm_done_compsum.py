"""WRM, DONE and adversarial comp-sum: their pure losses, the smooth small-cnn, WRM's Lagrangian
ascent (it raises the objective, which is strongly concave for γ above the loss's smoothness) and
the Wasserstein certificate against the Wasserstein attack, also as a harness cell."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from robustbench_lite.defenses.adv_comp_sum import (
    comp_sum_loss,
    gap_distance,
    gaps,
    smooth_adv_comp_sum,
    variant_tau,
)
from robustbench_lite.defenses.done import compositional_weights, done_weights, update_log_normalizer
from robustbench_lite.defenses.wrm import paper_gamma
from torch import nn

from robustbench_lite import ModelSpec, ThreatModel, create_defense, ops
from robustbench_lite.core.models import small_cnn
from robustbench_lite.eval.flags import WASSERSTEIN_BOUND_BROKEN, wasserstein_bound_broken
from robustbench_lite.eval.wasserstein import (
    fill_budget,
    lagrangian,
    lagrangian_ascent,
    wasserstein_certificate,
)
from robustbench_lite.training.defense import TrainState


def _logits(n: int = 200, k: int = 10, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, k, generator=gen, dtype=torch.float64), torch.randint(0, k, (n,), generator=gen)


# --------------------------------------------------------------------------------------------
# comp-sum losses
# --------------------------------------------------------------------------------------------


def comp_sum_phi(u, tau: float):
    """The paper's definition, the oracle the stable form is checked against: ``Φ^τ(u)``: ``log(1 + u)`` for τ = 1, else ``((1 + u)^{1−τ} − 1)/(1 − τ)``."""
    if tau == 1:
        return torch.log1p(u)
    return ((1 + u) ** (1 - tau) - 1) / (1 - tau)


def test_each_comp_sum_phi_reduces_to_its_textbook_loss_and_logistic_is_the_cross_entropy():
    logits, y = _logits()
    p = logits.softmax(1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    u = (logits - logits.gather(1, y[:, None])).exp().sum(1) - 1.0  # Σ_{y'≠y} exp(h_y' − h_y)
    textbook = {
        "logistic": F.cross_entropy(logits, y, reduction="none"),
        "sum-exp": u,
        "gce": (1 - p_y**0.7) / 0.7,
        "mae": 0.5 * (p - F.one_hot(y, 10).double()).abs().sum(1),
    }
    for variant, expected in textbook.items():
        tau = variant_tau(variant, q=0.7)
        torch.testing.assert_close(comp_sum_phi(u, tau), expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(comp_sum_loss(logits, y, tau), expected, rtol=1e-9, atol=1e-9)
    # τ = 1 on the logits is the cross-entropy itself, bit for bit; τ → 1 tends to it
    assert torch.equal(comp_sum_loss(logits.float(), y, 1.0), F.cross_entropy(logits.float(), y, reduction="none"))
    torch.testing.assert_close(comp_sum_loss(logits, y, 1.0 + 1e-7), textbook["logistic"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="variant"):
        variant_tau("hinge")


def test_the_smooth_term_bounds_the_adversarial_comp_sum_loss_for_tau_at_least_one():
    logits, y = _logits(scale=2.0)
    g = gaps(logits, y)
    assert g.shape == (200, 9)
    torch.testing.assert_close(g.sum(1), 10 * logits.gather(1, y[:, None]).squeeze(1) - logits.sum(1))
    moved = logits + _logits(scale=2.0, seed=1)[0]  # any other point's logits
    for tau in (1.0, 1.3, 1.7, 2.0):  # 1-Lipschitz in the gap vector: ν = 1 bounds the loss at x'
        assert (comp_sum_loss(moved, y, tau) <= smooth_adv_comp_sum(logits, moved, y, tau, 1.0) + 1e-9).all()
    # the sum-exponential loss (τ = 0) is not Lipschitz: the bound fails somewhere
    assert (comp_sum_loss(moved, y, 0.0) > comp_sum_loss(logits, y, 0.0) + gap_distance(moved, logits, y)).any()
    assert gap_distance(logits + 5.0, logits, y).max() < 1e-5  # a shift of every logit changes no gap


def test_adv_comp_sum_with_nu_zero_is_clean_cross_entropy(digits):
    x, y = digits.train.x[:64], digits.train.y[:64]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    loss = create_defense("adv-comp-sum", nu=0.0, steps=2).batch_loss(model, x, y, TrainState())
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    with_term = create_defense("adv-comp-sum", nu=1.0, steps=2).batch_loss(model, x, y, TrainState())
    assert with_term > loss  # the smooth term is positive at the gap-maximising point


# --------------------------------------------------------------------------------------------
# DONE
# --------------------------------------------------------------------------------------------


def test_done_weights_are_the_softmax_closed_form_and_sum_to_one():
    losses = torch.linspace(0.0, 4.0, 64)
    for r in (0.1, 0.5, 1.0, 10.0):
        w = done_weights(losses, r)
        closed = torch.exp(losses.double() / r) / torch.exp(losses.double() / r).sum()  # exp(ℓ_i/r) / Σ_j exp(ℓ_j/r)
        torch.testing.assert_close(w.double(), closed, rtol=1e-5, atol=1e-7)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6) and (w.diff() > 0).all()
        # CID's estimate from this batch alone is the same softmax
        torch.testing.assert_close(compositional_weights(losses, r, update_log_normalizer(None, losses, r, 0.1)), w)
    assert torch.equal(done_weights(losses, math.inf), torch.full((64,), 1 / 64))
    assert float(done_weights(losses, 0.01)[-1]) > 0.99  # a low temperature picks the hardest point
    # the moving average in log space equals the plain one
    other = torch.linspace(1.0, 2.0, 64)
    log_u = update_log_normalizer(update_log_normalizer(None, losses, 1.0, 0.3), other, 1.0, 0.3)
    plain = 0.7 * losses.double().exp().mean() + 0.3 * other.double().exp().mean()
    assert log_u == pytest.approx(math.log(float(plain)), rel=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        done_weights(losses, 0.0)


@pytest.mark.parametrize("estimator", ["ema", "batch"])
def test_done_at_a_huge_temperature_is_pgd_at_and_a_low_one_weighs_hard_points(digits, estimator):
    x, y = digits.train.x[:64], digits.train.y[:64]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    common = {"eps": 0.1, "steps": 3, "start": "uniform"}
    state = TrainState(gen=torch.Generator().manual_seed(3))
    loss_done = create_defense("done", temperature=1e12, estimator=estimator, **common).batch_loss(model, x, y, state)
    loss_ref = create_defense("pgd-at", **common).batch_loss(model, x, y, TrainState(gen=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(loss_done, loss_ref)  # same inner points, uniform weights
    assert state.metrics["max_weight_ratio"] == pytest.approx(1.0)
    hot = create_defense("done", temperature=0.05, estimator=estimator, **common)
    s = TrainState(gen=torch.Generator().manual_seed(3))
    assert hot.batch_loss(model, x, y, s) > loss_ref and s.metrics["max_weight_ratio"] > 2.0


# --------------------------------------------------------------------------------------------
# WRM: smooth model, Lagrangian ascent, certificate
# --------------------------------------------------------------------------------------------


def test_small_cnn_activation_setting_keeps_the_default_network_and_its_key():
    default = small_cnn((1, 28, 28), 10)
    assert [type(m).__name__ for m in default] == [
        "Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"
    ]  # pooling before ReLU: the same function (see test_core)
    assert ModelSpec("small-cnn").as_dict() == {"name": "small-cnn", "kwargs": {}}  # cache keys unchanged
    smooth = small_cnn((1, 28, 28), 10, activation="elu", pool="avg")
    assert not any(isinstance(m, nn.ReLU | nn.MaxPool2d) for m in smooth)
    assert [p.shape for p in smooth.parameters()] == [p.shape for p in default.parameters()]
    with pytest.raises(ValueError, match="activation"):
        small_cnn((1, 28, 28), 10, activation="gelu")


def test_paper_gamma_on_fashion_mnist(fmnist):
    assert paper_gamma(fmnist.train.x) == pytest.approx(0.486, abs=0.01)  # 0.04 · mean ‖x‖₂


def test_fill_budget_mixes_two_attacks_within_the_mean_cost():
    gen = torch.Generator().manual_seed(0)

    def rand() -> torch.Tensor:
        return torch.rand(50, generator=gen, dtype=torch.float64)

    cost_a, loss_a = rand(), rand()
    cost_b, loss_b = cost_a + rand(), loss_a + torch.randn(50, generator=gen, dtype=torch.float64)
    for budget in (float(cost_a.mean()), float(cost_a.mean()) + 0.2, float(cost_b.mean()) + 1.0):
        value, cost = fill_budget(cost_a, loss_a, cost_b, loss_b, budget)
        assert cost <= budget + 1e-12 and value >= float(loss_a.mean())
    # a budget that affords every point of b takes b wherever it is stronger
    value, _ = fill_budget(cost_a, loss_a, cost_b, loss_b, float(cost_b.mean()) + 1.0)
    assert value == pytest.approx(float(torch.maximum(loss_a, loss_b).mean()))


@pytest.fixture(scope="module")
def wrm_digits(digits):
    """WRM (γ = 2) on digits with the smooth small-cnn; three short epochs."""
    torch.manual_seed(0)
    model = ModelSpec("small-cnn", {"activation": "elu", "pool": "avg"}).build(digits)
    create_defense("wrm", gamma=2.0, steps=5, epochs=3, batch_size=64, lr=3e-3).fit(model, digits, progress=False)
    return model.eval(), 2.0


def test_wrm_ascent_raises_phi_step_by_step(wrm_digits, digits):
    model, gamma = wrm_digits
    x, y = digits.test.x[:128], digits.test.y[:128]
    values = []
    for k in range(16):
        z = lagrangian_ascent(model, x, y, gamma=gamma, steps=k) if k else x
        assert z.min() >= 0 and z.max() <= 1
        with torch.no_grad():
            values.append(float(lagrangian(model(z), y, z, x, gamma).double().mean()))
    assert all(b > a for a, b in zip(values[:-1], values[1:], strict=True)), values
    with torch.no_grad():  # z = x: the value is the clean loss
        assert values[0] == pytest.approx(float(ops.ce(model(x), y).double().mean()), rel=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        lagrangian_ascent(model, x, y, gamma=0.0, steps=1)


def _curvature(model: nn.Module, z: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per point, ``vᵀ ∇²ℓ(z) v / ‖v‖²`` (exact, by double backpropagation through the ELU network)."""
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ops.ce(model(z), y).sum(), z, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), z)
    return (hv * v).flatten(1).sum(1) / v.flatten(1).pow(2).sum(1)


def test_wrm_objective_is_strongly_concave_for_gamma_above_the_smoothness(wrm_digits, digits):
    model, gamma = wrm_digits
    x, y = digits.test.x[:64].double(), digits.test.y[:64]
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    curv = []
    for _ in range(8):  # random points of the box and random directions
        z = (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
        curv.append(_curvature(model, z, y, torch.randn(x.shape, generator=gen, dtype=torch.float64)))
    curv = torch.cat(curv)
    model.float()
    # the Lagrangian's curvature vᵀ∇²ℓ v − 2γ‖v‖² is negative everywhere sampled (strongly concave) ...
    assert float(curv.max()) < 2 * gamma, float(curv.max())
    # ... while the loss itself is not concave (some positive curvature): a small γ would not do
    assert float(curv.max()) > 0


def test_wasserstein_certificate_is_never_below_the_wasserstein_attack(wrm_digits, digits):
    model, gamma = wrm_digits
    x, y = digits.test.x[:64], digits.test.y[:64]
    for g in (gamma, 4 * gamma):
        cert = wasserstein_certificate(model, x, y, gamma=g, rho=0.5, attack_steps=30, restarts=2, bisections=3,
                                       batch_size=64)
        assert cert.rho_hat > 0 and cert.attack_at_rho_hat[1] <= cert.rho_hat
        # the longer, restarted ascent finds φ_γ at most 1% larger: the 15-step ascent is near the sup
        assert cert.attack_phi <= 1.01 * cert.phi, cert
        assert cert.holds and cert.attack_at_rho[0] > cert.clean_loss, cert  # the attack did raise the loss
        with torch.no_grad():  # at ρ̂ the bound is the mean loss at the ascent's points
            z = lagrangian_ascent(model, x, y, gamma=g, steps=15)
            assert cert.bound_at_rho_hat == pytest.approx(float(ops.ce(model(z), y).double().mean()), rel=1e-5)
    runs: dict = {}  # a shared attack cache: the second call reruns no attack and gives the same numbers
    first = wasserstein_certificate(model, x, y, gamma=gamma, rho=0.5, attack_steps=10, restarts=1, bisections=1,
                                    expansions=2, batch_size=64, attack_runs=runs)
    count = len(runs)
    again = wasserstein_certificate(model, x, y, gamma=gamma, rho=0.5, attack_steps=10, restarts=1, bisections=1,
                                    expansions=2, batch_size=64, attack_runs=runs)
    assert count > 0 and len(runs) == count and again == first
    with pytest.raises(ValueError, match="rho"):
        wasserstein_certificate(model, x, y, gamma=gamma, rho=-1.0)


def test_wasserstein_flag_fires_only_when_an_attack_beats_the_bound():
    assert wasserstein_bound_broken((1.0, 2.0), (0.9, 2.0)) is None
    assert wasserstein_bound_broken((1.0, 2.0), (0.9, 2.01)) == WASSERSTEIN_BOUND_BROKEN


def test_a_wasserstein_cell_runs_through_the_harness_into_its_own_table(tmp_path):
    from robustbench_lite.harness.presets import Extra, Preset
    from robustbench_lite.harness.run import run_plan
    from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
    from robustbench_lite.harness.store import Store
    from robustbench_lite.report import leaderboard

    w2 = ThreatModel("l2", 0.5)
    cert = AttackSpec("wrm-certificate", {"attack_steps": 30, "restarts": 2, "bisections": 2, "expansions": 4})
    smooth = ModelSpec("small-cnn", {"activation": "elu", "pool": "avg"})
    wrm = DefenseSpec("wrm", {"gamma": 2.0, "steps": 5, "epochs": 2, "batch_size": 64, "lr": 3e-3})
    plan = Preset(
        name="wrm", description="digits, WRM with its certificate", data=(DataSpec("digits"),), models=(),
        defenses=(), paired=((smooth, wrm),), grid=((ThreatModel("linf", 0.1), (AttackSpec("fgsm"),)),), n=40,
        extra=(Extra(("wrm",), w2, (cert,), 40, kind="wasserstein"),),
    ).plan()
    assert run_plan(plan, workdir=tmp_path, progress=False).errors == 0
    with Store(tmp_path / "store.sqlite") as s:
        rows = s.rows()
    row = next(r for r in rows if r.kind == "wasserstein")
    assert row.status == "ok" and row.flags == ""
    table = leaderboard.tables(rows)["digits_wasserstein"]
    got = table.iloc[0]
    assert got["gamma"] == 2.0 and got["rho"] == pytest.approx(0.25) and bool(got["holds"])
    assert got["bound_at_rho"] >= got["attack_at_rho"] > got["clean_loss"] and got["attack_cost_at_rho"] <= 0.25
    assert got["bound_at_rho_hat"] >= got["attack_at_rho_hat"]
    with pytest.raises(ValueError, match="l2 threat"):
        Preset(name="bad", description="", data=(DataSpec("digits"),), models=(), defenses=(), paired=((smooth, wrm),),
               grid=(), n=10, extra=(Extra(("wrm",), ThreatModel("linf", 0.1), (cert,), 10, kind="wasserstein"),),
               ).plan().cells[-1].build()
