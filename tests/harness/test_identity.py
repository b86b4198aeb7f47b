"""A leaderboard row is one model: rows are keyed by the model's identity (data, architecture and
settings, defense and settings, or the weights' hash), and models sharing display names get
labels that tell them apart, in every kind's tables."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustbench_lite import register_model
from robustbench_lite.cli import main
from robustbench_lite.core.models import ModelSpec, accuracy, create_model
from robustbench_lite.core.threat import Norm, ThreatModel
from robustbench_lite.harness.identity import distinguish
from robustbench_lite.harness.kinds import kind, list_kinds
from robustbench_lite.harness.kinds.evasion import worst_case_rows
from robustbench_lite.harness.plan import Cell
from robustbench_lite.harness.rows import RESULT_FIELDS, WORST_CASE, CellResult, cell_row
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard

LINF = ThreatModel(Norm.LINF, 0.1)
REPO = Path(__file__).resolve().parents[2]


def evasion_rows(model=ModelSpec("small-cnn"), defense=DefenseSpec("standard", {"epochs": 1}), *, data=DataSpec("digits"),
                 robust=None, correct=(1, 1, 1, 0), model_key="k1", threat=LINF, kind_name=""):
    """The stored rows of one model: an attack row per ``robust`` mask and the worst case."""
    robust = robust or {"fgsm": (1, 1, 0, 0), "pgd": (1, 0, 0, 0)}
    n = len(correct)
    cells = [Cell(data, model, defense, AttackSpec(a), threat, n, kind=kind_name) for a in robust]
    latest, rows = {}, []
    for c in cells:
        mask = torch.tensor(robust[c.attack.name], dtype=torch.bool)
        r = cell_row(c, clean_acc=sum(correct) / n, robust_acc=float(mask.float().mean()), model_key=model_key,
                     seconds=1.0, grad_evals=len(c.attack.name))
        latest[c.key] = (r, mask)
        rows.append(r)
    return rows + [r for r, _ in worst_case_rows(cells, latest, labels=torch.arange(n) % 2)]


def legacy(rows):
    """``rows`` as stored before model identities existed."""
    return [dataclasses.replace(r, model_id="", identity="") for r in rows]


def wide(rows, name="digits_linf_0.1"):
    return leaderboard.wide_tables(rows)[name]


# -- the three merge cases, from rows ---------------------------------------------------------------
def test_two_settings_of_one_architecture_are_two_rows_and_only_the_changed_one_is_labelled():
    default = evasion_rows(robust={"fgsm": (1, 1, 0, 0), "pgd": (1, 0, 0, 0)}, correct=(1, 1, 1, 0), model_key="a")
    wide8 = evasion_rows(ModelSpec("small-cnn", {"width": 8}), robust={"fgsm": (0, 0, 0, 0), "pgd": (0, 0, 0, 0)},
                         correct=(1, 1, 0, 0), model_key="b")
    table = wide(default + wide8).set_index("model")
    assert sorted(table.index) == ["small-cnn", "small-cnn(width=8)"]
    assert table.loc["small-cnn", ["clean_acc", "fgsm", "pgd", "worst_case"]].tolist() == [0.75, 0.5, 0.25, 0.25]
    assert table.loc["small-cnn(width=8)", ["clean_acc", "fgsm", "pgd", "worst_case"]].tolist() == [0.5, 0.0, 0.0, 0.0]
    assert set(table["defense"]) == {"standard"}


def test_two_weights_files_of_one_name_in_two_folders_are_labelled_by_their_folders():
    def user(folder, sha, robust):
        spec = DefenseSpec("model.pt", {"sha256": sha})
        object.__setattr__(spec, "path", f"/home/me/{folder}/model.pt")  # what UserWeightsSpec carries
        return evasion_rows(ModelSpec("small-cnn"), spec, robust={"fgsm": robust}, model_key=sha)

    rows = user("run1", "1" * 64, (1, 1, 1, 0)) + user("run2", "2" * 64, (0, 0, 0, 0))
    table = wide(rows).set_index("defense")
    assert sorted(table.index) == ["run1/model.pt", "run2/model.pt"]
    assert table.loc["run1/model.pt", "fgsm"] == 0.75 and table.loc["run2/model.pt", "fgsm"] == 0.0


def test_a_changed_file_at_the_same_path_is_labelled_by_its_hash():
    rows = []
    for sha in ("a" * 64, "b" * 64):
        spec = DefenseSpec("model.pt", {"sha256": sha})
        object.__setattr__(spec, "path", "/w/model.pt")
        rows += evasion_rows(ModelSpec("small-cnn"), spec, model_key=sha)
    assert sorted(wide(rows)["defense"]) == ["model.pt@aaaaaaaa", "model.pt@bbbbbbbb"]


def test_a_model_that_failed_lends_no_error_flag_to_the_good_row_of_the_same_name():
    good = evasion_rows(model_key="good")
    bad_cells = [Cell(DataSpec("digits"), ModelSpec("small-cnn", {"activation": "bogus"}),
                      DefenseSpec("standard", {"epochs": 1}), AttackSpec(a), LINF, 4) for a in ("fgsm", "pgd")]
    bad = [cell_row(c, status="error", error="training failed: ValueError: bogus") for c in bad_cells]
    table = wide(good + bad).set_index("model")
    assert table.loc["small-cnn", "flags"] == ""
    assert table.loc["small-cnn", "worst_case"] == 0.25
    assert table.loc["small-cnn(activation=bogus)", "flags"] == "error:fgsm;error:pgd"
    assert math.isnan(table.loc["small-cnn(activation=bogus)", "fgsm"])


def test_defense_settings_and_training_data_tell_models_apart():
    rows = (evasion_rows(defense=DefenseSpec("pgd-at", {"epochs": 1}), model_key="a")
            + evasion_rows(defense=DefenseSpec("pgd-at", {"epochs": 5}), model_key="b")
            + evasion_rows(defense=DefenseSpec("pgd-at", {"epochs": 5}), data=DataSpec("digits", 500), model_key="c"))
    labels = sorted(zip(wide(rows)["model"], wide(rows)["defense"], strict=True))
    assert labels == [("small-cnn", "pgd-at(epochs=1)"), ("small-cnn", "pgd-at(epochs=5)"),
                      ("small-cnn(train_limit=500)", "pgd-at(epochs=5)")]


def test_one_model_keeps_its_plain_names_and_labels_are_the_same_in_every_table():
    rows = evasion_rows(ModelSpec("mlp", {"hidden": 16}), model_key="a")
    assert list(wide(rows)[["model", "defense"]].iloc[0]) == ["mlp", "standard"]
    two = rows + evasion_rows(ModelSpec("mlp", {"hidden": 32}), model_key="b") + evasion_rows(
        ModelSpec("mlp", {"hidden": 32}), model_key="b", threat=ThreatModel(Norm.L2, 1.0), robust={"pgd": (1, 1, 0, 0)})
    tables = leaderboard.wide_tables(two)
    assert {tuple(sorted(t["model"])) for t in tables.values()} == {("mlp(hidden=16)", "mlp(hidden=32)"), ("mlp(hidden=32)",)}
    assert distinguish(distinguish(two)) == distinguish(two)


def test_the_columns_other_kinds_add_go_to_their_own_model():
    a = evasion_rows(model_key="a")
    b = evasion_rows(ModelSpec("small-cnn", {"width": 8}), model_key="b")
    cert = []
    for spec, acc in ((ModelSpec("small-cnn"), 0.25), (ModelSpec("small-cnn", {"width": 8}), 0.5)):
        c = Cell(DataSpec("digits"), spec, DefenseSpec("standard", {"epochs": 1}), AttackSpec("ibp"), LINF, 4,
                 kind="certified")
        cert.append(cell_row(c, clean_acc=0.75, robust_acc=acc, model_key="x", metrics="{}"))
    table = wide(a + b + cert).set_index("model")
    assert table.loc["small-cnn", "certified"] == 0.25 and table.loc["small-cnn(width=8)", "certified"] == 0.5


@pytest.mark.parametrize("name", list_kinds())
def test_every_kind_table_shows_two_models_of_one_name_under_two_labels(name):
    k = kind(name)
    rows = [dataclasses.replace(r, kind=name) for r in evasion_rows(model_key="a")
            + evasion_rows(ModelSpec("small-cnn", {"width": 8}), model_key="b")]
    if name != "evasion":
        rows = [dataclasses.replace(r, metrics="{}") for r in rows if r.attack != WORST_CASE]
    for stem, table in k.tables(rows).items():
        if "model" in table:
            assert set(table["model"]) == {"small-cnn", "small-cnn(width=8)"}, stem


def test_attack_columns_are_in_name_order_in_every_table_of_a_run():
    # the attacks' costs (grad_evals) differ in order between the models and the threats
    a = evasion_rows(robust={"pgd": (1, 0, 0, 0), "ifgsm": (1, 1, 0, 0), "fgsm": (1, 1, 1, 0), "least-likely": (1, 1, 1, 0)},
                     model_key="a")
    b = evasion_rows(ModelSpec("mlp"), robust={"least-likely": (1, 1, 0, 0), "fgsm": (1, 0, 0, 0), "pgd": (0, 0, 0, 0),
                     "ifgsm": (0, 0, 0, 0)}, model_key="b", threat=ThreatModel(Norm.LINF, 0.2))
    b = [dataclasses.replace(r, grad_evals=100 - r.grad_evals) for r in b]
    tables = leaderboard.wide_tables(a + b)
    assert len(tables) == 2
    for table in tables.values():
        cols = list(table.columns)
        assert cols[cols.index("clean_acc") + 1: cols.index(WORST_CASE)] == ["fgsm", "ifgsm", "least-likely", "pgd"]


def test_worst_class_has_three_decimals_like_every_accuracy(tmp_path):
    # class 0 (points 0, 2, 4) keeps 2 of its 3 points: 2/3
    rows = evasion_rows(robust={"fgsm": (1, 1, 1, 1, 0, 1)}, correct=(1, 1, 1, 1, 1, 1), model_key="a")
    table = wide(rows)
    assert table["worst_class"].tolist() == [0.667]
    leaderboard.write(rows, tmp_path)
    assert (tmp_path / "digits_linf_0.1.csv").read_text().splitlines()[1].split(",")[
        pd.read_csv(tmp_path / "digits_linf_0.1.csv").columns.get_loc("worst_class")] == "0.667"


# -- rows stored before identities ------------------------------------------------------------------
def test_old_rows_load_and_keep_one_row_per_display_name():
    old = legacy(evasion_rows(model_key="a"))
    stored = [CellResult.from_row({k: v for k, v in r.as_row().items() if k not in ("model_id", "identity")})
              for r in old]
    assert stored == old
    table = wide(stored)
    assert len(table) == 1 and list(table[["model", "defense", "worst_case"]].iloc[0]) == ["small-cnn", "standard", 0.25]


def test_old_rows_join_the_new_rows_of_their_trained_model():
    old = legacy(evasion_rows(robust={"fgsm": (1, 1, 0, 0)}, model_key="a"))
    new = evasion_rows(robust={"pgd": (1, 0, 0, 0)}, model_key="a")
    other = evasion_rows(ModelSpec("small-cnn", {"width": 8}), robust={"pgd": (0, 0, 0, 0)}, model_key="b")
    table = wide([r for r in old if r.attack != WORST_CASE] + new + other).set_index("model")
    assert sorted(table.index) == ["small-cnn", "small-cnn(width=8)"]
    assert table.loc["small-cnn", ["fgsm", "pgd"]].tolist() == [0.5, 0.25]


def test_old_rows_that_mixed_two_models_under_one_name_stay_apart_by_their_model_keys():
    rows = legacy(evasion_rows(model_key="0fc617acb78c64b4") + evasion_rows(
        ModelSpec("small-cnn", {"width": 8}), robust={"fgsm": (0, 0, 0, 0), "pgd": (0, 0, 0, 0)}, model_key="340786d354a1e318"))
    table = wide(rows).set_index("model")
    assert sorted(table.index) == ["small-cnn#0fc617ac", "small-cnn#340786d3"]
    assert table.loc["small-cnn#340786d3", "worst_case"] == 0.0 and table.loc["small-cnn#0fc617ac", "worst_case"] == 0.25


def test_an_old_row_of_its_own_model_key_joins_the_one_model_of_its_names():
    """A poisoning row's model key is its own retrained model's: alone, it names no other model."""
    rows = legacy(evasion_rows(model_key="a"))
    c = Cell(DataSpec("digits"), ModelSpec("small-cnn"), DefenseSpec("standard", {"epochs": 1}), AttackSpec("badnets"),
             ThreatModel(Norm.L0, 9.0), 4)
    rows += legacy([cell_row(c, clean_acc=0.5, model_key="poisoned", metrics="{}")])
    assert len({r.model_id for r in distinguish(rows)}) == 1
    assert {(r.model, r.defense) for r in distinguish(rows)} == {("small-cnn", "standard")}


def test_the_committed_leaderboards_are_what_their_cells_give(tmp_path):
    """Every committed wide table, rebuilt from its folder's ``cells.csv`` (rows stored before
    model identities): the same rows under the same plain names, the same columns and numbers
    (seconds summed from rounded cells: to 1e-5 relative)."""
    checked = 0
    for cells in sorted((REPO / "leaderboards").rglob("cells.csv")):
        rows = [_row_of(rec) for rec in pd.read_csv(cells, dtype=str, keep_default_na=False).to_dict("records")]
        for stem, table in leaderboard.wide_tables(rows).items():
            committed = pd.read_csv(cells.parent / f"{stem}.csv", keep_default_na=False)
            built = pd.read_csv(io.StringIO(leaderboard.guarded(table).to_csv(index=False, float_format="%.6g")),
                                keep_default_na=False)
            assert list(built.columns) == list(committed.columns), stem
            for col in built.columns:
                if col in ("seconds", "train_seconds"):
                    assert (abs(built[col] - committed[col]) <= 1e-5 * committed[col].abs()).all(), (stem, col)
                else:
                    assert built[col].tolist() == committed[col].tolist(), (stem, col)
            checked += 1
    assert checked >= 6


def _row_of(rec: dict[str, str]) -> CellResult:
    types = {f.name: str(f.type) for f in dataclasses.fields(CellResult)}
    values = {}
    for k, v in rec.items():
        if k not in RESULT_FIELDS:
            continue
        t = types[k]
        if t.startswith("float"):
            values[k] = float(v) if v != "" else (None if "None" in t else float("nan"))
        elif t == "int":
            values[k] = int(float(v))
        else:
            values[k] = v
    return CellResult.from_row(values)


# -- end to end: one workdir, one --out, runs of two grids ---------------------------------------------
NETS = ["small-cnn", "small-cnn(width=8)", "test-identity-net", "test-identity-net(broken=true)"]


class _Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("this test network fails in its forward pass")


@register_model("test-identity-net")
def _test_identity_net(input_shape, num_classes, broken: bool = False):
    """A small MLP; ``broken=True`` builds, then fails in training (a cell error, not bad input)."""
    net = create_model("mlp", input_shape, num_classes, hidden=16, depth=1)
    return torch.nn.Sequential(_Broken(), net) if broken else net

GRID = """
name = "identity-test"
n = 30
[[datasets]]
name = "digits"
train_limit = 300
{models}
[[defenses]]
name = "standard"
epochs = 1
batch_size = 64
[[threats]]
threat = "linf:0.1"
attacks = ["fgsm"]
"""


@pytest.fixture(scope="module")
def two_grids(tmp_path_factory):
    """The default small-cnn, then (same workdir and --out) small-cnn with width 8, and a test
    network twice: once as is, once with kwargs that build but fail in training (kwargs that cannot
    build are refused before any work: test_user_bad_inputs)."""
    tmp = tmp_path_factory.mktemp("identity")
    (tmp / "a.toml").write_text(GRID.format(models='[[models]]\nname = "small-cnn"'))
    (tmp / "b.toml").write_text(GRID.format(models='[[models]]\nname = "small-cnn"\nkwargs = { width = 8 }\n'
                                            '[[models]]\nname = "test-identity-net"\n'
                                            '[[models]]\nname = "test-identity-net"\nkwargs = { broken = true }'))
    args = ["--workdir", str(tmp / "w"), "--out", str(tmp / "out"), "--no-progress"]
    assert main(["run", "--config", str(tmp / "a.toml"), *args]) == 0
    assert main(["run", "--config", str(tmp / "b.toml"), *args]) == 1  # the broken model's cells failed
    return tmp


def test_a_grid_rerun_with_other_kwargs_adds_a_row_instead_of_mixing_two_models(two_grids, capsys):
    table = pd.read_csv(two_grids / "out" / "digits_linf_0.1.csv", keep_default_na=False).set_index("model")
    cells = pd.read_csv(two_grids / "out" / "cells.csv", keep_default_na=False)
    assert sorted(table.index) == NETS
    for label in ("small-cnn", "small-cnn(width=8)", "test-identity-net"):
        mine = cells[cells["model"] == label].set_index("attack")
        assert mine["model_key"].nunique() == 1 and mine["model_key"].iloc[0]
        assert table.loc[label, "clean_acc"] == mine.loc["fgsm", "clean_acc"]
        assert table.loc[label, "fgsm"] == mine.loc["fgsm", "robust_acc"]
        assert table.loc[label, "worst_case"] == mine.loc[WORST_CASE, "robust_acc"]
        assert table.loc[label, "flags"] == ""
    assert table.loc["test-identity-net(broken=true)", "flags"] == "error:fgsm"  # its own row only


def test_the_store_rows_carry_the_model_identity(two_grids):
    with Store(two_grids / "w" / "store.sqlite", create=False) as store:
        rows = store.rows()
    by_id = {}
    for r in rows:
        model = json.loads(r.identity)["model"]
        assert r.model_id and model["name"] in ("small-cnn", "test-identity-net")
        by_id.setdefault(r.model_id, set()).add(model["name"] + json.dumps(model["kwargs"], sort_keys=True))
    assert sorted(k for ks in by_id.values() for k in ks) == [
        'small-cnn{"width": 8}', "small-cnn{}", 'test-identity-net{"broken": true}', "test-identity-net{}"]


def test_a_rerun_on_a_workdir_of_old_rows_stores_their_identities(two_grids, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(two_grids / "w", work)
    with sqlite3.connect(work / "store.sqlite") as db:  # the rows as an older version stored them
        for key, text in db.execute("SELECT key, row FROM cells").fetchall():
            old = {k: v for k, v in json.loads(text).items() if k not in ("model_id", "identity")}
            db.execute("UPDATE cells SET row = ? WHERE key = ?", (json.dumps(old), key))
    args = ["--workdir", str(work), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(["leaderboard", *args[:4]]) == 0
    before = pd.read_csv(tmp_path / "out" / "digits_linf_0.1.csv", keep_default_na=False)
    assert len(before) == 4 and all(m.split("#")[0] in ("small-cnn", "test-identity-net") for m in before["model"])
    by_label = before.set_index("model")["flags"].to_dict()
    assert by_label.pop("test-identity-net#untrained") == "error:fgsm"  # kept apart from the trained one
    assert list(by_label.values()) == ["", "", ""]
    assert main(["run", "--config", str(two_grids / "a.toml"), *args]) == 0
    assert main(["run", "--config", str(two_grids / "b.toml"), *args]) == 1
    after = pd.read_csv(tmp_path / "out" / "digits_linf_0.1.csv", keep_default_na=False)
    assert sorted(after["model"]) == NETS
    with Store(work / "store.sqlite", create=False) as store:
        assert all(r.model_id for r in store.rows())


def test_two_user_checkpoints_of_one_file_name_are_two_rows(tmp_path, digits):
    torch.manual_seed(0)
    for folder in ("run1", "run2"):
        (tmp_path / folder).mkdir()
        model = create_model("small-cnn", digits.input_shape, digits.num_classes)
        torch.save(model.state_dict(), tmp_path / folder / "model.pt")
    args = ["--model", "small-cnn", "--data", "digits", "--threats", "linf:0.1", "--attacks", "fgsm", "--n", "25",
            "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "rep"),
            "--no-progress"]
    for folder in ("run1", "run2"):
        assert main(["eval", "--weights", str(tmp_path / folder / "model.pt"), *args]) == 0
    table = pd.read_csv(tmp_path / "out" / "digits_linf_0.1.csv").set_index("defense")
    assert sorted(table.index) == ["run1/model.pt", "run2/model.pt"]
    for folder in ("run1", "run2"):
        model = create_model("small-cnn", digits.input_shape, digits.num_classes)
        model.load_state_dict(torch.load(tmp_path / folder / "model.pt", weights_only=True))
        assert table.loc[f"{folder}/model.pt", "clean_acc"] == pytest.approx(accuracy(model, digits.test.head(25), "cpu"))
