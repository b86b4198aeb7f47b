"""Robustness curves: one run per attack over an eps grid (points broken at eps are not attacked
again), minimum-norm attacks in one run, AttackBench optimality, and the curve kind end to end."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from robustbench_lite import create_attack, make_policy
from robustbench_lite.cli import main
from robustbench_lite.core.models import predict
from robustbench_lite.eval.curve import (
    attack_curve,
    best_distances,
    decode,
    encode,
    optimality,
    robust_curve,
)

INF = math.inf
POLICY = make_policy("cpu", "off")


def test_optimality_is_in_unit_interval_the_best_scores_one_and_finding_nothing_scores_zero():
    gen = torch.Generator().manual_seed(0)
    correct = torch.rand(200, generator=gen) < 0.9
    attacks = []
    for k in range(4):
        d = torch.rand(200, generator=gen) * 0.3 * (1 + k)
        d[torch.rand(200, generator=gen) < 0.2] = INF  # found nothing on some points
        attacks.append(torch.where(correct, d, torch.zeros(200)))
    best = best_distances(attacks)
    scores = [optimality(d, best, 0.5) for d in attacks]
    assert all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) == 4
    assert optimality(best, best, 0.5) == 1.0
    nothing = torch.where(correct, torch.full((200,), INF), torch.zeros(200))
    assert optimality(nothing, best, 0.5) == 0.0
    assert torch.equal(decode(encode(attacks[0])), attacks[0])


def test_a_curve_attacks_only_what_is_still_robust_and_costs_less_than_one_run_per_eps(digits_model, digits):
    split = digits.test.head(120)
    correct = predict(digits_model, split.x, "cpu") == split.y
    grid = [0.05, 0.1, 0.15, 0.2, 0.25]
    rec = attack_curve(digits_model, lambda e: create_attack("pgd", eps=e, steps=10), grid, split, correct, policy=POLICY)
    curve = robust_curve(rec.distances, [0.0, *grid])
    assert curve[0] == pytest.approx(float(correct.float().mean()))
    assert all(a >= b for a, b in zip(curve, curve[1:], strict=False))  # never rises with eps
    assert curve[-1] < curve[0] - 0.3  # the attack does break points
    separate_points = len(grid) * int(correct.sum())
    assert rec.attacked < 0.75 * separate_points and rec.grad_evals < 0.75 * separate_points * 11
    for eps, ra in zip(grid, curve[1:], strict=True):  # no point counts robust at eps after an example within eps
        assert ra == pytest.approx(float((rec.distances > eps).float().mean()))


def test_a_min_norm_attack_gives_the_whole_curve_in_one_run_with_real_examples(digits_model, digits):
    split = digits.test.head(60)
    x, y = split.x, split.y
    correct = predict(digits_model, x, "cpu") == y
    attack = create_attack("apgd-mn", eps=0.3, steps=10, search_steps=4)
    out = attack.run(digits_model, x, y)
    found = torch.isfinite(out.distances) & correct
    assert found.sum() > 0.8 * correct.sum()
    with torch.no_grad():
        assert (digits_model(out.x_adv[found]).argmax(1) != y[found]).all()  # real examples
    sizes = (out.x_adv - x).flatten(1).abs().amax(1)
    assert torch.allclose(sizes[found], out.distances[found], atol=1e-6) and (out.distances[found] <= 0.3 + 1e-6).all()
    assert float(out.distances[found].median()) < 0.6 * 0.3  # the bisection shrinks them well below eps
    rec = attack_curve(digits_model, lambda e: create_attack("apgd-mn", eps=e, steps=10, search_steps=4),
                       [0.1, 0.2, 0.3], split, correct, policy=POLICY)
    assert rec.attacked == int(correct.sum())  # one run at the largest eps, not one per eps


def test_eval_with_an_eps_curve_stores_curves_scores_resumes_and_reports(user_checkpoint, tmp_path, capsys):
    _, folder = user_checkpoint
    args = ["eval", "--model", "small-cnn", "--weights", str(folder / "digits_cnn.safetensors"), "--data", "digits",
            "--eps-curve", "linf:0:0.2:5,l2:0:2:3", "--attacks", "fgsm,pgd", "--n", "60", "--device", "cpu",
            "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "lb"), "--report", str(tmp_path / "rep"),
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "curve linf pgd (optimality" in out and "curve l2 worst case" in out
    cells = pd.read_csv(tmp_path / "lb" / "cells.csv")
    scored = cells[(cells["kind"] == "curve") & (cells["attack"] != "worst_case")]
    assert len(scored) == 4 and scored["optimality"].between(0, 1).all()
    assert not cells["metrics"].fillna("").str.contains("_distances").any()  # per-point data stays in the store
    curve = pd.read_csv(tmp_path / "lb" / "digits_curve.csv")
    linf = curve[curve["norm"] == "linf"].pivot_table(index="eps", columns="attack", values="robust_acc")
    assert list(linf.index) == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert (linf["worst_case"] <= linf[["fgsm", "pgd"]].min(axis=1) + 1e-9).all()
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Robustness curves" in html and "plot-robustness_curves" in html
    assert main(args) == 0
    assert "0 cells computed" in capsys.readouterr().out


def test_the_down_search_costs_fewer_gradients_and_finds_the_same_curve(digits_model, digits):
    split = digits.test.head(120)
    correct = predict(digits_model, split.x, "cpu") == split.y
    grid = [0.04 * k for k in range(1, 8)]
    recs = {order: attack_curve(digits_model, lambda e: create_attack("pgd", eps=e, steps=10), grid, split, correct,
                                policy=POLICY, order=order) for order in ("up", "down")}
    assert recs["down"].grad_evals < recs["up"].grad_evals
    up, down = (robust_curve(recs[o].distances, grid) for o in ("up", "down"))
    assert all(a >= b for a, b in zip(down, down[1:], strict=False))
    assert max(abs(a - b) for a, b in zip(up, down, strict=True)) <= 0.05  # random starts differ
    with pytest.raises(ValueError, match="order must be one of"):
        attack_curve(digits_model, lambda e: create_attack("fgsm", eps=e), grid, split, correct, policy=POLICY,
                     order="sideways")
