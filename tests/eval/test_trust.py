"""Numbers users can trust: the masking checks, the BPDA/EOT wrappers and the adaptive harness.

Acceptance: on models wrapped so that their gradients lie, the harness's worst case is at most
0.05 above the unwrapped model's and the cell carries the right flag; an honest model has none.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustbench_lite import create_attack, evaluate
from robustbench_lite.eval import flags as checks
from robustbench_lite.eval.adaptive import BPDA, EOT, LogOutputs, RescaleLogits, adapt, bpda, marked_layers
from robustbench_lite.eval.escalate import Escalation

EPS = 0.1
N = 100
WC = f"worst_case@linf_{EPS:g}"


# -- the pure checks ---------------------------------------------------------------------------------
def test_probability_outputs_check():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    assert checks.probability_outputs(logits) is None
    assert checks.probability_outputs(logits.softmax(1)) == checks.PROBABILITY_OUTPUTS
    assert checks.probability_outputs(torch.tensor([[0.5, 0.5], [0.2, 0.7]])) is None  # a row sums to 0.9
    assert checks.probability_outputs(torch.tensor([[1.5, -0.5]])) is None  # sums to 1 but negative


def test_randomized_outputs_check():
    a = torch.randn(4, 10)
    assert checks.randomized_outputs(a, a.clone()) is None
    assert checks.randomized_outputs(a, a + 1e-3) == checks.RANDOMIZED


def test_black_box_beats_white_box_check():
    needs_grad = {"fgsm": True, "pgd": True, "square": False}
    assert checks.black_box_beats_white_box({"fgsm": 0.9, "pgd": 0.5, "square": 0.4}, needs_grad) == {"fgsm", "pgd"}
    # PGD keeps up with Square: FGSM alone being weaker is not masking
    assert checks.black_box_beats_white_box({"fgsm": 0.6, "pgd": 0.41, "square": 0.4}, needs_grad) == set()
    assert checks.black_box_beats_white_box({"fgsm": 0.6, "pgd": 0.41}, {"fgsm": True, "pgd": True}) == set()


def test_large_eps_and_more_iterations_checks():
    assert checks.large_eps_not_zero(0.0) is None and checks.large_eps_not_zero(0.5) == checks.LARGE_EPS
    assert checks.more_iterations_no_help(0.6, 0.6, 0.3) == checks.MORE_STEPS_NO_HELP
    assert checks.more_iterations_no_help(0.6, 0.4, 0.3) is None  # longer runs help
    assert checks.more_iterations_no_help(0.6, 0.6, 0.58) is None  # nothing more to find


def test_gradient_attacks_missed_check_counts_points_beyond_the_gradient_attacks():
    assert checks.gradient_attacks_missed(1, 500) is None  # one point of 500: AutoAttack's 0.002 margin
    assert checks.gradient_attacks_missed(2, 500) == checks.GRADIENT_ATTACKS_MISSED
    assert checks.gradient_attacks_missed(0, 0) is None
    assert checks.gradient_attacks_missed(1, 100) is None  # one point of 100: chance, not a pattern
    assert checks.gradient_attacks_missed(2, 100) == checks.GRADIENT_ATTACKS_MISSED


def test_missed_by_gradients_reads_per_point_masks_on_survivors_and_on_all_points():
    from robustbench_lite.eval.evasion import AttackRecord, missed_by_gradients, run_order

    pgd, square = create_attack("pgd", eps=EPS), create_attack("square", eps=EPS)
    fab = create_attack("fab", eps=EPS)
    assert run_order(pgd) < run_order(square) and run_order(pgd) < run_order(fab)  # gradient attacks first
    correct = torch.tensor([True] * 8 + [False] * 2)
    after_pgd = correct & torch.tensor([False, False, True, True, True, True, True, True, False, False])

    def rec(attack, robust, scope="survivors"):
        return AttackRecord(attack, robust, 0.0, 0, 0, int(correct.sum()), scope)

    # survivors: square ran on PGD's six survivors and broke three of them
    after_square = after_pgd & torch.tensor([True, True, False, False, False, True, True, True, True, True])
    got = missed_by_gradients([rec(pgd, after_pgd), rec(square, after_square)], 10)
    assert got == {pgd.threat: checks.GRADIENT_ATTACKS_MISSED}
    # on all points: square breaking only what PGD broke too is no sign of anything
    own = correct & torch.tensor([False, True, True, True, True, True, True, True, True, True])
    assert missed_by_gradients([rec(pgd, after_pgd, "all"), rec(square, own, "all")], 10) == {}
    # without a gradient attack there is nothing to compare
    assert missed_by_gradients([rec(square, after_square)], 10) == {}


def test_every_flag_is_explained():
    for code in (checks.ZERO_GRAD, checks.SINGLE_STEP_WINS, checks.INCOMPLETE, checks.PROBABILITY_OUTPUTS,
                 checks.RANDOMIZED, checks.BLACK_BOX_WINS, checks.LARGE_EPS, checks.MORE_STEPS_NO_HELP,
                 checks.GRADIENT_ATTACKS_MISSED):
        assert len(checks.FLAGS[code]) > 40
    assert checks.explain("adapted:bpda+eot") == checks.FLAGS[checks.ADAPTED]
    assert checks.adapted(["bpda", "eot"]) == "adapted:bpda+eot" and checks.adapted([]) is None


# -- the wrappers ----------------------------------------------------------------------------------------
def _quantize(x):
    return torch.round(x * 15) / 15


def test_bpda_is_straight_through_only_when_switched_on():
    net = nn.Sequential(bpda(_quantize), nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(3, 1, 2, 2, requires_grad=True)
    (g_plain,) = torch.autograd.grad(net(x).sum(), x)
    assert torch.count_nonzero(g_plain) == 0  # round's true gradient
    (g_bpda,) = torch.autograd.grad(BPDA(net)(x).sum(), x)
    w = net[2].weight.sum(0).view(1, 1, 2, 2)
    assert torch.allclose(g_bpda, w.expand_as(g_bpda))  # identity backward through the quantizer
    assert torch.equal(BPDA(net)(x), net(x))  # forward unchanged
    assert not marked_layers(net)[0].straight_through  # switched off again
    with pytest.raises(ValueError, match="bpda"):
        BPDA(nn.Linear(2, 2))


def test_eot_averages_over_passes_and_log_and_rescale_keep_the_prediction():
    class Noisy(nn.Module):
        def forward(self, x):
            return x.flatten(1) + torch.randn(x.shape[0], x[0].numel())

    x = torch.zeros(2, 1, 1, 3)
    torch.manual_seed(0)
    assert EOT(Noisy(), samples=4000)(x).abs().max() < 0.1  # mean of N(0, 1) over 4000 passes
    z = torch.randn(5, 10) * 1e4
    lin = nn.Sequential(nn.Flatten(), nn.Identity())
    assert torch.equal(RescaleLogits(lin)(z.view(5, 1, 1, 10)).argmax(1), z.argmax(1))
    p = (z / 1e4).softmax(1)
    assert torch.allclose(LogOutputs(lin)(p.view(5, 1, 1, 10)).softmax(1), p, atol=1e-5)
    wrapped, names = adapt(nn.Sequential(bpda(_quantize), lin), bpda=True, eot_samples=2, log_outputs=False, rescale=True)
    assert names == ["bpda", "eot", "rescale"] and isinstance(wrapped, RescaleLogits)


# -- acceptance: lying gradients -------------------------------------------------------------------------
class Scale(nn.Module):
    def forward(self, z):
        return z * 1e4


class InputNoise(nn.Module):
    def forward(self, x):
        return (x + 0.05 * torch.randn_like(x)).clamp(0.0, 1.0)


def _attacks():
    return [create_attack("fgsm", eps=EPS), create_attack("pgd", eps=EPS, steps=20),
            create_attack("square", eps=EPS, queries=300)]


@pytest.fixture(scope="module")
def honest(digits_model, digits):
    torch.manual_seed(0)
    return evaluate(digits_model, _attacks(), digits.test, n=N)


@pytest.mark.slow
def test_an_honest_model_raises_no_flag(honest):
    assert not any(honest.flags.values()), honest.flags
    assert honest.plain_records is None  # no adaptive rerun


WRAPPED = {
    "logits-x1e4": (
        lambda m: nn.Sequential(m, Scale()),
        {checks.ZERO_GRAD, checks.BLACK_BOX_WINS, checks.LARGE_EPS, checks.MORE_STEPS_NO_HELP},
    ),
    "softmax-output": (lambda m: nn.Sequential(m, nn.Softmax(dim=1)), {checks.PROBABILITY_OUTPUTS}),
    "quantized-input": (lambda m: nn.Sequential(bpda(_quantize), m), {checks.ZERO_GRAD, checks.LARGE_EPS}),
    "input-noise": (lambda m: nn.Sequential(InputNoise(), m), {checks.RANDOMIZED}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WRAPPED))
def test_lying_gradients_are_flagged_and_the_worst_case_stays_honest(name, honest, digits_model, digits):
    wrap, expected = WRAPPED[name]
    torch.manual_seed(0)
    ev = evaluate(wrap(digits_model), _attacks(), digits.test, n=N, escalation=Escalation(square_queries=1000))
    reference = float(honest.worst_case[create_attack("pgd", eps=EPS).threat].float().mean())
    worst = float(next(iter(ev.worst_case.values())).float().mean())
    assert expected <= ev.flags[WC], ev.flags[WC]
    assert any(f.startswith("adapted:") for f in ev.flags[WC])
    # never optimistic: every point counted broken was checked on the model, so only a worst case
    # above the honest model's is a failure (the escalation ladder may find more than its attacks)
    assert worst <= reference + 0.05, (worst, reference)
    # the gradient attacks' own rows carry the flags too, and the adaptive rerun helped them
    pgd_plain = next(r for r in ev.plain_records if r.attack.name == "pgd").robust_acc
    pgd = next(r for r in ev.records if r.attack.name == "pgd").robust_acc
    assert pgd <= pgd_plain
    assert expected - {checks.BLACK_BOX_WINS} <= ev.flags[f"pgd@linf_{EPS:g}"]


def test_eot_passes_are_counted_per_network_pass(digits_model, digits):
    x, y = digits.test.x[:16], digits.test.y[:16]
    plain = create_attack("fgsm", eps=EPS).run(digits_model, x, y)
    eot = create_attack("fgsm", eps=EPS).run(EOT(digits_model, 4), x, y)
    assert plain.grad_evals == 16 and eot.grad_evals == 4 * plain.grad_evals
    assert eot.forward_evals == 4 * plain.forward_evals
