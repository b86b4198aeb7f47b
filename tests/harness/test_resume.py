"""Resume never loses what an evaluation found: runs killed (SIGKILL) at every stage boundary of a
group's evaluation end, after resuming, with the same CSVs (flags included) as an uninterrupted
run; a kill mid-write leaves no truncated file; two concurrent runs compute each cell once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from robustbench_lite.harness.store import Store

# A do-nothing iterative gradient attack (FGSM beats it: single-step-beats-iterative) and an
# attack that declares itself gradient-free but runs PGD inside (it beats the do-nothing one:
# black-box-beats-white-box, a masking flag, so the adaptive rerun and the escalation ladder run
# too).  The ladder is made cheap.
PLUGIN = textwrap.dedent(
    '''
    import os
    import signal
    from dataclasses import dataclass

    import robustbench_lite.eval.evasion as evasion_mod
    import robustbench_lite.harness.kinds.evasion as kind_mod
    from robustbench_lite import EvasionAttack, create_attack, register_attack

    try:
        from robustbench_lite.eval.escalate import Escalation

        kind_mod.ESCALATION = Escalation(noise_steps=3, noise_samples=2, transfer_steps=3, square_queries=60)
    except ImportError:  # code from before the escalation ladder (the test shows what failed there)
        pass


    @register_attack("nothing-test")
    @dataclass(frozen=True, kw_only=True)
    class NothingTest(EvasionAttack):
        """Iterative in name only: returns the clean points."""

        @property
        def grad_budget(self):
            return 10.0

        def _perturb(self, model, x, y, target, gen):
            return x.clone()


    @register_attack("oracle-test")
    @dataclass(frozen=True, kw_only=True)
    class OracleTest(EvasionAttack):
        """Declared gradient-free, PGD inside: a black box that beats the white-box attacks."""

        needs_grad = False
        iterative = False

        def _perturb(self, model, x, y, target, gen):
            return create_attack("pgd", norm=self.norm, eps=self.eps, steps=10).run(model, x, y, gen).x_adv


    # a kill in the middle of the flag computation, for code without named kill points
    _real_cell_flags = evasion_mod.cell_flags


    def _dying_cell_flags(*args, **kwargs):
        marker = os.environ.get("RBL_TEST_DIE_IN_FLAGS")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return _real_cell_flags(*args, **kwargs)


    evasion_mod.cell_flags = _dying_cell_flags
    '''
)


def _cli(tmp: Path, work: str, out: str, attacks: str, env: dict | None = None) -> subprocess.CompletedProcess:
    plugin = tmp / "resume_plugin.py"
    if not plugin.exists():
        plugin.write_text(PLUGIN)
    cmd = [
        sys.executable, "-m", "robustbench_lite.cli", "--plugin", str(plugin), "run", "--preset", "smoke",
        "--attacks", attacks, "--threats", "linf:0.1", "--n", "40", "--workdir", str(tmp / work), "--out", str(tmp / out),
        "--no-progress",
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)


def _no_seconds(value):
    if isinstance(value, dict):
        return {k: _no_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_no_seconds(v) for v in value]
    return value


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    """Every CSV of a leaderboard folder, without wall-clock times (seconds of attacks, of training,
    and of the escalation steps inside ``metrics``)."""
    tables = {}
    for path in sorted(out.glob("*.csv")):
        df = pd.read_csv(path)
        if "metrics" in df.columns:
            df["metrics"] = [json.dumps(_no_seconds(json.loads(m))) if isinstance(m, str) and m else m for m in df["metrics"]]
        tables[path.name] = df.drop(columns=[c for c in ("seconds", "train_seconds", "code_version") if c in df.columns])
    return tables


def _same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def test_a_kill_between_the_attack_rows_and_their_flags_loses_no_flag(tmp_path):
    attacks = "fgsm,nothing-test"
    ref = _cli(tmp_path, "ref", "ref_out", attacks)
    assert ref.returncode == 0, ref.stderr
    wide = pd.read_csv(tmp_path / "ref_out" / "digits_linf_0.1.csv")
    assert "single-step-beats-iterative" in wide["flags"].iloc[0]
    killed = _cli(tmp_path, "work", "out", attacks, {"RBL_TEST_DIE_IN_FLAGS": str(tmp_path / "died")})
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "died").exists()
    resumed = _cli(tmp_path, "work", "out", attacks)
    assert resumed.returncode == 0, resumed.stderr
    _same(_tables(tmp_path / "ref_out"), _tables(tmp_path / "out"))


# each kill point in turn; every run resumes what the one before left and is killed at the next
KILLS = [
    "stage:checks",
    "stage:attack:*#2",  # two of the three attacks measured
    "stage:attack:*",  # the third
    "stage:probe:*",
    "stage:adaptive:*",  # one of the two adaptive reruns
    "stage:escalate:*",  # the ladder's first step (noise-EOT)
    "stage:escalate:*#2",  # its last step (the transfer step has no surrogate here, Square does)
    "commit:*",  # the rows are stored (one transaction); the leaderboard is not written yet
    "leaderboard-written",
]


def test_sigkill_at_every_stage_boundary_then_resume_gives_the_uninterrupted_csvs(tmp_path):
    attacks = "least-likely,nothing-test,oracle-test"  # least-likely: a second gradient attack to rerun
    ref = _cli(tmp_path, "ref", "ref_out", attacks)
    assert ref.returncode == 0, ref.stderr
    reference = _tables(tmp_path / "ref_out")
    flags = reference["digits_linf_0.1.csv"]["flags"].iloc[0]
    assert "black-box-beats-white-box" in flags and "adapted:rescale+noise-eot+fab+square" in flags
    for point in KILLS:
        killed = _cli(tmp_path, "work", "out", attacks, {"RBL_KILL_AT": point})
        assert killed.returncode == -signal.SIGKILL, f"not killed at {point}: {killed.stderr[-2000:]}"
        assert "Traceback" not in killed.stderr
    with Store(tmp_path / "work" / "store.sqlite") as store:
        assert store.rows(), "the last kills come after the rows are stored"
    resumed = _cli(tmp_path, "work", "out", attacks)
    assert resumed.returncode == 0, resumed.stderr
    assert "0 cells computed, 3 already done" in resumed.stdout
    _same(reference, _tables(tmp_path / "out"))


def test_two_concurrent_runs_on_one_workdir_compute_each_cell_once(tmp_path):
    plugin = tmp_path / "resume_plugin.py"
    plugin.write_text(PLUGIN)
    cmd = [
        sys.executable, "-m", "robustbench_lite.cli", "--plugin", str(plugin), "run", "--preset", "smoke",
        "--attacks", "fgsm,pgd", "--n", "60", "--workdir", str(tmp_path / "work"), "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([*cmd, "--out", str(tmp_path / f"out{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    computed = []
    for stdout, _ in outs:
        line = next(s for s in stdout.splitlines() if s.startswith("preset smoke:"))
        computed.append(int(line.split(":")[1].split("cells computed")[0]))
    with Store(tmp_path / "work" / "store.sqlite") as store:
        cells = [r for r in store.rows() if r.attack != "worst_case"]
    assert len(cells) == 4 and all(r.status == "ok" for r in cells)  # fgsm and pgd at linf 0.1 and at l2 1.0
    assert sum(computed) == 4, computed  # each cell once, in one run or the other
    _same(_tables(tmp_path / "out0"), _tables(tmp_path / "out1"))


def test_a_leaderboard_write_killed_midway_leaves_no_truncated_csv(tmp_path, monkeypatch):
    from robustbench_lite.report import leaderboard

    good = pd.DataFrame({"a": [1, 2]})
    target = tmp_path / "t.csv"
    leaderboard.write_csv(good, target)
    real = pd.DataFrame.to_csv

    def dying_to_csv(self, path, *args, **kwargs):
        Path(path).write_text("a\n")  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", dying_to_csv)
    with pytest.raises(KeyboardInterrupt):
        leaderboard.write_csv(pd.DataFrame({"a": [3, 4, 5]}), target)
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    assert pd.read_csv(target)["a"].tolist() == [1, 2]  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # and no temporary file left


def test_a_workdir_from_before_resumes_without_recomputing(tmp_path, caplog):
    """A workdir written before stages, leases and weight hashes: its finished cells are skipped,
    and a new cell loads its model (the old sidecar is checked by clean accuracy, then gets the
    hash) instead of retraining it."""
    import logging

    from robustbench_lite.harness.presets import get_preset
    from robustbench_lite.harness.run import run_plan

    def smoke(**kw):
        return run_plan(get_preset("smoke").plan(n=40, threats=None, **kw), workdir=tmp_path, progress=False)

    assert smoke(attacks=["fgsm"]).computed == 2
    with sqlite3.connect(tmp_path / "store.sqlite") as db:  # the old store had the cells table only
        db.execute("DROP TABLE stages")
        db.execute("DROP TABLE leases")
    (sidecar,) = (tmp_path / "models").glob("*.json")
    old = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: v for k, v in old.items() if k != "weights_sha256"}))
    again = smoke(attacks=["fgsm"])
    assert again.computed == 0 and again.skipped == 2
    with caplog.at_level(logging.INFO):
        more = smoke(attacks=["fgsm", "ifgsm"])
    assert more.computed == 1 and more.skipped == 2
    assert "retraining" not in caplog.text
    now = json.loads(sidecar.read_text())  # not retrained (same creation time), and now with the hash
    assert now["created"] == old["created"] and now["weights_sha256"] == old["weights_sha256"]
