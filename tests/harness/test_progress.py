"""Progress on everything that takes more than a few seconds: bars with the points left and an ETA
on a terminal (a pseudo-terminal here), one line per finished attack elsewhere, nothing with
``--no-progress``; the escalation ladder says what it does and why; the transfer surrogate never
trains more than its share of the ladder's budget; a run waiting on another run's lease says so
once and then shows how far the other run has got."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import sys
import termios
import threading
import time

import pytest
from torch import nn

from robustbench_lite import benchmark
from robustbench_lite.cli import main
from robustbench_lite.core.progress import LOGGER, Progress
from robustbench_lite.core.threat import ThreatModel
from robustbench_lite.eval.escalate import Escalation, surrogate_schedule
from robustbench_lite.harness import run as run_mod
from robustbench_lite.harness.kinds import evasion as evasion_kind
from robustbench_lite.harness.plan import Plan
from robustbench_lite.harness.store import Store
from robustbench_lite.harness.user import prepare, resolve_data, user_cells


def _eval_argv(folder, work, *extra, attacks="fgsm"):
    return ["eval", "--model", "small-cnn", "--weights", str(folder / "digits_cnn.safetensors"), "--data", "digits",
            "--threats", "linf:0.1", "--attacks", attacks, "--n", "30", "--device", "cpu", "--workdir", str(work),
            "--out", str(work / "lb"), "--report", str(work / "rep"), *extra]


@contextlib.contextmanager
def _terminal():
    """``sys.stderr`` on a pseudo-terminal of 120 columns; yields a function returning what was
    written to it so far (a thread drains it, so a full buffer never blocks the writer)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stream = os.fdopen(slave, "w", buffering=1)
    old = sys.stderr
    sys.stderr = stream
    try:
        assert sys.stderr.isatty()
        yield lambda: b"".join(chunks).decode("utf-8", "replace")
    finally:
        sys.stderr = old
        stream.flush()
        time.sleep(0.2)  # let the reader take the rest
        stream.close()
        reader.join(timeout=2)
        os.close(master)


@pytest.fixture
def lines():
    """The progress logger's records while the test runs (whatever the CLI configured before)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    yield records
    LOGGER.removeHandler(handler)
    LOGGER.setLevel(level)


def test_a_terminal_gets_bars_with_the_attack_the_points_left_and_an_eta(user_checkpoint, tmp_path, capsys):
    _, folder = user_checkpoint
    with _terminal() as written:
        code = main(_eval_argv(folder, tmp_path / "w", attacks="fgsm,pgd"))
        shown = written()
    assert code == 0, capsys.readouterr().err
    assert "cells:" in shown and "fgsm linf 0.1:" in shown and "pgd linf 0.1:" in shown, shown[-2000:]
    assert "\r" in shown and "%|" in shown and "point/s" in shown, shown[-2000:]  # a redrawn bar with its rate
    assert "<" in shown  # tqdm's "[elapsed<left]": the ETA
    assert "robust" not in shown  # no finished-task lines on a terminal: the bars are the progress


def test_without_a_terminal_one_line_per_finished_attack_with_its_time(user_checkpoint, tmp_path, capsys):
    _, folder = user_checkpoint
    assert main(_eval_argv(folder, tmp_path / "w", attacks="fgsm,pgd")) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err, err  # no bar in a log
    for attack in ("fgsm", "pgd"):
        mine = [ln for ln in err.splitlines() if f": {attack} linf 0.1:" in ln]
        assert len(mine) == 1, err
        assert "points attacked" in mine[0] and " s)" in mine[0] and "[cells " in mine[0], mine[0]


def test_no_progress_silences_the_bars_and_the_lines(user_checkpoint, tmp_path, capsys):
    _, folder = user_checkpoint
    with _terminal() as written:
        assert main(_eval_argv(folder, tmp_path / "tty", "--no-progress")) == 0
        shown = written()
    assert shown.strip() == "", shown
    assert main(_eval_argv(folder, tmp_path / "log", "--no-progress")) == 0
    assert capsys.readouterr().err == ""


def test_lines_name_training_curves_and_verification(tmp_path, capsys):
    """A grid with a trained model, a curve and a certified cell: each says when it is done."""
    cfg = tmp_path / "grid.toml"
    cfg.write_text("""
n = 30
[[datasets]]
name = "digits"
[[models]]
name = "small-cnn"
[[defenses]]
name = "standard"
epochs = 1
[[threats]]
threat = "linf:0.1"
attacks = ["fgsm"]
[[extra]]
defenses = ["standard"]
threat = "linf:0.1"
attacks = ["ibp"]
n = 30
kind = "certified"
[[curves]]
curve = "linf:0:0.1:3"
attacks = ["fgsm"]
""")
    code = main(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "lb")])
    err = capsys.readouterr().err
    assert code == 0, err
    for what in ("small-cnn/standard: train standard (1 epochs on", "small-cnn/standard: fgsm linf 0.1: ",
                 "small-cnn/standard: verify ibp linf 0.1: ", "small-cnn/standard: curve fgsm linf (2 eps"):
        assert sum(what in ln for ln in err.splitlines()) == 1, (what, err)
    assert "of 30 points verified" in err and "points attacked over 2 eps" in err and "[cells 2/3" in err, err


def test_the_ladder_says_why_and_the_surrogate_trains_within_its_share(user_checkpoint, tmp_path, monkeypatch, lines):
    """A softmax-output model fires probability-outputs: the ladder says so and trains a surrogate,
    within ``surrogate_share · budget · n`` training images seen; a share too small for a useful
    surrogate skips the transfer step with the reason."""
    model, _ = user_checkpoint
    softmax = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    n, limit = 20, 300
    cheap = dict(noise_steps=2, noise_samples=2, transfer_steps=3, square_queries=30)
    ladder = Escalation(**cheap, surrogate_share=limit / (6000.0 * n))
    assert ladder.surrogate_limit(n) == limit
    monkeypatch.setattr(evasion_kind, "ESCALATION", ladder)
    benchmark(softmax, n, "digits", eps=0.1, attacks=["fgsm"], device="cpu", workdir=tmp_path / "w", progress=True)
    text = "\n".join(lines)
    assert "checks fired (probability-outputs" in text and "escalating on the" in text, text
    assert "escalation transfer: training a surrogate" in text and "within 300 images seen" in text, text
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "w" / "models").glob("*.json")]
    trained = [s for s in sidecars if s["defense"] == "standard"]
    assert len(trained) == 1
    assert trained[0]["params"]["epochs"] * trained[0]["train_points"] <= limit
    assert (trained[0]["params"]["epochs"], trained[0]["train_points"]) == (1, 300)
    assert "escalation transfer: broke" in text

    monkeypatch.setattr(evasion_kind, "ESCALATION", Escalation(**cheap, surrogate_share=50 / (6000.0 * n)))
    lines.clear()
    benchmark(softmax, n, "digits", eps=0.1, attacks=["fgsm"], device="cpu", workdir=tmp_path / "w2", progress=True)
    assert any("escalation transfer: skipped" in ln and "raise Escalation.surrogate_share" in ln for ln in lines), lines
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "w2" / "models").glob("*.json")]
    assert not [s for s in sidecars if s["defense"] == "standard"]  # no surrogate trained


def test_surrogate_schedule_never_passes_the_limit():
    for epochs, points, limit in [(5, 60000, 24000), (5, 1437, 7185), (5, 1437, 5000), (5, 1437, 100), (3, 10, 10**9)]:
        e, m = surrogate_schedule(epochs, points, limit)
        assert 1 <= e <= epochs and 0 <= m <= points and e * m <= limit
    assert surrogate_schedule(5, 60000, 10**9) == (5, 60000)  # the recipe when it fits
    assert surrogate_schedule(5, 60000, 150000) == (2, 60000)  # fewer epochs first
    assert surrogate_schedule(5, 60000, 24000) == (1, 24000)  # then fewer images
    assert Escalation().surrogate_limit(40) == 24000 and Escalation().surrogate_limit(500) >= 5 * 60000


def test_a_run_waiting_on_another_runs_lease_says_so_once_then_shows_progress(user_checkpoint, digits, tmp_path,
                                                                              monkeypatch, caplog, lines):
    model, _ = user_checkpoint
    data_spec, data = resolve_data("digits")
    mspec, wspec, built = prepare(data, module=model)
    cells = user_cells(data_spec, mspec, wspec, threats=[ThreatModel("linf", 0.1)], attacks=["fgsm"], n=20,
                       num_classes=10)
    plan = Plan("wait", tuple(cells))
    prefix = run_mod.group_prefix(cells)
    held, go = threading.Event(), threading.Event()

    def other_run() -> None:
        with Store(tmp_path / "store.sqlite") as other:
            assert other.claim(prefix)
            held.set()
            go.wait(30)
            other.release(prefix)

    monkeypatch.setattr(run_mod, "WAIT_POLL_SECONDS", 0.05)
    thread = threading.Thread(target=other_run)
    thread.start()
    assert held.wait(30)
    threading.Timer(1.0, go.set).start()  # about 20 polls while it holds the group
    try:
        with caplog.at_level(logging.WARNING, logger="robustbench_lite.harness.run"):
            summary = run_mod.run_plan(plan, workdir=tmp_path, device="cpu", progress=Progress("lines"))
    finally:
        go.set()
        thread.join()
    said = [r for r in caplog.records if "being computed by another run" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert summary.waited == 1 and summary.computed == 1
    assert any(r.startswith("waiting for another run on this workdir: 0 of 1 cells stored by the other run") for r in lines), lines


def test_a_progress_reporter_in_each_mode(lines):
    with pytest.raises(ValueError, match="progress mode"):
        Progress("loud")
    with pytest.raises(TypeError, match="True, False or a Progress"):
        Progress.of("yes")
    off = Progress.of(False)
    assert not off and Progress.of(off) is off
    with off.task("x", 3) as task:
        task.update(2)
    assert task.done == 2 and task.closed
    rep = Progress("lines").child("m/d")
    rep.cells(["a", "b"])
    rep.cell_done("a")
    rep.cell_done("a")  # counted once
    with rep.task("pgd linf 0.1", 10) as task:
        task.update(10)
    with pytest.raises(RuntimeError), rep.task("broken", 5):
        raise RuntimeError("no line for a task that failed")
    rep.note("why")
    assert lines[0].startswith("m/d: pgd linf 0.1: 10 points (") and "s) [cells 1/2, about " in lines[0], lines
    assert lines[1:] == ["m/d: why"], lines
