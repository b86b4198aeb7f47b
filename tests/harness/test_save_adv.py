"""``--save-adv`` then ``replay``: the saved examples cover exactly the points the worst case counts
broken, every one re-judged adversarial on the model that made it; another model gives the
transfer rate; a run interrupted mid-evaluation resumes with every file; cells computed before the
flag are named in a warning; bad files and other data are refused."""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from robustbench_lite import ModelSpec, ThreatModel, benchmark
from robustbench_lite.cli import main
from robustbench_lite.eval.adversarial import AdvExamples, read_examples, write_examples
from robustbench_lite.harness import faults
from robustbench_lite.harness.kinds.evasion import worst_case_key
from robustbench_lite.harness.plan import Cell, Plan
from robustbench_lite.harness.rows import WORST_CASE
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store

N = 60


def _saved(folder) -> list:
    return [read_examples(p) for p in sorted(folder.glob("*.safetensors"))]


def _covered(saved, n: int) -> torch.Tensor:
    hit = torch.zeros(n, dtype=torch.bool)
    for s in saved:
        hit[s.examples.index] = True
    return hit


def _replay(capsys, folder, weights, *extra):
    rc = main(["replay", str(folder), "--model", "small-cnn", "--weights", str(weights), "--device", "cpu", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_save_adv_then_replay_rejudges_every_example_and_another_model_gives_the_transfer_rate(
        user_checkpoint, digits_model, digits, tmp_path, capsys):
    model, folder = user_checkpoint
    adv, work = tmp_path / "adv", tmp_path / "w"
    assert main(["eval", "--model", "small-cnn", "--weights", str(folder / "digits_cnn.safetensors"), "--data", "digits",
                 "--threats", "linf:0.1", "--attacks", "quick", "--n", str(N), "--device", "cpu", "--workdir", str(work),
                 "--out", str(tmp_path / "lb"), "--report", str(tmp_path / "rep"), "--no-progress",
                 "--save-adv", str(adv)]) == 0
    saved = _saved(adv)
    assert sorted(s.attack for s in saved) == ["fgsm", "pgd"]
    with Store(work / "store.sqlite") as store:
        rows = {r.attack: store.get(r.key) for r in store.rows() if r.kind == "evasion"}
    for s in saved:  # the file says what made it
        row = rows[s.attack][0]
        assert s.meta["model_key"] == row.model_key and s.meta["dataset"] == "digits" and s.n == N
        assert json.loads(s.meta["attack_params"]) == json.loads(row.attack_params)
        assert s.threat == ThreatModel("linf", 0.1) and s.meta["complete"] == "true"
        assert torch.equal(s.examples.label, digits.test.y[s.examples.index])
    with torch.no_grad():
        correct = model(digits.test.x[:N]).argmax(1) == digits.test.y[:N]
    assert torch.equal(_covered(saved, N), correct & ~rows[WORST_CASE][1])  # exactly the points counted broken
    capsys.readouterr()

    rc, out, err = _replay(capsys, adv, folder / "digits_cnn.safetensors")  # --data defaults to the files' dataset
    assert rc == 0, err
    for s in saved:
        k = len(s.examples)
        assert f"{s.path.name}: {s.attack} at linf 0.1, {k} examples (made on this model): misclassified {k}/{k}" in out

    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in digits_model.state_dict().items()}, str(other))
    rc, out, err = _replay(capsys, adv, other, "--data", "digits")
    assert rc == 0, err
    x = torch.cat([s.examples.x_adv for s in saved])
    y = torch.cat([s.examples.label for s in saved])
    with torch.no_grad():
        fooled = int((digits_model(x).argmax(1) != y).sum())
    with torch.no_grad():
        idx = torch.cat([s.examples.index for s in saved])
        right = digits_model(digits.test.x[idx]).argmax(1) == y
        fooled_right = int((right & (digits_model(x).argmax(1) != y)).sum())
    assert "transfer from small-cnn/digits_cnn.safetensors" in out
    assert sum(int(m.group(2)) for m in re.finditer(r"of the (\d+) points .*?, (\d+) are misclassified", out)) == fooled_right
    assert f"{len(saved)} file(s), {len(y)} examples: {fooled} misclassified ({100 * fooled / len(y):.1f}%)" in out

    # a tampered file fails (exit 1); files that are not examples and other data are refused (exit 2)
    s = saved[0]
    moved = s.examples.x_adv.clone()
    moved[0] = (digits.test.x[int(s.examples.index[0])] + 0.4).clamp(0, 1)
    bad = tmp_path / "bad"
    write_examples(bad / "x.safetensors", AdvExamples(s.examples.index, moved, s.examples.label, s.examples.pred), s.meta)
    rc, out, err = _replay(capsys, bad, folder / "digits_cnn.safetensors")
    assert rc == 1 and "outside the ball: 1" in out and "FAILED" in out
    assert err.startswith("robustbench-lite: error: replay failed: 1 example(s) of fgsm") and err.count("\n") == 1
    rc, _, err = _replay(capsys, other, folder / "digits_cnn.safetensors")
    assert rc == 2 and "not an adversarial-examples file" in err and err.count("\n") == 1
    npz = tmp_path / "shifted.npz"
    np.savez(npz, x=digits.test.x[1 : N + 1].numpy(), y=digits.test.y[1 : N + 1].numpy())
    rc, _, err = _replay(capsys, adv, folder / "digits_cnn.safetensors", "--data", str(npz))
    assert rc == 2 and "made on other points" in err


def test_benchmark_save_adv_writes_the_examples_of_its_attacks(user_checkpoint, digits, tmp_path):
    model, _ = user_checkpoint
    clean, robust = benchmark(model, 40, digits, "Linf", eps=0.1, attacks="fgsm", device="cpu", save_adv=tmp_path / "adv")
    (s,) = _saved(tmp_path / "adv")
    assert s.attack == "fgsm" and len(s.examples) == round(40 * (clean - robust))


class Killed(BaseException):
    """What a kill -9 at a stage boundary does to the run (nothing after it happens)."""


def _kill_at(monkeypatch, pattern: str, nth: int) -> None:
    seen = []

    def point(name: str) -> None:
        if fnmatch.fnmatchcase(name, pattern):
            seen.append(name)
            if len(seen) == nth:
                raise Killed(name)

    monkeypatch.setattr(faults, "point", point)


def _plan(*eps: float, n: int = 40) -> Plan:
    """FGSM at each eps on the session's digits model (the conftest recipe: its cache is copied in,
    so nothing trains; FGSM alone keeps the more-iterations probe out)."""
    defense = DefenseSpec("standard", {"epochs": 8, "batch_size": 64, "lr": 3e-3})
    return Plan("t", tuple(Cell(DataSpec("digits"), ModelSpec("small-cnn"), defense, AttackSpec("fgsm"),
                                ThreatModel("linf", e), n) for e in eps))


def test_a_run_interrupted_mid_evaluation_resumes_with_every_file_and_names_cells_computed_before_the_flag(
        digits_model, digits, model_cache, tmp_path, monkeypatch, caplog):
    plan = _plan(0.05, 0.1, 0.15)
    work, adv = tmp_path / "w", tmp_path / "adv"
    shutil.copytree(model_cache.root, work / "models")
    _kill_at(monkeypatch, "stage:attack:*", 2)
    with pytest.raises(Killed):
        run_plan(plan, workdir=work, device="cpu", progress=False, save_adv=adv)
    first = {p.name: p.stat().st_mtime_ns for p in adv.glob("*.safetensors")}
    assert len(first) == 2  # written before their stages were stored
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        summary = run_plan(plan, workdir=work, device="cpu", progress=False, save_adv=adv)
    assert summary.errors == 0 and "no adversarial examples" not in caplog.text and "retraining" not in caplog.text
    saved = _saved(adv)
    assert len(saved) == 3 and all(s.meta["complete"] == "true" for s in saved)
    assert all(adv.joinpath(name).stat().st_mtime_ns == t for name, t in first.items())  # resumed, not redone
    with torch.no_grad():
        correct = digits_model(digits.test.x[:40]).argmax(1) == digits.test.y[:40]
    with Store(work / "store.sqlite") as store:
        for cell in plan.cells:  # per threat: exactly the points its worst case counts broken
            worst = store.get(worst_case_key([cell]))[1]
            mine = [s for s in saved if s.threat == cell.threat]
            assert len(mine) == 1 and torch.equal(_covered(mine, 40), correct & ~worst)
        model_key = store.get(plan.cells[0].key)[0].model_key
    assert main(["replay", str(adv), "--model", "small-cnn", "--weights", str(work / "models" / f"{model_key}.safetensors"),
                 "--device", "cpu"]) == 0  # a harness-trained model is recognised as the one that made them

    # cells finished by a run without --save-adv: not redone, named in a warning
    later = tmp_path / "w2"
    shutil.copytree(model_cache.root, later / "models")
    run_plan(_plan(0.1), workdir=later, device="cpu", progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_plan(_plan(0.1, 0.05), workdir=later, device="cpu", progress=False, save_adv=tmp_path / "adv2")
    assert re.search(r"1 attack cell\(s\) \(fgsm@linf_0.1\) have no adversarial examples", caplog.text), caplog.text
    assert [s.threat.eps for s in _saved(tmp_path / "adv2")] == [0.05]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a finished group says it too
        run_plan(_plan(0.1, 0.05), workdir=later, device="cpu", progress=False, save_adv=tmp_path / "adv2")
    assert "fgsm@linf_0.1" in caplog.text and "fgsm@linf_0.05" not in caplog.text
