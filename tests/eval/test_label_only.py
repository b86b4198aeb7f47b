"""A model that gives only its predicted label (or only its scores): the evaluation runs the
attacks it allows, skips the others with a note in their rows, and a rerun resumes."""

from __future__ import annotations

import pandas as pd
import torch

from robustbench_lite import Access, LabelOnly, ScoresOnly, benchmark, create_attack, evaluate
from robustbench_lite.cli import main
from robustbench_lite.core.access import model_access
from robustbench_lite.core.device import Chunked
from robustbench_lite.harness.rows import SKIPPED
from robustbench_lite.harness.store import Store

N = 40


def test_model_access_reads_the_most_restrictive_wrapper(digits_model):
    assert model_access(digits_model) is Access.GRADIENTS
    assert model_access(ScoresOnly(digits_model)) is Access.SCORES
    assert model_access(Chunked(LabelOnly(ScoresOnly(digits_model)), 1 << 20)) is Access.LABELS
    x = torch.rand(5, 1, 8, 8)
    out = LabelOnly(digits_model)(x)
    assert torch.equal(out.argmax(1), digits_model(x).argmax(1)) and set(out.unique().tolist()) <= {0.0, 1.0}
    assert not out.requires_grad


def test_evaluate_skips_what_the_model_does_not_give_and_runs_the_rest(digits_model, digits):
    attacks = [create_attack("pgd", norm="l2", eps=1.0, steps=5), create_attack("square", norm="l2", eps=1.0, queries=50),
               create_attack("hsj", norm="l2", eps=1.0, queries=200)]
    ev = evaluate(LabelOnly(digits_model), attacks, digits.test, n=N)
    pgd, square, hsj = ev.records
    assert pgd.robust is None and "pgd needs the model's input gradients" in pgd.skipped and not pgd.error
    assert square.robust is None and "square needs the model's output scores" in square.skipped
    assert hsj.robust is not None and not hsj.skipped and hsj.robust_acc < ev.clean_acc
    assert not any(ev.flags.values()) and not ev.model_flags  # no gradient probes, no flag for a skip
    whole = evaluate(digits_model, [attacks[2]], digits.test, n=N, adaptive=False, probe_iterations=False)
    assert torch.equal(whole.records[0].robust, hsj.robust)  # HopSkipJump saw the labels either way
    scores = evaluate(ScoresOnly(digits_model), attacks[:2], digits.test, n=N).records
    assert scores[0].skipped and scores[1].robust is not None


def test_a_label_only_user_model_through_the_harness_and_the_cli(user_checkpoint, tmp_path, capsys):
    model, folder = user_checkpoint
    work = tmp_path / "w"
    clean, robust = benchmark(model, N, "digits", "L2", eps=1.0, attacks=["hsj", "apgd-ce"], device="cpu",
                              workdir=work, access="labels")
    assert robust < clean
    with Store(work / "store.sqlite") as store:
        rows = {r.attack: r for r in store.rows()}
    assert rows["apgd-ce"].status == SKIPPED and "needs the model's input gradients" in rows["apgd-ce"].error
    assert rows["hsj"].status == "ok" and rows["worst_case"].robust_acc == robust
    assert "incomplete" not in rows["worst_case"].flags and rows["hsj"].model.endswith("-label-only")
    args = ["eval", "--model", "small-cnn", "--weights", str(folder / "digits_cnn.safetensors"), "--data", "digits",
            "--threats", "l2:1.0", "--eps-curve", "l2:0:2:3", "--attacks", "hsj,pgd", "--access", "labels",
            "--n", str(N), "--device", "cpu", "--workdir", str(tmp_path / "cli"), "--out", str(tmp_path / "lb"),
            "--report", str(tmp_path / "rep"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped pgd (evasion l2 1): pgd needs the model's input gradients" in out
    assert "skipped pgd (curve l2 2)" in out and "curve l2 hsj" in out
    cells = pd.read_csv(tmp_path / "lb" / "cells.csv")
    assert set(cells.loc[cells["attack"] == "pgd", "status"]) == {SKIPPED}
    assert main(args) == 0  # skipped cells count as finished: a rerun computes nothing
    assert "0 cells computed" in capsys.readouterr().out
    assert main([("nothing" if a == "labels" else a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model access 'nothing'" in err
