"""Safe by default: a grid file cannot switch on unpickling by itself; names written into
Markdown, CSV cells and file paths are escaped, guarded or sanitized; rows read back from the
store are checked like model sidecars are."""

from __future__ import annotations

import json
import logging
import os
import sqlite3

import pandas as pd
import pytest
import torch

from robustbench_lite.cli import main
from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.names import is_plain, safe_stem
from robustbench_lite.core.threat import Norm, ThreatModel
from robustbench_lite.harness.gridfile import GridError, load_grid
from robustbench_lite.harness.kinds.evasion import worst_case_rows
from robustbench_lite.harness.plan import Cell
from robustbench_lite.harness.presets import PRESETS, get_preset
from robustbench_lite.harness.rows import CellResult, cell_row
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard


def evasion_rows():
    """The stored rows of one model: fgsm and pgd on 4 points, and their worst case."""
    cells = [Cell(DataSpec("digits"), ModelSpec("small-cnn"), DefenseSpec("standard"), AttackSpec(a),
                  ThreatModel(Norm.LINF, 0.1), 4) for a in ("fgsm", "pgd")]
    latest = {}
    for c, robust in zip(cells, ((1, 1, 0, 0), (1, 0, 0, 0)), strict=True):
        mask = torch.tensor(robust, dtype=torch.bool)
        latest[c.key] = (cell_row(c, clean_acc=0.75, robust_acc=float(mask.float().mean()), model_key="k"), mask)
    rows = [r for r, _ in latest.values()]
    return rows + [r for r, _ in worst_case_rows(cells, latest, labels=torch.arange(4) % 2)]


class _Marker:
    """Unpickling this runs code: it makes the folder ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


# -- trust_pickle --------------------------------------------------------------------------------------
def _pickle_grid(tmp_path, trust="true"):
    marker = tmp_path / "unpickled"
    torch.save({"payload": _Marker(str(marker))}, tmp_path / "evil.pt")
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""n = 10
[[datasets]]
name = "digits"
[[models]]
name = "small-cnn"
weights = "evil.pt"
trust_pickle = {trust}
[[threats]]
threat = "linf:0.1"
attacks = ["fgsm"]
""")
    return grid, marker


def test_a_grid_file_alone_cannot_switch_on_unpickling(tmp_path):
    grid, marker = _pickle_grid(tmp_path)
    with pytest.raises(GridError, match="--trust-pickle"):
        load_grid(grid)
    assert not marker.exists()


def test_the_cli_refuses_trust_pickle_from_a_grid_without_the_flag_in_one_line(tmp_path, capsys):
    grid, marker = _pickle_grid(tmp_path)
    code = main(["run", "--config", str(grid), "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "trust_pickle" in err and "--trust-pickle" in err
    assert not marker.exists() and not (tmp_path / "w").exists()


def test_with_the_flag_the_grid_key_is_honoured(tmp_path):
    grid, marker = _pickle_grid(tmp_path)
    with pytest.raises(GridError):  # unpickled (the marker appears), then refused: not a state dict
        load_grid(grid, trust_pickle=True)
    assert marker.exists()


def test_trust_pickle_must_be_a_boolean(tmp_path):
    grid, marker = _pickle_grid(tmp_path, trust='"yes"')
    with pytest.raises(GridError, match="trust_pickle: must be true or false"):
        load_grid(grid, trust_pickle=True)
    assert not marker.exists()


# -- names in paths -----------------------------------------------------------------------------------
def test_a_dataset_named_like_a_path_writes_its_tables_inside_out(tmp_path):
    rows = [r.__class__(**{**r.as_row(), "dataset": "../../x"}) for r in evasion_rows()]
    out = tmp_path / "a" / "b" / "out"
    paths = leaderboard.write(rows, out)
    assert len(paths) == 2
    for p in paths:
        assert p.resolve().parent == out.resolve() and is_plain(p.stem)
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == sorted(p.name for p in paths)
    assert pd.read_csv(next(p for p in paths if p.name != "cells.csv"))["dataset"].tolist() == ["../../x"]


def test_safe_stem_keeps_plain_names_and_keeps_unsafe_ones_apart():
    for name in ("fashion-mnist_linf_0.1", "digits_l2_1.5", "my.data+v2"):
        assert safe_stem(name) == name
    unsafe = ["../../x", "..", "a/b", "a_b/", "a\\b", "-rf", ".hidden", "x" * 300, "tab\there", "é"]
    stems = [safe_stem(n) for n in unsafe]
    assert all(is_plain(s) for s in stems) and len(set(stems)) == len(stems)


def test_a_preset_name_never_reads_a_file_outside_the_preset_folder():
    assert "smoke" in PRESETS and "../presets/smoke" not in PRESETS
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("../presets/smoke")
    with pytest.raises(KeyError):
        PRESETS.path("/etc/passwd")


@pytest.mark.parametrize("name", ["../up", "a/b", "a\\b", "..", "tab\tname", " "])
def test_a_grid_name_that_is_not_a_name_is_refused(tmp_path, name):
    grid = tmp_path / "g.toml"
    grid.write_text(f'name = {json.dumps(name)}\nn = 10\n[[datasets]]\nname = "digits"\n')
    with pytest.raises(GridError, match="grid name"):
        load_grid(grid)


# -- CSV injection ------------------------------------------------------------------------------------
def test_csv_text_cells_that_start_a_formula_are_guarded_and_numbers_are_not(tmp_path):
    rows = [CellResult(**{**r.as_row(), "model": "=HYPERLINK(\"http://x\")", "defense": "@SUM(A1)",
                          "flags": "+cmd", "error": "-2+3"}) for r in evasion_rows()]
    paths = {p.name: p for p in leaderboard.write(rows, tmp_path)}
    for name in paths:
        df = pd.read_csv(paths[name], dtype=str, keep_default_na=False)
        assert set(df["model"]) == {"'=HYPERLINK(\"http://x\")"}, name
        assert set(df["defense"]) == {"'@SUM(A1)"}, name
        assert all(not v.startswith(("=", "+", "-", "@", "\t", "\r")) for col in df for v in df[col]), name
    wide = pd.read_csv(paths["digits_linf_0.1.csv"])
    assert wide["flags"].tolist() == ["'+cmd"] and wide["worst_case"].tolist() == [0.25]
    assert leaderboard.guard_cell(-0.5) == -0.5 and leaderboard.guard_cell("-x") == "'-x"
    assert leaderboard.guard_cell("\tx") == "'\tx" and leaderboard.guard_cell("a=b") == "a=b"
    assert list(leaderboard.guarded(pd.DataFrame({"=a": ["@b"], "n": [-1]})).iloc[0]) == ["'@b", -1]
    assert list(leaderboard.guarded(pd.DataFrame({"=a": [1]})).columns) == ["'=a"]


# -- rows read back from the store --------------------------------------------------------------------
@pytest.mark.parametrize("field,value,says", [
    ("robust_acc", "abc", "must be a number"),
    ("clean_acc", 1.5, "[0, 1]"),
    ("n", 2.5, "whole number"),
    ("seconds", -1.0, ">= 0"),
    ("grad_evals", True, "must be a number"),
    ("model", 7, "must be a string"),
    ("status", "fine", "one of"),
    ("metrics", "[1, 2]", "JSON object"),
    ("identity", "{not json", "JSON object"),
])
def test_a_stored_row_with_a_wrong_value_is_refused_naming_the_field(field, value, says):
    good = evasion_rows()[0].as_row()
    with pytest.raises((TypeError, ValueError), match=field) as info:
        CellResult.from_row({**good, field: value})
    assert says in str(info.value)


def test_old_rows_without_the_newer_fields_still_load():
    good = evasion_rows()[0].as_row()
    old = {k: v for k, v in good.items() if k not in ("metrics", "model_id", "identity")}
    row = CellResult.from_row({**old, "eps": 1, "n": 4.0, "unknown_later_field": 3})
    assert (row.model_id, row.identity, row.metrics, row.eps, row.n) == ("", "", "", 1.0, 4)
    with pytest.raises(ValueError, match="lacks the field 'dataset'"):
        CellResult.from_row({k: v for k, v in old.items() if k != "dataset"})


def test_a_damaged_store_row_is_left_out_with_a_warning_and_counts_as_not_done(tmp_path, caplog):
    rows = evasion_rows()
    path = tmp_path / "store.sqlite"
    with Store(path) as store:
        store.put_many([(r, None) for r in rows])
    bad = rows[0]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE cells SET row = ? WHERE key = ?", (json.dumps({**bad.as_row(), "robust_acc": "abc"}), bad.key))
        db.execute("UPDATE cells SET row = ? WHERE key = ?", ("{garbled", rows[1].key))
    with caplog.at_level(logging.WARNING), Store(path) as store:
        kept = store.rows()
        assert [r.key for r in kept] == sorted(r.key for r in rows[2:])
        assert store.get(bad.key) is None and not store.done(bad.key) and store.done(rows[2].key)
        store.rows()
    warned = [r.getMessage() for r in caplog.records if "damaged row" in r.getMessage()]
    assert len(warned) == 2  # once per row, however often it is read
    assert any("robust_acc" in w and bad.key in w and "recomputes" in w for w in warned)
