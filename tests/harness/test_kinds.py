"""Cell kinds and datasets as plugins: a new kind of evaluation, or a new dataset, from one
``--plugin`` file runs end to end (its own CSV, resume, error rows) with no core change; and the
contract every registered kind keeps."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pandas as pd
import pytest

from robustbench_lite import list_kinds
from robustbench_lite.cli import main
from robustbench_lite.harness.kinds import kind
from robustbench_lite.harness.rows import CellResult
from robustbench_lite.harness.store import Store

TOY_KIND = textwrap.dedent('''
    """A toy kind: how many pixels an FGSM step moves, per model (no robust accuracy at all)."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    from robustbench_lite import CellKind, EvasionAttack, register_attack, register_kind, setting


    @dataclass(frozen=True)
    class ToyRow:
        norm: str
        eps: float
        n: int
        moved_share: float  # share of pixels the step moved
        seconds: float


    @register_kind("toy")
    class Toy(CellKind):
        """Share of pixels one signed-gradient step moves."""

        row: ClassVar[type] = ToyRow
        sort: ClassVar[tuple] = (("moved_share", False),)

        def measure(self, cell, group):
            attack = cell.build()
            split = group.data.test.head(cell.n)
            x, y = group.policy.batch_to(split.x), group.policy.batch_to(split.y)
            out = attack.run(group.trained.model, x, y)
            moved = float(((out.x_adv - x).abs() > 0).float().mean())
            values = ToyRow(cell.threat.norm.value, cell.threat.eps, cell.n, moved, out.seconds)
            return self.result(cell, group, values, method=attack, grad_evals=out.grad_evals), None


    @register_attack("toy-step")
    @dataclass(frozen=True, kw_only=True)
    class ToyStep(EvasionAttack):
        """One signed-gradient step, evaluated by the toy kind."""

        cell_kind: ClassVar[str] = "toy"
        fail: bool = setting(False)

        def _perturb(self, model, x, y, target, gen):
            if self.fail:
                raise RuntimeError("toy failure")
            _, _, grad = self.loss_grad(model, x, y, lambda logits, y: torch.nn.functional.cross_entropy(
                logits, y, reduction="none"))
            return self.geometry.project(x + self.eps * self.geometry.ascent(grad), x, self.eps)


    @register_attack("toy-broken")
    @dataclass(frozen=True, kw_only=True)
    class ToyBroken(ToyStep):
        """The toy step that always raises."""

        fail: bool = setting(True)
''')

BLOBS_DATASET = textwrap.dedent('''
    """A synthetic dataset: four classes of 8x8 grey blobs in the four image quadrants."""
    import torch

    from robustbench_lite import DataSplit, register_dataset


    def _blobs(n, gen):
        y = torch.randint(0, 4, (n,), generator=gen)
        x = 0.2 * torch.rand(n, 1, 8, 8, generator=gen)
        for k in range(4):
            r, c = divmod(k, 2)
            x[y == k, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 0.6
        return DataSplit(x.clamp(0, 1), y)


    @register_dataset("blobs")
    def blobs(root):
        """Four-class synthetic blobs (8x8), generated from a fixed seed."""
        gen = torch.Generator().manual_seed(0)
        return _blobs(600, gen), _blobs(200, gen), 4
''')


def _rows(workdir) -> list[CellResult]:
    with Store(workdir / "store.sqlite") as store:
        return store.rows()


def test_a_kind_from_a_plugin_file_gets_its_own_csv_resume_and_error_rows(tmp_path, capsys):
    plugin = tmp_path / "toy.py"
    plugin.write_text(TOY_KIND)
    work, out = tmp_path / "w", tmp_path / "lb"
    args = ["--plugin", str(plugin), "run", "--preset", "smoke", "--attacks", "fgsm,toy-step,toy-broken",
            "--workdir", str(work), "--out", str(out), "--no-progress"]
    assert main(args) == 1  # the broken toy cell is an error; the others are measured
    rows = {(r.attack, r.norm): r for r in _rows(work)}
    toy = rows[("toy-step", "linf")]
    assert toy.kind == "toy" and toy.status == "ok" and toy.grad_evals > 0
    assert rows[("toy-broken", "linf")].status == "error" and "toy failure" in rows[("toy-broken", "linf")].error
    assert rows[("fgsm", "linf")].status == "ok"
    table = pd.read_csv(out / "digits_toy.csv")
    assert list(table.columns) == ["dataset", "model", "defense", "attack", "norm", "eps", "n", "moved_share",
                                   "seconds", "status", "error"]
    assert set(table["attack"]) == {"toy-step", "toy-broken"}
    assert 0 < float(table.loc[table["attack"] == "toy-step", "moved_share"].iloc[0]) <= 1
    capsys.readouterr()
    assert main(args) == 1  # the rerun retries the error only
    assert "0 cells computed" not in capsys.readouterr().out
    again = {(r.attack, r.norm): r for r in _rows(work)}
    assert again[("toy-step", "linf")].key == toy.key
    args_ok = [a if a != "fgsm,toy-step,toy-broken" else "fgsm,toy-step" for a in args]
    assert main(args_ok) == 0
    assert "0 cells computed" in capsys.readouterr().out


def test_a_dataset_from_a_plugin_file_runs_end_to_end(tmp_path, capsys):
    plugin = tmp_path / "blobs.py"
    plugin.write_text(BLOBS_DATASET)
    work, out = tmp_path / "w", tmp_path / "lb"
    assert main(["--plugin", str(plugin), "list", "datasets"]) == 0
    assert "blobs" in capsys.readouterr().out
    args = ["--plugin", str(plugin), "run", "--preset", "smoke", "--datasets", "blobs", "--attacks", "fgsm,pgd",
            "--workdir", str(work), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = pd.read_csv(out / "blobs_linf_0.1.csv")
    assert table["clean_acc"].iloc[0] > 0.9 and {"fgsm", "pgd", "worst_case"} <= set(table.columns)
    assert main(args) == 0
    assert "0 cells computed" in capsys.readouterr().out


@pytest.mark.parametrize("name", list_kinds())
def test_every_kind_declares_its_row_and_a_sort_over_its_columns(name):
    k = kind(name)
    assert k.name == name
    assert dataclasses.is_dataclass(k.row) and k.row.__dataclass_params__.frozen
    columns = {f.name for f in dataclasses.fields(k.row)} | {"dataset", "model", "defense", "attack"}
    assert {col for col, _ in k.sort} <= columns


def test_a_kind_table_is_sorted_by_its_declared_order():
    def row(attack, rate, asr):
        metrics = json.dumps({"poison_rate": rate, "attack_success_rate": asr})
        return CellResult(
            dataset="d", model="m", defense="standard", attack=attack, norm="l0", eps=9.0, kind="poisoning", n=10,
            clean_acc=0.9, robust_acc=None, seconds=1.0, grad_evals=0, forward_evals=0, attacked=1, scope="all",
            target_hit_rate=None, success_rate=asr, median_l2=None, flags="", status="ok", error="",
            train_seconds=1.0, attack_params="{}", key=f"{attack}{rate}", model_key="k", code_version="", metrics=metrics,
        )

    tables = kind("poisoning").tables([row("label-flip", 0.1, None), row("badnets", 0.05, 0.9), row("badnets", 0.01, 0.5)])
    table = tables["d_poisoning"]
    assert list(zip(table["attack"], table["poison_rate"], strict=True)) == [
        ("badnets", 0.01), ("badnets", 0.05), ("label-flip", 0.1)
    ]


@pytest.mark.parametrize("name", list_kinds())
def test_every_kind_says_what_it_measures_in_list_kinds(name, capsys):
    from robustbench_lite.harness.kinds import KINDS

    doc = (KINDS.get(name).__doc__ or "").strip()
    assert doc and doc.splitlines()[0].strip()
    assert main(["list", "kinds", name]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(name) and len(line.split(None, 1)) == 2, line
