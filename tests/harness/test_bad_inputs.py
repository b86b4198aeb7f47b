"""Bad input, table-driven: every case ends in one clear line (the exit code or exception type that
says what kind of problem it is, and a message naming the fix), never a traceback and never
silence.  Damaged workdir files are reported or recovered from.

CLI cases run in one subprocess (``_DRIVER`` calls ``main`` for each, with stderr captured per
case; an exception escaping ``main`` would be a traceback); a few need a process of their own
(Ctrl-C).  API cases run in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from robustbench_lite import (
    DataSplit,
    ModelSpec,
    create_attack,
    create_defense,
    evaluate,
    load,
    register_attack,
    register_defense,
    register_kind,
    register_model,
    register_verifier,
)
from robustbench_lite.cli import (
    EXIT_BAD_INPUT,
    EXIT_CELLS_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PLUGIN,
    EXIT_WORKDIR,
)
from robustbench_lite.eval import flags as checks
from robustbench_lite.harness.autotune import BatchTuner
from robustbench_lite.harness.presets import get_preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.specs import DataSpec
from robustbench_lite.harness.store import Store, StoreError, unpack_mask
from robustbench_lite.training.cache import ModelCache, train_or_load

# -------------------------------------------------------------------------------------------------
# plugin files
# -------------------------------------------------------------------------------------------------

GOOD_PLUGIN = textwrap.dedent(
    '''
    """Models and a defense and dataset that go wrong in the ways a user's own might."""
    import time
    from dataclasses import dataclass, replace
    from pathlib import Path

    import torch
    from torch import nn

    from robustbench_lite import Defense, EvasionAttack, ModelSpec, TrainLog, load, register_attack, register_dataset
    from robustbench_lite import register_defense, register_model
    from robustbench_lite.core.models import small_cnn
    from robustbench_lite.harness.presets import PRESETS


    class _Head(nn.Module):
        def __init__(self, body, fn):
            super().__init__()
            self.body, self.fn = body, fn

        def forward(self, x):
            return self.fn(self.body(x))


    @register_model("five-logits-test")
    def five_logits(input_shape, num_classes):
        return small_cnn(input_shape, 5)


    @register_model("flat-output-test")
    def flat_output(input_shape, num_classes):
        return _Head(small_cnn(input_shape, num_classes), lambda z: z[:, 0])


    @register_model("extra-dim-test")
    def extra_dim(input_shape, num_classes):
        return _Head(small_cnn(input_shape, num_classes), lambda z: z[:, :, None])


    class _NanInEval(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            z = self.body(x)
            return z if self.training else z * float("nan")


    @register_model("nan-eval-test")
    def nan_eval(input_shape, num_classes):
        return _NanInEval(small_cnn(input_shape, num_classes))


    @register_defense("explodes-test")
    @dataclass(frozen=True, kw_only=True)
    class Explodes(Defense):
        """Training raises."""

        def batch_loss(self, model, x, y, state):
            raise RuntimeError("this defense is broken on purpose")


    @register_defense("collapse-test")
    @dataclass(frozen=True, kw_only=True)
    class Collapse(Defense):
        """Every weight zero, the last bias picks class 0: clean accuracy 0 where there is no 0."""

        def fit(self, model, data, *, device="cpu", progress=True, policy=None):
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
                list(model.parameters())[-1][0] = 1.0
            return TrainLog([], 0.0)


    @register_dataset("digits-nonzero-test")
    def digits_nonzero(root):
        d = load("digits")
        keep = (d.test.y != 0).nonzero().flatten()
        return d.train, d.test.subset(keep), d.num_classes


    @register_attack("sleepy-test")
    @dataclass(frozen=True, kw_only=True)
    class Sleepy(EvasionAttack):
        """Says it started (a marker file), then sleeps: something to interrupt."""

        def _perturb(self, model, x, y, target, gen):
            import os

            Path(os.environ["RBL_TEST_MARKER"]).write_text("started")
            time.sleep(120)
            return x


    # the smoke preset with each of these models (the CLI picks models through presets)
    for _name, _model in (("five-test", "five-logits-test"), ("flat-test", "flat-output-test"),
                          ("extra-test", "extra-dim-test"), ("nan-test", "nan-eval-test")):
        PRESETS[_name] = replace(PRESETS["smoke"], name=_name, models=(ModelSpec(_model),))
    '''
)

BAD_PLUGINS = {
    "syntax": "def broken(:\n    pass\n",
    "raises": "import math\nraise RuntimeError('plugin setup failed on purpose')\n",
    "int_attack": "from robustbench_lite import register_attack\nregister_attack('int-test')(42)\n",
    "plain_attack": "from robustbench_lite import register_attack\n\n@register_attack('plain-test')\nclass Plain:\n    pass\n",
    "plain_defense": "from robustbench_lite import register_defense\n\n@register_defense('plain-def-test')\nclass Plain:\n    pass\n",
    "upper_name": "from robustbench_lite import register_attack, EvasionAttack\n\n"
    "@register_attack('Upper')\nclass U(EvasionAttack):\n    pass\n",
    "shadow": "from robustbench_lite import register_attack, EvasionAttack\n\n"
    "@register_attack('pgd')\nclass P(EvasionAttack):\n    pass\n",
    "model_not_callable": "from robustbench_lite import register_model\nregister_model('three-test')(3)\n",
    "import_missing": "import no_such_module_for_rbl\n",
}

_DRIVER = textwrap.dedent(
    '''
    import contextlib, io, json, logging, sys
    from robustbench_lite.cli import main

    cases = json.load(open(sys.argv[1]))
    results = []
    for case in cases:
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(case["argv"])
            except SystemExit as exc:  # argparse
                code = exc.code
            except BaseException as exc:  # escaped main: the CLI would print a traceback
                code = "escaped: " + type(exc).__name__ + ": " + str(exc)
        results.append({"name": case["name"], "code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
    json.dump(results, open(sys.argv[2], "w"))
    '''
)


@dataclass
class Case:
    name: str
    argv: list[str]
    code: int
    says: tuple[str, ...]  # substrings of stderr (lower case compare) that name the problem and the fix
    check: object = None  # optional function(tmp, result) for what else must hold
    extra: dict = field(default_factory=dict)


def _smoke(*args: str, work: str = "work", preset: str = "smoke") -> list[str]:
    return ["run", "--preset", preset, "--threats", "linf:0.1", "--attacks", "fgsm", "--n", "40", "--no-progress",
            "--workdir", f"{{tmp}}/{work}", "--out", f"{{tmp}}/out_{work}", *args]


def _store_empty(tmp: Path, work: str = "work") -> None:
    path = tmp / work / "store.sqlite"
    if path.exists():
        with Store(path) as s:
            assert len(s) == 0


def _csv(tmp: Path, work: str, name: str = "digits_linf_0.1.csv") -> pd.DataFrame:
    return pd.read_csv(tmp / f"out_{work}" / name)


def _cli_cases() -> list[Case]:
    plugin = "{tmp}/good_plugin.py"
    cases = [
        Case("unknown preset", ["run", "--preset", "nope", "--workdir", "{tmp}/w0"], EXIT_BAD_INPUT, ("choose one of",)),
        Case("--n 0", _smoke("--n", "0"), EXIT_BAD_INPUT, ("--n", "must be >= 1")),
        Case("--n negative", _smoke("--n", "-5"), EXIT_BAD_INPUT, ("--n", ">= 1")),
        Case("--n not a number", _smoke("--n", "abc"), EXIT_BAD_INPUT, ("--n", "whole number")),
        Case("--threats empty", _smoke("--threats", ""), EXIT_BAD_INPUT, ("--threats", "expected comma-separated")),
        Case("--threats eps 0", _smoke("--threats", "linf:0"), EXIT_BAD_INPUT, ("eps",)),
        Case("--threats no eps", _smoke("--threats", "linf"), EXIT_BAD_INPUT, ("norm:eps",)),
        Case("--threats unknown norm", _smoke("--threats", "l7:0.1"), EXIT_BAD_INPUT, ("l7",)),
        Case("--threats eps not a number", _smoke("--threats", "linf:abc"), EXIT_BAD_INPUT, ("abc",)),
        Case("--attacks empty", _smoke("--attacks", ","), EXIT_BAD_INPUT, ("--attacks", "expected comma-separated")),
        Case("--attacks unknown", _smoke("--attacks", "nope"), EXIT_BAD_INPUT, ("unknown attack 'nope'", "--plugin")),
        Case("--attacks typo", _smoke("--attacks", "pgdd"), EXIT_BAD_INPUT, ("did you mean 'pgd'",)),
        Case("--defenses unknown", _smoke("--defenses", "nope", work="w_def"), EXIT_BAD_INPUT, ("unknown defense 'nope'",),
             check=lambda tmp, r: _store_empty(tmp, "w_def")),
        Case("--defenses empty", _smoke("--defenses", " "), EXIT_BAD_INPUT, ("--defenses",)),
        Case("--datasets unknown", _smoke("--datasets", "mnits"), EXIT_BAD_INPUT, ("unknown dataset 'mnits'", "did you mean")),
        Case("--batch-size 0", _smoke("--batch-size", "0"), EXIT_BAD_INPUT, ("--batch-size", ">= 1")),
        Case("--batch-size word", _smoke("--batch-size", "big"), EXIT_BAD_INPUT, ("--batch-size", "'auto'")),
        Case("--device unknown", _smoke("--device", "tpu"), EXIT_BAD_INPUT, ("unknown device", "cuda:n")),
        Case("--autocast unknown", _smoke("--autocast", "fp8"), EXIT_BAD_INPUT, ("--autocast", "invalid choice")),
        Case("--executor unknown", _smoke("--executor", "dask"), EXIT_BAD_INPUT, ("--executor", "invalid choice")),
        Case("--ray-cpus 0", _smoke("--ray-cpus", "0"), EXIT_BAD_INPUT, ("--ray-cpus", ">= 1")),
        Case("list unknown registry", ["list", "gadgets"], EXIT_BAD_INPUT, ("invalid choice", "attacks")),
        Case("workdir is a file", _smoke("--workdir", "{tmp}/a_file"), EXIT_WORKDIR, ("a file is in the way", "--workdir")),
        Case("workdir not writable", _smoke("--workdir", "/sys/rbl_test_workdir"), EXIT_WORKDIR, ("permission denied", "--workdir")),
        Case("store is a folder", _smoke("--workdir", "{tmp}/store_dir"), EXIT_WORKDIR, ("is a folder", "--workdir")),
        Case("out is a file", _smoke("--out", "{tmp}/a_file", work="w_outfile"), EXIT_WORKDIR, ("a file is in the way", "--out"),
             check=lambda tmp, r: _store_empty(tmp, "w_outfile")),
        Case("out not writable", _smoke("--out", "/sys/rbl_test_out", work="w_outro"), EXIT_WORKDIR, ("--out", "writable")),
        Case("leaderboard: workdir typo", ["leaderboard", "--workdir", "{tmp}/wrok"], EXIT_BAD_INPUT, ("no results store", "--workdir")),
        Case("report: workdir typo", ["report", "--workdir", "{tmp}/wrok", "--out", "{tmp}/rep"], EXIT_BAD_INPUT, ("no results store",)),
        Case("leaderboard: empty store", ["leaderboard", "--workdir", "{tmp}/empty_store"], EXIT_BAD_INPUT, ("no cells yet", "run")),
        Case("leaderboard: garbled store", ["leaderboard", "--workdir", "{tmp}/garbled"], EXIT_WORKDIR, ("damaged", "mv ", "restore")),
        Case("leaderboard: truncated store", ["leaderboard", "--workdir", "{tmp}/truncated"], EXIT_WORKDIR, ("damaged", "restore")),
        Case("leaderboard: header damaged", ["leaderboard", "--workdir", "{tmp}/header"], EXIT_WORKDIR, ("damaged", "restore")),
        Case("leaderboard: data page damaged", ["leaderboard", "--workdir", "{tmp}/datapage"], EXIT_WORKDIR, ("damaged", "restore")),
        Case("run: a mask blob truncated", _smoke(work="w_mask"), EXIT_WORKDIR, ("mask is damaged", "mv ", "restore")),
        Case("plugin missing", ["--plugin", "{tmp}/nope.py", "list"], EXIT_BAD_INPUT, ("--plugin", "existing .py")),
        Case("plugin not .py", ["--plugin", "{tmp}/a_file", "list"], EXIT_BAD_INPUT, ("--plugin", ".py")),
        Case("plugin syntax error", ["--plugin", "{tmp}/p_syntax.py", "list"], EXIT_PLUGIN, ("p_syntax.py", "line 1", "syntaxerror")),
        Case("plugin raises at import", ["--plugin", "{tmp}/p_raises.py", "list"], EXIT_PLUGIN, ("line 2", "failed on purpose")),
        Case("plugin imports a missing module", ["--plugin", "{tmp}/p_import_missing.py", "list"], EXIT_PLUGIN,
             ("modulenotfounderror", "no_such_module_for_rbl")),
        Case("plugin registers 42", ["--plugin", "{tmp}/p_int_attack.py", "list"], EXIT_PLUGIN, ("register a subclass", "got int 42")),
        Case("plugin registers a plain class", ["--plugin", "{tmp}/p_plain_attack.py", "list"], EXIT_PLUGIN,
             ("evasionattack", "got class plain")),
        Case("plugin registers a plain defense", ["--plugin", "{tmp}/p_plain_defense.py", "list"], EXIT_PLUGIN,
             ("defense 'plain-def-test'", "subclass of robustbench_lite.training.defense.defense")),
        Case("plugin: upper-case name", ["--plugin", "{tmp}/p_upper_name.py", "list"], EXIT_PLUGIN, ("lower-case",)),
        Case("plugin shadows a built-in", ["--plugin", "{tmp}/p_shadow.py", "list"], EXIT_PLUGIN, ("already registered", "another name")),
        Case("plugin registers a non-callable model", ["--plugin", "{tmp}/p_model_not_callable.py", "list"], EXIT_PLUGIN,
             ("function or class",)),
        Case("-v keeps the traceback", ["-v", "--plugin", "{tmp}/p_raises.py", "list"], EXIT_PLUGIN, ("traceback", "failed on purpose")),
        # runs that compute: loud, and right
        Case("--attacks fgsm,fgsm", _smoke("--attacks", "fgsm,fgsm", work="w_dup"), EXIT_OK, ("given more than once",),
             check=lambda tmp, r: "1 cells computed" in r["stdout"]),
        Case("--n beyond the test set", _smoke("--n", "1000000000", work="w_big"), EXIT_OK, ("360 test points", "n=360"),
             check=lambda tmp, r: int(_csv(tmp, "w_big")["n"].iloc[0]) == 360),
        Case("training raises", ["--plugin", plugin, *_smoke("--defenses", "explodes-test", work="w_explode")], EXIT_CELLS_FAILED,
             ("training", "failed", "broken on purpose")),
        Case("model with 5 logits for 10 classes", ["--plugin", plugin, *_smoke(work="w_five", preset="five-test")],
             EXIT_CELLS_FAILED, ("five-logits-test", "5 logits", "10 classes")),
        Case("model returns (N,)", ["--plugin", plugin, *_smoke(work="w_flat", preset="flat-test")], EXIT_CELLS_FAILED,
             ("shape (2,)", "(batch, num_classes)")),
        Case("model returns (N, 10, 1)", ["--plugin", plugin, *_smoke(work="w_extra", preset="extra-test")], EXIT_CELLS_FAILED,
             ("shape (2, 10, 1)", "(batch, num_classes)")),
        Case("model returns NaN", ["--plugin", plugin, *_smoke(work="w_nan", preset="nan-test")], EXIT_OK, (),
             check=lambda tmp, r: "non-finite-outputs" in _csv(tmp, "w_nan")["flags"].iloc[0]
             and "randomized" not in _csv(tmp, "w_nan")["flags"].iloc[0]),
        Case("defense reaches clean accuracy 0", ["--plugin", plugin, *_smoke("--defenses", "collapse-test", "--datasets",
             "digits-nonzero-test", work="w_zero")], EXIT_OK, (),
             check=lambda tmp, r: _csv(tmp, "w_zero", "digits-nonzero-test_linf_0.1.csv")[["clean_acc", "fgsm", "worst_case"]]
             .iloc[0].tolist() == [0.0, 0.0, 0.0]),
        # damaged workdir files: recovered from (a warning, the file recomputed)
        Case("sidecar train_seconds 'abc'", _smoke(work="w_side_abc"), EXIT_OK, ("train_seconds", "retraining"),
             check=lambda tmp, r: float(_csv(tmp, "w_side_abc")["train_seconds"].iloc[0]) > 0),
        Case("sidecar is []", _smoke(work="w_side_list"), EXIT_OK, ("holds a list", "retraining")),
        Case("sidecar does not parse", _smoke(work="w_side_garbled"), EXIT_OK, ("does not parse", "retraining")),
        Case("weights truncated (old sidecar)", _smoke(work="w_wt_trunc"), EXIT_OK, ("cannot be loaded", "retraining")),
        Case("weights garbled", _smoke(work="w_wt_garbled"), EXIT_OK, ("sha-256", "retraining")),
        Case("weights of another architecture (old sidecar)", _smoke(work="w_wt_arch"), EXIT_OK, ("cannot be loaded", "retraining")),
        Case("weights swapped (hash in sidecar)", _smoke(work="w_wt_swap"), EXIT_OK, ("sha-256", "retraining"),
             check=lambda tmp, r: _csv(tmp, "w_wt_swap")["clean_acc"].iloc[0] > 0.5),
        Case("weights swapped (old sidecar, no hash)", _smoke(work="w_wt_swap_old"), EXIT_OK, ("clean accuracy", "retraining"),
             check=lambda tmp, r: _csv(tmp, "w_wt_swap_old")["clean_acc"].iloc[0] > 0.5),
        Case("sidecar clean_acc disagrees with the weights", _smoke(work="w_side_acc"), EXIT_OK, ("clean accuracy", "may not be"),
             check=lambda tmp, r: "clean-acc-mismatch" in _csv(tmp, "w_side_acc")["flags"].iloc[0]),
        Case("autotune.json is []", [*_smoke(work="w_tune_list"), "--batch-size", "auto"], EXIT_OK, ("autotune", "probing again")),
        Case("autotune batch 'abc'", [*_smoke(work="w_tune_abc"), "--batch-size", "auto"], EXIT_OK, ("autotune", "probing again")),
    ]
    return cases


def _prepare(tmp: Path, ref_work: Path) -> None:
    """The files the CLI cases read: plugins, damaged stores, damaged copies of a trained workdir."""
    (tmp / "good_plugin.py").write_text(GOOD_PLUGIN)
    for name, text in BAD_PLUGINS.items():
        (tmp / f"p_{name}.py").write_text(text)
    (tmp / "a_file").write_text("not a folder")
    (tmp / "store_dir" / "store.sqlite").mkdir(parents=True)
    (tmp / "empty_store").mkdir()
    Store(tmp / "empty_store" / "store.sqlite").close()
    store_bytes = (ref_work / "store.sqlite").read_bytes()
    for name, data in {
        "garbled": bytes(b ^ 0x5A for b in store_bytes),
        "truncated": store_bytes[: len(store_bytes) // 3],
        "header": b"\0" * 100 + store_bytes[100:],
        "datapage": store_bytes[:4096] + b"\xff" * 4096 + store_bytes[8192:],
    }.items():
        (tmp / name).mkdir()
        (tmp / name / "store.sqlite").write_bytes(data)
    models = sorted((ref_work / "models").glob("*.safetensors"))
    assert len(models) == 1
    key = models[0].stem
    for work in ("w_mask", "w_side_abc", "w_side_list", "w_side_garbled", "w_wt_trunc", "w_wt_garbled", "w_wt_arch",
                 "w_wt_swap", "w_wt_swap_old", "w_tune_list", "w_tune_abc", "w_side_acc"):
        shutil.copytree(ref_work, tmp / work)
    with sqlite3.connect(tmp / "w_mask" / "store.sqlite") as db:  # a stored mask cut short
        db.execute("UPDATE cells SET mask = substr(mask, 1, 1) WHERE mask IS NOT NULL")
    models_of = {w: tmp / w / "models" for w in ("w_side_abc", "w_side_list", "w_side_garbled", "w_wt_trunc", "w_wt_garbled",
                                                 "w_wt_arch", "w_wt_swap", "w_wt_swap_old")}
    for w in [*models_of, "w_tune_list", "w_tune_abc", "w_side_acc"]:  # the store says done; drop it so the cells run (and load the model)
        (tmp / w / "store.sqlite").unlink()
    side = json.loads((models_of["w_side_abc"] / f"{key}.json").read_text())
    old = {k: v for k, v in side.items() if k != "weights_sha256"}  # a sidecar from before weight hashes
    (models_of["w_side_abc"] / f"{key}.json").write_text(json.dumps({**side, "train_seconds": "abc"}))
    (models_of["w_side_list"] / f"{key}.json").write_text("[]")
    (tmp / "w_side_acc" / "models" / f"{key}.json").write_text(json.dumps({**side, "clean_acc": 0.2}))
    (models_of["w_side_garbled"] / f"{key}.json").write_text('{"key": ')
    weights = (ref_work / "models" / f"{key}.safetensors").read_bytes()
    (models_of["w_wt_trunc"] / f"{key}.safetensors").write_bytes(weights[: len(weights) // 2])
    for w in ("w_wt_trunc", "w_wt_arch", "w_wt_swap_old"):
        (models_of[w] / f"{key}.json").write_text(json.dumps(old))
    (models_of["w_wt_garbled"] / f"{key}.safetensors").write_bytes(bytes(b ^ 0x33 for b in weights))
    from safetensors.torch import save_file

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(models_of["w_wt_arch"] / f"{key}.safetensors"))
    # same shapes, other weights: the small-cnn at initialization (seed 1)
    torch.manual_seed(1)
    other = ModelSpec("small-cnn").build(load("digits"))
    for w in ("w_wt_swap", "w_wt_swap_old"):
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(models_of[w] / f"{key}.safetensors"))
    (tmp / "w_tune_list" / "autotune.json").write_text("[]")
    tuner_key = f"{key}|grad|cpu|float32|40"  # BatchTuner.cache_key for the fgsm cells on 40 points
    (tmp / "w_tune_abc" / "autotune.json").write_text(json.dumps({tuner_key: {"batch": "abc"}}))


def _drive(tmp: Path, cases: list[Case]) -> list[dict]:
    spec = [{"name": c.name, "argv": [a.replace("{tmp}", str(tmp)) for a in c.argv]} for c in cases]
    (tmp / "cases.json").write_text(json.dumps(spec))
    (tmp / "driver.py").write_text(_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(tmp / "cases.json"), str(tmp / "results.json")],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads((tmp / "results.json").read_text())


def test_bad_cli_inputs_end_in_one_clear_line_and_a_distinct_exit_code(tmp_path):
    ref_work = tmp_path / "ref"
    summary = run_plan(
        get_preset("smoke").plan(attacks=["fgsm"], threats=None, n=40), workdir=ref_work, progress=False
    )
    assert summary.errors == 0
    from robustbench_lite.report import leaderboard

    with Store(ref_work / "store.sqlite") as s:
        leaderboard.write(s.rows(), tmp_path / "out_ref")
    _prepare(tmp_path, ref_work)
    cases = _cli_cases()
    results = _drive(tmp_path, cases)
    failures = []
    for case, res in zip(cases, results, strict=True):
        err = res["stderr"].lower()
        problems = []
        if res["code"] != case.code:
            problems.append(f"exit {res['code']!r}, wanted {case.code}")
        missing = [s for s in case.says if s.lower() not in err]
        if missing:
            problems.append(f"stderr lacks {missing}")
        if "traceback" in err and "-v" not in case.argv:
            problems.append("a traceback")
        if case.code != EXIT_OK and not err.strip():
            problems.append("silent")
        if case.code not in (EXIT_OK, EXIT_CELLS_FAILED):  # failures are one line (plus argparse's usage)
            lines = [ln for ln in res["stderr"].splitlines() if ln.strip() and not ln.startswith(("usage:", "  ", "traceback"))]
            if "-v" not in case.argv and len([ln for ln in lines if "error" in ln.lower()]) != 1:
                problems.append(f"{len(lines)} lines")
        if not problems and case.check is not None:
            try:
                if case.check(tmp_path, res) is False:
                    problems.append("check failed")
            except Exception as exc:  # noqa: BLE001 - reported with the case
                problems.append(f"check raised {type(exc).__name__}: {exc}")
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}\n    stderr: {res['stderr'][-600:]}")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 60


def test_ctrl_c_ends_in_one_line_and_exit_130(tmp_path):
    (tmp_path / "good_plugin.py").write_text(GOOD_PLUGIN)
    marker = tmp_path / "started"
    cmd = [sys.executable, "-m", "robustbench_lite.cli", "--plugin", str(tmp_path / "good_plugin.py"), "run", "--preset", "smoke",
           "--attacks", "sleepy-test", "--threats", "linf:0.1", "--n", "20", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "o"), "--no-progress"]
    # a shell's background job (nohup, `&`) starts with SIGINT ignored, and children inherit that:
    # give the CLI the default disposition, as in a terminal, so Ctrl-C raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RBL_TEST_MARKER": str(marker)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "resumes" in lines[0]


# -------------------------------------------------------------------------------------------------
# API cases
# -------------------------------------------------------------------------------------------------


class _Out(nn.Module):
    """The digits model with its outputs changed by ``fn``."""

    def __init__(self, body: nn.Module, fn) -> None:
        super().__init__()
        self.body, self.fn = body, fn

    def forward(self, x):
        return self.fn(self.body(x))


class _Const(nn.Module):
    """Predicts class 0 for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        z = torch.zeros(x.shape[0], 10, device=x.device) + self.w
        z[:, 0] = 1.0
        return z + 0 * x.flatten(1).sum(1, keepdim=True)


def _api_cases(digits, digits_model, tmp: Path):
    test = digits.test.head(40)
    x, y = test.x, test.y
    big_label = y.clone()
    big_label[0] = 12
    linf = create_attack("fgsm", eps=0.1)

    def plan(**kw):
        return get_preset("smoke").plan(**kw)

    return [
        ("least-likely, label 12 of 10 classes", lambda: create_attack("least-likely", eps=0.1).run(digits_model, x, big_label),
         ValueError, "labels go up to 12"),
        ("square, label 12 of 10 classes", lambda: create_attack("square", eps=0.1, queries=10).run(digits_model, x, big_label),
         ValueError, "labels go up to 12"),
        ("pgd, label 12 of 10 classes", lambda: create_attack("pgd", eps=0.1, steps=2).run(digits_model, x, big_label),
         ValueError, "one logit per class"),
        ("register_attack(42)", lambda: register_attack("int-api-test")(42), TypeError, "subclass"),
        ("register_attack(plain class)", lambda: register_attack("plain-api-test")(type("P", (), {})), TypeError, "EvasionAttack"),
        ("register_defense(plain class)", lambda: register_defense("plain-def-api-test")(type("P", (), {})), TypeError, "Defense"),
        ("register_kind(object)", lambda: register_kind("plain-kind-api-test")(object), TypeError, "CellKind"),
        ("register_verifier(42)", lambda: register_verifier("int-ver-api-test")(42), TypeError, "Verifier"),
        ("register_model(42)", lambda: register_model("int-model-api-test")(42), TypeError, "function or class"),
        ("load(train_limit=0)", lambda: load("digits", train_limit=0), ValueError, "train_limit must be None"),
        ("load(train_limit=-5)", lambda: load("digits", train_limit=-5), ValueError, "an int >= 1"),
        ("DataSpec(train_limit=0)", lambda: DataSpec("digits", train_limit=0), ValueError, "train_limit"),
        ("DataSpec(train_limit=2.5)", lambda: DataSpec("digits", train_limit=2.5), ValueError, "train_limit"),
        ("evaluate: 5 logits for 10 classes", lambda: evaluate(_Out(digits_model, lambda z: z[:, :5]), [linf], test, n=40),
         ValueError, "labels go up to"),
        ("evaluate: num_classes mismatch", lambda: evaluate(digits_model, [linf], test, n=40, num_classes=12),
         ValueError, "dataset has 12 classes"),
        ("evaluate: outputs (N,)", lambda: evaluate(_Out(digits_model, lambda z: z[:, 0]), [linf], test, n=40),
         ValueError, "(batch, num_classes)"),
        ("evaluate: outputs (N, 10, 1)", lambda: evaluate(_Out(digits_model, lambda z: z[:, :, None]), [linf], test, n=40),
         ValueError, "(batch, num_classes)"),
        ("evaluate: integer outputs", lambda: evaluate(_Out(digits_model, lambda z: z.argmax(1, keepdim=True).expand(-1, 10)),
                                                       [linf], test, n=40), TypeError, "as floats"),
        ("evaluate: n=0", lambda: evaluate(digits_model, [linf], test, n=0), ValueError, "positive int"),
        ("evaluate: a tuple for split", lambda: evaluate(digits_model, [linf], (x, y), n=10), TypeError, "DataSplit"),
        ("attack: float64 images", lambda: linf.run(digits_model, x.double(), y), TypeError, "x.float()"),
        ("attack: uint8 images", lambda: linf.run(digits_model, (x * 255).to(torch.uint8), y), TypeError, "/ 255"),
        ("plan(n=0)", lambda: plan(n=0), ValueError, "--n"),
        ("plan(attacks=[])", lambda: plan(attacks=[]), ValueError, "empty"),
        ("plan(defenses=['nope'])", lambda: plan(defenses=["nope"]), KeyError, "unknown defense"),
        ("plan(datasets=['nope'])", lambda: plan(datasets=["nope"]), KeyError, "unknown dataset"),
        ("plan(attacks='fgsm')", lambda: plan(attacks="fgsm"), TypeError, "list of names"),
        ("plan: bad defense settings", _bad_defense_plan, ValueError, "epochs"),
        ("Store on a garbled file", lambda: _garbled_store(tmp), StoreError, "damaged"),
        ("unpack_mask, blob too short", lambda: unpack_mask(b"\x01", 40, "store.sqlite"), StoreError, "mask is damaged"),
    ]


def _bad_defense_plan():
    from robustbench_lite.harness.presets import PRESETS
    from robustbench_lite.harness.specs import DefenseSpec

    broken = dataclasses.replace(PRESETS["smoke"], defenses=(DefenseSpec("standard", {"epochs": 0}),))
    return broken.plan()


def _garbled_store(tmp: Path) -> Store:
    path = tmp / "garbled.sqlite"
    path.write_bytes(b"SQLite format 3\0" + b"\x13" * 5000)
    return Store(path)


def test_bad_api_inputs_raise_the_right_type_with_a_message_naming_the_fix(digits, digits_model, tmp_path):
    failures = []
    cases = _api_cases(digits, digits_model, tmp_path)
    for name, call, exc_type, says in cases:
        try:
            call()
        except exc_type as exc:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            if says.lower() not in text.lower():
                failures.append(f"{name}: message {text!r} lacks {says!r}")
        except Exception as exc:  # noqa: BLE001 - reported
            failures.append(f"{name}: raised {type(exc).__name__}: {exc}, wanted {exc_type.__name__}")
        else:
            failures.append(f"{name}: accepted silently")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 25


def test_accepted_inputs_give_the_right_numbers(digits, digits_model):
    """float16/float64 images are evaluated as float32; NaN outputs are flagged (not 'randomized');
    a model with no correct point is a valid cell (robust accuracy 0)."""
    test = digits.test.head(60)
    attacks = [create_attack("fgsm", eps=0.1)]
    base = evaluate(digits_model, attacks, test, n=60)
    for dtype in (torch.float64, torch.float16):
        other = evaluate(digits_model, attacks, DataSplit(test.x.to(dtype), test.y), n=60)
        assert torch.equal(other.correct, base.correct) if dtype == torch.float64 else other.clean_acc > base.clean_acc - 0.05
    # NaN on some points only: those count as wrong, the others are evaluated (and NaN == NaN
    # across two passes: not "randomized")
    nan = evaluate(_Out(digits_model, lambda z: z.masked_fill((z[:, :1] > z[:, 1:2]), float("nan"))), attacks, test, n=60)
    assert 0 < nan.clean_acc < base.clean_acc
    assert checks.NON_FINITE in nan.model_flags and checks.RANDOMIZED not in nan.model_flags
    zero = evaluate(_Const(), [*attacks, create_attack("pgd", eps=0.1, steps=3)], DataSplit(test.x, torch.ones_like(test.y)), n=60)
    assert zero.clean_acc == 0.0 and all(r.robust_acc == 0.0 for r in zero.records)


def test_a_damaged_cache_file_is_reported_and_retrained(digits, tmp_path, caplog):
    cache = ModelCache(tmp_path)
    defense = create_defense("standard", epochs=1, batch_size=64)
    first = train_or_load(ModelSpec("small-cnn"), defense, digits, cache, progress=False)
    weights, meta = cache.paths(first.key)
    assert json.loads(meta.read_text())["weights_sha256"]
    weights.write_bytes(weights.read_bytes()[:100])
    again = train_or_load(ModelSpec("small-cnn"), defense, digits, cache, progress=False)
    assert not again.from_cache and "retraining" in caplog.text
    assert train_or_load(ModelSpec("small-cnn"), defense, digits, cache, progress=False).from_cache
    # a killed save's temporary files are removed at start-up; a live process's are kept
    stale = tmp_path / f".{first.key}.999999999.safetensors"
    stale.write_bytes(b"partial")
    live = tmp_path / f".{first.key}.{os.getpid()}.json"
    live.write_text("{}")
    assert cache.clean_stale() == [stale] and live.exists()


def test_autotune_cache_with_bad_entries_is_probed_again(digits_model, digits, tmp_path, caplog):
    from robustbench_lite.core.device import as_policy

    path = tmp_path / "autotune.json"
    tuner = BatchTuner(path, candidates=(16, 32), rounds=1)
    policy = as_policy("cpu")
    key = tuner.cache_key("m", "grad", policy, 40)
    for bad in ("[]", json.dumps({key: {"batch": "abc"}}), json.dumps({key: [1]}), "{"):
        path.write_text(bad)
        assert tuner.batch_for(digits_model, "m", "grad", digits.test.x[:40], digits.test.y[:40], policy) in (16, 32)
    assert "probing again" in caplog.text

