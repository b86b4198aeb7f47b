"""Your model, your data: a model trained outside the harness goes through ``robustbench-lite eval``
and ``benchmark()`` and gets the numbers ``evaluate()`` gives on the same points; image folders
and ``.npz`` files in every layout run end to end; pickles are refused unless trusted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from robustbench_lite import benchmark, create_attack, evaluate
from robustbench_lite.cli import main
from robustbench_lite.harness.rows import WORST_CASE
from robustbench_lite.harness.store import Store

N = 100


def _eval(tmp_path, weights, data, *extra, work="w"):
    return main(["eval", "--model", "small-cnn", "--weights", str(weights), "--data", str(data), "--threats",
                 "linf:0.1", "--attacks", "quick", "--n", str(N), "--device", "cpu", "--workdir", str(tmp_path / work),
                 "--out", str(tmp_path / "lb"), "--report", str(tmp_path / "rep"), "--no-progress", *extra])


def _worst_case(workdir, defense: str) -> tuple[float, float]:
    with Store(workdir / "store.sqlite") as store:
        rows = [r for r in store.rows() if r.attack == WORST_CASE and r.kind == "evasion" and r.defense == defense]
    assert len(rows) == 1
    return rows[0].clean_acc, rows[0].robust_acc


@pytest.fixture(scope="module")
def reference(user_checkpoint, digits):
    """``evaluate()`` on the first N digits test points with the quick set (FGSM, PGD) on survivors."""
    model, _ = user_checkpoint
    ev = evaluate(model, [create_attack("fgsm", eps=0.1), create_attack("pgd", eps=0.1)], digits.test, n=N,
                  survivors_only=True)
    return ev.clean_acc, float(next(iter(ev.worst_case.values())).float().mean())


def test_eval_of_safetensors_and_pt_weights_equals_evaluate_and_benchmark(user_checkpoint, reference, tmp_path, capsys):
    model, folder = user_checkpoint
    assert _eval(tmp_path, folder / "digits_cnn.safetensors", "digits") == 0
    out = capsys.readouterr().out
    assert "report: " in out and (tmp_path / "rep" / "report.html").is_file()
    assert _worst_case(tmp_path / "w", "digits_cnn.safetensors") == reference
    assert _eval(tmp_path, folder / "digits_cnn.pt", "digits") == 0
    assert _worst_case(tmp_path / "w", "digits_cnn.pt") == reference
    table = pd.read_csv(tmp_path / "lb" / "digits_linf_0.1.csv")
    assert {"digits_cnn.safetensors", "digits_cnn.pt"} <= set(table["defense"])  # rows named after the files
    capsys.readouterr()
    assert _eval(tmp_path, folder / "digits_cnn.safetensors", "digits") == 0  # same weights: resumes
    assert "0 cells computed" in capsys.readouterr().out
    assert benchmark(model, n_examples=N, dataset="digits", threat_model="Linf", eps=0.1, attacks="quick",
                     device="cpu") == reference


def test_benchmark_stores_its_row_with_flags_in_a_workdir_and_takes_data_or_tensors(user_checkpoint, digits, reference,
                                                                                  tmp_path):
    model, _ = user_checkpoint
    work = tmp_path / "w"
    got = benchmark(model, N, digits, "Linf", eps=0.1, attacks="quick", device="cpu", workdir=work, model_name="mine")
    assert got == reference
    with Store(work / "store.sqlite") as store:
        rows = store.rows()
    assert {r.attack for r in rows} == {"fgsm", "pgd", WORST_CASE} and {r.defense for r in rows} == {"mine"}
    assert all(r.status == "ok" and isinstance(r.flags, str) for r in rows)
    pair = (digits.test.x[:N].numpy(), digits.test.y[:N].numpy())
    assert benchmark(model, N, pair, "Linf", eps=0.1, attacks="quick", device="cpu") == reference


def test_image_folder_of_pngs_runs_end_to_end(user_checkpoint, digits, tmp_path):
    _, folder = user_checkpoint
    root = tmp_path / "pngs"
    for i in range(120):
        x, y = digits.test.x[i, 0], int(digits.test.y[i])
        (root / f"class_{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((x * 255).round().byte().numpy(), mode="L").save(root / f"class_{y}" / f"{i:03d}.png")
    assert _eval(tmp_path, folder / "digits_cnn.safetensors", root) == 0
    table = pd.read_csv(tmp_path / "lb" / "pngs_linf_0.1.csv")
    assert table["n"].iloc[0] == N and table["clean_acc"].iloc[0] > 0.8
    assert table["worst_case"].iloc[0] <= table["fgsm"].iloc[0]


def test_npz_in_each_layout_gives_the_same_points_and_resumes(user_checkpoint, digits, tmp_path, capsys):
    _, folder = user_checkpoint
    u8 = (digits.test.x[:N, 0] * 255).round().to(torch.uint8)
    layouts = {
        "nhw": u8.numpy(),
        "nhwc": u8[..., None].numpy(),
        "nchw": (u8[:, None].float() / 255).numpy(),  # floats in [0, 1]
    }
    computed = []
    for name, x in layouts.items():
        np.savez(tmp_path / "points.npz", x=x, y=digits.test.y[:N].numpy())
        capsys.readouterr()
        assert _eval(tmp_path, folder / "digits_cnn.safetensors", tmp_path / "points.npz") == 0, name
        computed.append(capsys.readouterr().out.split(" cells computed")[0].rsplit(" ", 1)[-1])
    assert computed == ["2", "0", "0"]  # the same images in every layout: the same cells
    table = pd.read_csv(tmp_path / "lb" / "points.npz_linf_0.1.csv")
    assert len(table) == 1 and table["clean_acc"].iloc[0] > 0.8


def test_a_pickled_module_is_refused_without_trust_pickle_and_runs_with_it(user_checkpoint, reference, tmp_path, capsys):
    _, folder = user_checkpoint
    args = ["eval", "--weights", str(folder / "digits_module.pt"), "--data", "digits", "--threats", "linf:0.1",
            "--attacks", "quick", "--n", str(N), "--device", "cpu", "--workdir", str(tmp_path / "w"),
            "--out", str(tmp_path / "lb"), "--report", str(tmp_path / "rep"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unpickling runs code" in err and "--trust-pickle" in err and "Traceback" not in err
    assert main([*args, "--trust-pickle"]) == 0
    with Store(tmp_path / "w" / "store.sqlite") as store:
        row = next(r for r in store.rows() if r.attack == WORST_CASE)
    assert (row.model, row.defense) == ("Sequential", "digits_module.pt")
    assert (row.clean_acc, row.robust_acc) == reference


NET_FILE = """
import torch
from robustbench_lite import create_model


class Net(torch.nn.Module):
    \"\"\"small-cnn trained on normalized inputs z = (x - 0.3) / 0.4.\"\"\"

    def __init__(self, shape, k):
        super().__init__()
        self.body = create_model("small-cnn", shape, k)

    def forward(self, z):
        return self.body(z * 0.4 + 0.3)


def build(input_shape, num_classes):
    return Net(input_shape, num_classes)
"""


def test_a_model_file_with_normalize_inside_keeps_eps_in_pixel_space(user_checkpoint, digits, reference, tmp_path):
    """A network from the user's own file that expects normalized inputs, evaluated on raw pixels with
    --normalize, computes the same function as the plain model, so it gets the same numbers at the
    same eps in pixel space (at eps in normalized units, 0.1 * 0.4 in pixels, far fewer points break)."""
    from safetensors.torch import save_file

    model, _ = user_checkpoint
    (tmp_path / "my_net.py").write_text(NET_FILE)
    save_file({f"body.{k}": v for k, v in model.state_dict().items()}, str(tmp_path / "normalized.safetensors"))
    code = main(["eval", "--model", f"{tmp_path / 'my_net.py'}:build", "--weights", str(tmp_path / "normalized.safetensors"),
                 "--normalize", "0.3,0.4", "--data", "digits", "--threats", "linf:0.1", "--attacks", "quick", "--n", str(N),
                 "--device", "cpu", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "lb"),
                 "--report", str(tmp_path / "rep"), "--no-progress"])
    assert code == 0
    clean, robust = _worst_case(tmp_path / "w", "normalized.safetensors")
    assert clean == reference[0]
    assert abs(robust - reference[1]) <= 0.03  # float rounding of the (de)normalization may move a point or two
