"""What a run exports: ``leaderboard --format json`` validates against the schema kept in the
package, one entry per leaderboard row with RobustBench's fields and types; ``autoattack_acc`` is
filled only for a row whose attacks are exactly the ``autoattack`` set (null otherwise); claim cards
escape names and their file names are sanitized; ``results(workdir)`` gives the CSVs' tables."""

from __future__ import annotations

import json
import re

import jsonschema
import pandas as pd
import pytest

from robustbench_lite import benchmark, results
from robustbench_lite.cli import main
from robustbench_lite.harness import attack_sets
from robustbench_lite.harness.store import Store
from robustbench_lite.report.export import SCHEMA_PATH, document, md

EVIL = "<img src=x onerror=alert(1)>|*b*[l](http://e)/../`x`"
N = 40


@pytest.fixture(scope="module")
def workdir(user_checkpoint, digits_model, digits, tmp_path_factory):
    """Two rows at Linf 0.1 on digits: a model with a hostile name attacked by FGSM, and another
    attacked by FGSM and PGD (both on survivors, through ``benchmark``)."""
    work = tmp_path_factory.mktemp("export") / "w"
    model, _ = user_checkpoint
    benchmark(model, N, digits, "Linf", eps=0.1, attacks="fgsm", device="cpu", workdir=work, model_name=EVIL)
    benchmark(digits_model, N, digits, "Linf", eps=0.1, attacks=["fgsm", "pgd"], device="cpu", workdir=work,
              model_name="plain")
    return work


def _export(workdir, out, capsys) -> dict:
    capsys.readouterr()
    assert main(["leaderboard", "--workdir", str(workdir), "--out", str(out), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _masks(workdir):
    with Store(workdir / "store.sqlite") as store:
        rows = store.rows()
        return rows, {r.key: store.get(r.key)[1] for r in rows}


def test_leaderboard_json_validates_against_the_schema_and_autoattack_acc_is_null_without_the_set(workdir, tmp_path, capsys):
    doc = _export(workdir, tmp_path / "lb", capsys)
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert json.loads((tmp_path / "lb" / "leaderboard.json").read_text()) == doc
    by = {e["defense"]: e for e in doc["entries"]}
    assert sorted(by) == sorted([EVIL, "plain"])  # one entry per leaderboard row
    wide = results(workdir).wide
    for _, row in wide.iterrows():
        e = by[row["defense"]]
        assert e["clean_acc"] == f"{100 * row['clean_acc']:.2f}" and e["worst_case"] == pytest.approx(row["worst_case"])
        assert e["eps"] == "0.1" and e["threat_model"] == "Linf" and e["n"] == N and e["dataset"] == "digits"
        assert e["reported"] is None and e["certified"] is None
    assert set(by["plain"]["attacks"]) == {"fgsm", "pgd"} and set(by[EVIL]["attacks"]) == {"fgsm"}
    # neither row ran exactly the autoattack set (whether or not this version has one)
    assert all(e["autoattack_acc"] is None and e["autoattack_accuracy"] is None for e in doc["entries"])
    bad = json.loads(json.dumps(doc))
    bad["entries"][0]["clean_acc"] = 0.9  # RobustBench writes a percentage string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)


def test_autoattack_acc_is_filled_only_where_the_attacks_are_exactly_the_set(workdir, monkeypatch):
    rows, masks = _masks(workdir)
    monkeypatch.setitem(attack_sets._MEMBERS, "autoattack", lambda norm: [("fgsm", {})])  # a stand-in set, looked up by name
    doc = document(rows, masks.get)
    by = {e["defense"]: e for e in doc["entries"]}
    fgsm = next(r for r in rows if r.defense == EVIL and r.attack == "fgsm")
    want = float(masks[fgsm.key].float().mean())
    assert doc["autoattack_set"] == "autoattack"
    assert by[EVIL]["autoattack_accuracy"] == pytest.approx(want) and by[EVIL]["autoattack_acc"] == f"{100 * want:.2f}"
    assert by["plain"]["autoattack_acc"] is None  # fgsm and pgd: not the set
    assert document(rows)["entries"] == doc["entries"]  # without masks: the survivors' last accuracy, the same
    monkeypatch.setitem(attack_sets._MEMBERS, "autoattack", lambda norm: [("fgsm", {"seed": 1})])  # another setting
    assert all(e["autoattack_acc"] is None for e in document(rows, masks.get)["entries"])


def test_claim_cards_escape_names_and_their_file_names_are_sanitized(workdir, tmp_path, capsys):
    doc = _export(workdir, tmp_path / "lb", capsys)
    entry = next(e for e in doc["entries"] if e["defense"] == EVIL)
    assert "<img" not in entry["footnote"]
    path = tmp_path / "lb" / entry["claim_card"]
    assert path.parent == tmp_path / "lb" / "claims" and re.fullmatch(r"[A-Za-z0-9._-]+\.md", path.name)
    card = path.read_text()
    assert "<img" not in card and "&lt;img" in card and md(EVIL) in card
    assert "[l](" not in card and "*b*" not in card  # no link, no emphasis
    for line in card.splitlines():
        if line.startswith("|"):  # every table row keeps its columns: names cannot add cells
            assert len(re.findall(r"(?<!\\)\|", line)) in (3, 4), line
    assert f"{100 * entry['worst_case']:.1f}%" in card and "replay" in card
    assert sorted(p.name for p in (tmp_path / "lb" / "claims").iterdir()) == sorted(
        e["claim_card"].split("/")[1] for e in doc["entries"])


def test_results_gives_the_wide_and_long_tables_the_csvs_hold(workdir, tmp_path):
    assert main(["leaderboard", "--workdir", str(workdir), "--out", str(tmp_path / "csv")]) == 0
    got = results(workdir)
    csv = pd.read_csv(tmp_path / "csv" / "digits_linf_0.1.csv")
    assert len(got.wide) == len(csv) == 2
    for col in ("defense", "clean_acc", "fgsm", "pgd", "worst_case"):
        left, right = got.wide[col], csv[col]
        if left.dtype == object:
            assert list(left) == list(right)
        else:
            pd.testing.assert_series_equal(left, right, check_exact=False, rtol=1e-5, check_names=False)
    assert len(got.long) == len(pd.read_csv(tmp_path / "csv" / "cells.csv")) == 5  # 3 attack rows, 2 worst cases
    with pytest.raises(FileNotFoundError, match="no results store"):
        results(tmp_path / "nothing")


def test_a_row_with_a_verifier_exports_its_bracket(digits_model, model_cache, tmp_path, capsys):
    """An evasion row beside a certified cell: the entry's certified <= worst case, undecided and
    exact from the bracket, and the document still validates."""
    import shutil

    from robustbench_lite import ModelSpec, ThreatModel
    from robustbench_lite.harness.plan import Cell, Plan
    from robustbench_lite.harness.run import run_plan
    from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec

    work = tmp_path / "w"
    shutil.copytree(model_cache.root, work / "models")  # the session's digits model: nothing trains
    defense, threat = DefenseSpec("standard", {"epochs": 8, "batch_size": 64, "lr": 3e-3}), ThreatModel("linf", 0.01)
    cells = (Cell(DataSpec("digits"), ModelSpec("small-cnn"), defense, AttackSpec("fgsm"), threat, N),
             Cell(DataSpec("digits"), ModelSpec("small-cnn"), defense, AttackSpec("ibp"), threat, N, kind="certified"))
    run_plan(Plan("t", cells), workdir=work, device="cpu", progress=False)
    doc = _export(work, tmp_path / "lb", capsys)
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    (e,) = doc["entries"]
    assert e["certified"] is not None and e["certified"] <= e["worst_case"]
    assert e["undecided"] == pytest.approx(e["worst_case"] - e["certified"]) and e["exact"] == (e["undecided"] == 0)
    assert "certified accuracy" in (tmp_path / "lb" / e["claim_card"]).read_text()
