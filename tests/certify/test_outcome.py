"""Per-point verification outcomes: the incomplete verifiers' trivial mapping, the re-check every
counterexample goes through, and bad outcomes refused with errors that name the fix."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from robustbench_lite import ThreatModel
from robustbench_lite.certify import Status, Verification, Verifier, create_verifier, list_verifiers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _points(model: nn.Module, n: int = 8):
    x = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def _away(model: nn.Module, x: torch.Tensor, y: torch.Tensor, nearest: bool = True) -> torch.Tensor:
    """The nearest (or farthest, in Linf) of random points of the box the model labels other than ``y``."""
    grid = torch.rand(4000, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        wrong = grid[model(grid).argmax(1) != y]
    dist = (wrong - x).flatten(1).abs().max(1).values
    return wrong[dist.argmin() if nearest else dist.argmax()]


def test_incomplete_verifiers_verify_their_certified_points_and_leave_the_rest_undecided():
    model = _net()
    x, y = _points(model)
    threat = ThreatModel("linf", 0.05)
    for name in ("ibp", "crown"):
        v = create_verifier(name)
        out = v.verify(model, x, y, threat)
        assert torch.equal(out.verified, v.certify(model, x, y, threat))
        assert not out.falsified.any() and not out.rejected.any()
        assert out.counts()[Status.VERIFIED] + out.counts()[Status.UNDECIDED] == len(x)
        assert out.status() == [Status.VERIFIED if c else Status.UNDECIDED for c in out.verified.tolist()]
        assert out.seconds.sum() > 0 and not out.subdomains.any()


def test_recheck_keeps_a_true_counterexample_and_rejects_one_outside_the_ball_or_not_adversarial():
    model = _net()
    x, y = _points(model, 4)
    far = _away(model, x[0], y[0])
    eps = float((far - x[0]).abs().max())
    cex = x.clone()
    cex[0] = far  # inside the ball at eps, misclassified: a true counterexample
    cex[1] = x[1]  # the clean point, classified correctly: not adversarial
    cex[2] = _away(model, x[2], y[2], nearest=False)  # misclassified, but outside the ball
    assert float((cex[2] - x[2]).abs().max()) > 1.1 * eps
    falsified = torch.tensor([True, True, True, False])
    out = Verification(torch.zeros(4, dtype=torch.bool), falsified, counterexamples=cex)
    checked = out.recheck(model, x, y, ThreatModel("linf", eps))
    assert checked.falsified.tolist() == [True, False, False, False]
    assert checked.rejected.tolist() == [False, True, True, False]
    assert checked.status()[1] is Status.UNDECIDED
    index, x_adv = checked.adversarial()
    assert index.tolist() == [0] and torch.equal(x_adv[0], far)
    # a counterexample with a NaN pixel is no proof either
    nan = cex.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not Verification(torch.zeros(4, dtype=torch.bool), falsified, counterexamples=nan).recheck(
        model, x, y, ThreatModel("linf", eps)).falsified.any()


def test_a_complete_verifier_plugin_gets_its_counterexamples_rechecked_by_the_base():
    model = _net()
    x, y = _points(model, 3)
    far = _away(model, x[0], y[0])

    @dataclass(frozen=True, kw_only=True)
    class Liar(Verifier):
        def _verify(self, model, x, y, threat):
            cex = x.clone()
            cex[0], cex[1] = far, 1 - x[1]  # one true, one far outside any small ball
            return Verification(torch.zeros(3, dtype=torch.bool), torch.tensor([True, True, False]), counterexamples=cex,
                                subdomains=torch.tensor([3, 5, 0]))

    out = Liar().verify(model, x, y, ThreatModel("linf", float((far - x[0]).abs().max())))
    assert out.falsified.tolist() == [True, False, False] and out.rejected.tolist() == [False, True, False]
    assert out.subdomains.tolist() == [3, 5, 0]


def test_bad_outcomes_are_refused_naming_the_fix():
    yes, no = torch.tensor([True, False]), torch.tensor([False, False])
    with pytest.raises(ValueError, match="both verified and falsified"):
        Verification(yes, yes, counterexamples=torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="pass counterexamples"):
        Verification(no, yes)
    with pytest.raises(TypeError, match="1-d bool tensor"):
        Verification(torch.tensor([1, 0]), no)
    with pytest.raises(ValueError, match="one per point"):
        Verification(yes, torch.tensor([False]))
    with pytest.raises(TypeError, match="shape \\(2,\\)"):
        Verification(yes, no, seconds=torch.zeros(3))


@pytest.mark.parametrize("name", [n for n in list_verifiers() if n != "stable-relu"])  # stable-relu: one architecture
def test_contract_every_verifier_returns_a_consistent_rechecked_outcome(name):
    model = _net()
    x, y = _points(model, 10)
    y[:2] = (y[:2] + 1) % 3  # two misclassified points: never verified
    threat = ThreatModel("linf", 0.05)
    out = create_verifier(name).verify(model, x, y, threat)
    assert out.n == 10 and not bool(out.verified[:2].any()) and not bool((out.verified & out.falsified).any())
    again = out.recheck(model, x, y, threat)  # what the base kept passes the check as it stands
    assert torch.equal(again.falsified, out.falsified) and not bool(again.rejected.any())
    index, x_adv = out.adversarial()
    if index.numel():
        assert bool(threat.geometry.inside(x_adv - x[index], threat.eps).all())
        assert bool((model(x_adv).argmax(1) != y[index]).all())
    assert out.counts()[Status.VERIFIED] == int(out.verified.sum()) and out.seconds.shape == (10,)
