"""Certified training (IBP, CROWN-IBP): the schedules, the loss on the worst-case logits, the
β mixture, and a short run through the real training loop."""

from __future__ import annotations

import math

import pytest
import torch
from robustbench_lite.defenses._certified import progress_epochs, ramp_fraction, worst_case_loss

from robustbench_lite import ModelSpec, Norm, ThreatModel, TrainState, create_defense
from robustbench_lite.certify import InputSet, create_verifier, crown_margins, layer_bounds, parse_network


def test_ramp_is_zero_in_the_warmup_then_linear_then_one():
    assert [ramp_fraction(p, 1.0, 4.0) for p in (0.0, 0.99, 1.0, 2.0, 3.0, 5.0, 9.0)] == [0, 0, 0, 0.25, 0.5, 1, 1]
    assert ramp_fraction(1.5, 1.0, 0.0) == 1.0


def test_progress_reads_steps_per_epoch_off_the_loop_counters():
    state = TrainState(epoch=0, step=17)
    assert progress_epochs(state) == 0.0  # unknown within epoch 0: the warm-up covers it
    state.epoch, state.step = 1, 50
    assert progress_epochs(state) == 1.0 and state.extra["steps_per_epoch"] == 50
    state.epoch, state.step = 2, 125
    assert progress_epochs(state) == 2.5


@pytest.mark.parametrize("name", ["ibp", "crown-ibp"])
def test_schedules_follow_the_ramp(name):
    d = create_defense(name, eps=0.1, train_eps_factor=1.5, warmup_epochs=1.0, ramp_epochs=2.0)
    kappa_end = 0.5 if name == "ibp" else 0.0
    state = TrainState(epoch=2, step=20, extra={"steps_per_epoch": 10})  # progress 2.0: half way
    eps_t, r = d.ramp(state)
    assert r == 0.5 and eps_t == pytest.approx(0.075) and d.kappa(r) == pytest.approx(1 - 0.5 * (1 - kappa_end))
    state.step = 30
    assert d.ramp(state) == (pytest.approx(0.15), 1.0) and d.kappa(1.0) == kappa_end


def _model(digits):
    """A freshly initialised cnn-cert-small, the same weights every time."""
    torch.manual_seed(0)
    return ModelSpec("cnn-cert-small").build(digits)


def _batch(digits, n=64):
    return digits.train.x[:n], digits.train.y[:n]


@pytest.mark.parametrize("name", ["ibp", "crown-ibp"])
def test_the_loss_is_natural_in_the_warmup_and_at_least_natural_after(name, digits):
    model = _model(digits)
    x, y = _batch(digits)
    d = create_defense(name, eps=0.1)
    with torch.no_grad():
        natural = float(torch.nn.functional.cross_entropy(model(x), y))
    assert float(d.batch_loss(model, x, y, TrainState(epoch=0, step=3)).detach()) == pytest.approx(natural, rel=1e-6)
    ramped = TrainState(epoch=20, step=200, extra={"steps_per_epoch": 10})
    assert float(d.batch_loss(model, x, y, ramped).detach()) > natural  # worst-case logits only raise the CE


def test_worst_case_loss_is_the_ce_of_the_negated_margin_bounds():
    lower = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 0.5]])
    y = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(-lower, y, reduction="none")
    torch.testing.assert_close(worst_case_loss(lower, y), expected)


def test_crown_ibp_mixes_crown_and_interval_margins_by_beta(digits):
    model = _model(digits)
    x, y = _batch(digits, 16)
    net = parse_network(model, x)
    inset = InputSet.make(x, Norm.LINF, torch.full((16,), 0.05))
    bounds, last = layer_bounds(net, inset, "ibp")
    from robustbench_lite.certify import ibp_margins

    ibp, crown = ibp_margins(net, last, y), crown_margins(net, bounds, inset, y)
    torch.testing.assert_close(create_defense("crown-ibp").margin_lower(net, inset, y, 1.0), ibp)  # β = 0
    torch.testing.assert_close(create_defense("crown-ibp", beta_end=1.0).margin_lower(net, inset, y, 1.0), crown)
    half = create_defense("crown-ibp", beta_end=0.0).margin_lower(net, inset, y, 0.5)
    torch.testing.assert_close(half, 0.5 * crown + 0.5 * ibp)
    # and the float32 training bound agrees with the float64 verifier (CROWN with interval intermediates)
    ref = create_verifier("crown", intermediate="ibp").margin_bounds(model, x, y, ThreatModel("linf", 0.05))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(crown.double()[finite], ref[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["ibp", "crown-ibp"])
def test_training_steps_lower_the_robust_loss(name, digits):
    model = _model(digits)
    x, y = _batch(digits)
    d = create_defense(name, eps=0.05)
    state = TrainState(epoch=20, step=200, extra={"steps_per_epoch": 10})
    before = float(d.batch_loss(model, x, y, state).detach())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss = d.batch_loss(model, x, y, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = float(d.batch_loss(model, x, y, state).detach())
    assert math.isfinite(after) and after < before


def test_a_short_run_through_the_training_loop_ramps_eps_and_certifies(digits):
    d = create_defense("ibp", eps=0.05, epochs=4, warmup_epochs=1, ramp_epochs=2, batch_size=64, lr=3e-3)
    model = _model(digits)
    log = d.fit(model, digits, progress=False).epochs
    # the value at each epoch's last step: the ramp is linear per step
    assert [r.metrics["eps"] for r in log] == pytest.approx([0.0, 0.025, 0.05, 0.05], abs=2e-3)
    assert all(0.0 <= r.metrics["ibp_certified_acc"] <= 1.0 for r in log)
    x, y = digits.test.x[:100], digits.test.y[:100]
    cert = create_verifier("ibp").certify(model, x, y, ThreatModel("linf", 0.05))
    assert cert.dtype == torch.bool and cert.shape == (100,)
    split = (digits.val if digits.val is not None else digits.test).head(d.monitor_points)
    monitor = create_verifier("ibp").certify(model, split.x, split.y, ThreatModel("linf", 0.05))
    assert log[-1].metrics["ibp_certified_acc"] == pytest.approx(float(monitor.float().mean()))  # the monitor is IBP
