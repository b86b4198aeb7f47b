"""Bad inputs to ``eval``, ``benchmark()`` and ``run --config``: each fails before any work, the
command exits with code 2 and one line that names the fix, and no traceback reaches the user."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from robustbench_lite import benchmark, create_model
from robustbench_lite.cli import main
from robustbench_lite.harness.gridfile import load_grid
from robustbench_lite.harness.store import Store


@pytest.fixture(scope="module")
def files(user_checkpoint, digits, tmp_path_factory):
    """The user's checkpoints plus broken variants and data files, in one folder."""
    _, folder = user_checkpoint
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    save_file(create_model("mlp", (1, 8, 8), 10).state_dict(), str(d / "mlp.safetensors"))
    save_file(create_model("small-cnn", (1, 8, 8), 10, width=16).state_dict(), str(d / "narrow.safetensors"))
    save_file(create_model("small-cnn", (3, 8, 8), 10).state_dict(), str(d / "rgb.safetensors"))
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (d / "weights.h5").write_bytes(b"\x89HDF")
    x, y = digits.test.x[:50, 0].numpy(), digits.test.y[:50].numpy()
    np.savez(d / "float255.npz", x=x * 255.0, y=y)
    np.savez(d / "normalized.npz", x=(x - 0.5) / 0.25, y=y)
    np.savez(d / "labels12.npz", x=(x * 255).astype(np.uint8), y=np.where(y == 0, 12, y))
    np.savez(d / "no_y.npz", images=x)
    (d / "net.py").write_text("import torch\n\ndef make(shape, k):\n    return torch.nn.Flatten()\n")
    np.savez(d / "good.npz", x=(x * 255).astype(np.uint8), y=y)
    whole = (d / "good.npz").read_bytes()
    (d / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    (d / "garbled.npz").write_bytes(bytes(b ^ 0x5A for b in whole))
    np.savez(d / "huge_labels.npz", x=(x * 255).astype(np.uint8), y=y.astype(np.int64) + 2**40)
    np.savez(d / "one_pixel.npz", x=np.zeros((20, 1, 1), np.uint8), y=np.arange(20) % 2)
    np.savez(d / "strings.npz", x=np.array(["img"] * 20), y=np.arange(20) % 2)
    for cls in ("a", "b", "empty"):
        (d / "folder" / cls).mkdir(parents=True)
    for i in range(3):
        for k, cls in enumerate(("a", "b")):
            Image.fromarray((x[2 * i + k] * 255).astype(np.uint8)).save(d / "folder" / cls / f"{i}.png")
    (d / "raises.py").write_text("import torch\n\n\ndef build(shape, k):\n    width = 0\n"
                                 "    return torch.nn.Linear(1, k // width)\n")
    return {"ckpt": folder / "digits_cnn.safetensors", "module": folder / "digits_module.pt", "dir": d}


def _eval_args(f, **over):
    args = {"--model": "small-cnn", "--weights": str(f["ckpt"]), "--data": "digits", "--threats": "linf:0.1",
            "--attacks": "quick", "--n": "20", "--device": "cpu", "--workdir": str(f["dir"] / "w")}
    args.update(over)
    out = ["eval"]
    for k, v in args.items():
        if v is not None:
            out += [k, v]
    return out


# (name, eval flags to change, words the message must hold)
EVAL_CASES = [
    ("missing weights file", {"--weights": "nowhere.safetensors"}, ["not found"]),
    ("wrong keys", {"--weights": "{dir}/mlp.safetensors"}, ["missing keys", "unexpected keys", "--model"]),
    ("wrong shapes", {"--weights": "{dir}/narrow.safetensors"}, ["mis-shaped keys", "file (16, 1, 3, 3)"]),
    ("3-channel model on 1-channel data", {"--weights": "{dir}/rgb.safetensors"}, ["3-channel", "--channels 3"]),
    ("pickle without trust", {"--weights": "{module}", "--model": None}, ["--trust-pickle", "unpickling runs code"]),
    ("garbage checkpoint", {"--weights": "{dir}/garbage.pt"}, ["not a readable torch checkpoint", "torch.save"]),
    ("unknown weights file type", {"--weights": "{dir}/weights.h5"}, ["unknown file type", ".safetensors"]),
    ("state dict without --model", {"--model": None}, ["architecture must be named", "--model"]),
    ("data in 0-255 floats", {"--data": "{dir}/float255.npz"}, ["divide by 255"]),
    ("normalized data", {"--data": "{dir}/normalized.npz"}, ["looks normalized", "--normalize"]),
    ("labels out of range", {"--data": "{dir}/labels12.npz", "--num-classes": "10"}, ["labels go up to 12", "classes"]),
    ("npz without y", {"--data": "{dir}/no_y.npz"}, ["needs 'x'", "np.savez"]),
    ("missing data", {"--data": "nowhere"}, ["no dataset, folder or file", "digits"]),
    ("eps in 0-255 units", {"--threats": "linf:8"}, ["8/255"]),
    ("unknown attack set", {"--attacks": "strong"}, ["unknown attack set", "quick, standard, full"]),
    ("no threat", {"--threats": None}, ["--threats", "--eps-curve"]),
    ("malformed eps curve", {"--eps-curve": "linf:0:0.2"}, ["NORM:START:STOP:COUNT"]),
    ("eps curve out of range", {"--eps-curve": "linf:0:8:5"}, ["must be <= 1", "/255"]),
    ("normalize in 0-255", {"--normalize": "125,63"}, ["divide by 255"]),
    ("model file without the function", {"--model": "{dir}/net.py:build"}, ["has no function", "make"]),
    ("n of zero", {"--n": "0"}, ["--n must be >= 1"]),
    ("unknown norm", {"--threats": "l3:0.1"}, ["unknown norm", "linf"]),
    ("bad channels", {"--channels": "2"}, ["--channels takes 1", "3"]),
    ("bad curve order", {"--eps-curve": "linf:0:0.2:3", "--curve-order": "sideways"}, ["--curve-order", "up or down"]),
    # every one of these once went through silently, misdiagnosed or as an internal error
    ("eps that is 0 in float32", {"--threats": "linf:1e-300"}, ["eps 1e-300 is below 1e-06", "8/255"]),
    ("curve order without a curve", {"--curve-order": "down"}, ["--curve-order down", "add --eps-curve", "drop --curve-order"]),
    ("truncated npz", {"--data": "{dir}/truncated.npz"}, ["truncated.npz is damaged", "np.savez"]),
    ("garbled npz", {"--data": "{dir}/garbled.npz"}, ["garbled.npz is not an .npz file", "np.savez"]),
    ("labels beyond int32", {"--data": "{dir}/huge_labels.npz"}, ["huge_labels.npz: y holds the label 10995116277", "np.unique"]),
    ("--num-classes beyond any dataset", {"--num-classes": "10000000000"}, ["--num-classes must be <= 100,000"]),
    ("weights naming a folder", {"--weights": "{dir}"}, ["is a folder", "checkpoint file inside it", "mlp.safetensors"]),
    ("normalize nan", {"--normalize": "nan,nan"}, ["finite numbers", "'nan,nan'"]),
    ("normalize per channel on grey images", {"--normalize": "0.1,0.2,0.3,0.4"},
     ["2 means and 2 stds", "1 channel;", "one mean and one std"]),
    ("1x1-pixel images", {"--data": "{dir}/one_pixel.npz"}, ["1x1-pixel images", "too small", "image size the model"]),
    ("string images", {"--data": "{dir}/strings.npz"}, ["strings.npz: x holds strings", "uint8 pixels"]),
    ("empty class folder", {"--data": "{dir}/folder"}, ["class folder 'empty' holds no images", "remove it"]),
    ("eps curve count past the limit", {"--eps-curve": "linf:0:0.2:1000000"}, ["COUNT is at most 201", "got 1000000"]),
]


def _check_one_line_exit_2(code, capsys, words):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("robustbench-lite: error:"), err
    assert "Traceback" not in captured.err + captured.out
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("name,over,words", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_refuses_bad_input_with_one_line_naming_the_fix(name, over, words, files, capsys):
    over = {k: (v.format(dir=files["dir"], module=files["module"]) if isinstance(v, str) else v) for k, v in over.items()}
    code = main(_eval_args(files, **over))
    _check_one_line_exit_2(code, capsys, words)
    assert not (files["dir"] / "w" / "store.sqlite").exists()  # refused before any work


BENCHMARK_CASES = [
    ("eps in 0-255 units", dict(eps=8), ValueError, "8/255"),
    ("0-255 float tensors", dict(dataset=(torch.rand(10, 1, 8, 8) * 255, torch.zeros(10, dtype=torch.long))),
     ValueError, "divide by 255"),
    ("corruptions", dict(threat_model="corruptions"), ValueError, "'Linf' or 'L2'"),
    ("unknown attack set", dict(attacks="strong"), ValueError, "quick, standard, full"),
    ("no examples", dict(n_examples=0), ValueError, "positive int"),
    ("unknown norm", dict(threat_model="L3"), ValueError, "unknown norm"),
    ("labels outside the model's classes", dict(dataset=(torch.rand(10, 1, 8, 8), torch.full((10,), 11))),
     ValueError, "labels go up to 11 but the model has 10 classes"),
    ("no default eps", dict(dataset=(torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long)), eps=None),
     ValueError, "pass eps="),
]


@pytest.mark.parametrize("name,kw,exc,words", BENCHMARK_CASES, ids=[c[0] for c in BENCHMARK_CASES])
def test_benchmark_refuses_bad_input_naming_the_fix(name, kw, exc, words, user_checkpoint):
    model, _ = user_checkpoint
    args = {"dataset": "digits", "eps": 0.1, "attacks": "quick", "device": "cpu", **kw}
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        benchmark(model, args.pop("n_examples", 20), **args)


def test_an_empty_workdir_is_refused_before_any_work(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (_eval_args(files, **{"--workdir": ""}), ["run", "--preset", "smoke", "--workdir", "", "--no-progress"],
                 ["leaderboard", "--out", " "], ["report", "--workdir", ""]):
        code = main(argv)
        _check_one_line_exit_2(code, capsys, ["is empty", "give a folder"])
    assert not list(tmp_path.iterdir())  # nothing computed into the current folder


def test_the_users_build_raising_is_their_error_with_their_line(files, capsys):
    """Exit 3 (the user's code, like a --plugin file), the file, the line and its text; not exit 70."""
    code = main(_eval_args(files, **{"--model": str(files["dir"] / "raises.py")}))
    err = capsys.readouterr().err.strip()
    assert code == 3, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for words in ("raises.py, line 6", "k // width", "ZeroDivisionError", "error in that code", "-v"):
        assert words in err, (words, err)


def test_benchmark_refuses_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = create_model("small-cnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        benchmark(model, 10, "digits", eps=0.1, attacks="quick", device="cpu")


def test_benchmark_refuses_something_that_is_not_a_model():
    with pytest.raises(TypeError, match="nn.Module"):
        benchmark(lambda x: x, 10, "digits", eps=0.1, attacks="quick", device="cpu")


GOOD = """
n = 20
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
"""

CONFIG_CASES = [
    ("malformed TOML", GOOD.replace('name = "digits"', 'name = "digits'), ["malformed TOML", "line"]),
    ("unknown top-level key", "survivor = true\n" + GOOD, ["survivor", "did you mean 'survivors'"]),
    ("unknown attack", GOOD.replace('["fgsm"]', '["fgsmm"]'), ["threats[0].attacks[0]", "did you mean 'fgsm'"]),
    ("wrong type", GOOD.replace("n = 20", 'n = "20"'), ["n:", "whole number"]),
    ("eps out of range", GOOD.replace("linf:0.1", "linf:8"), ["threats[0]", "8/255"]),
    ("unknown defense setting", GOOD.replace("epochs = 1", "epoch = 1"), ["defenses[0].epoch", "did you mean 'epochs'"]),
    ("bad defense setting", GOOD.replace("epochs = 1", "epochs = 0"), ["defenses[0]", "epochs must be >= 1"]),
    ("unknown dataset", GOOD.replace('name = "digits"', 'name = "digitz"'), ["datasets[0].name", "did you mean 'digits'"]),
    ("unknown model", GOOD.replace('name = "small-cnn"', 'name = "small_cnn"'), ["models[0].name", "small-cnn"]),
    ("attack without the norm", GOOD.replace('["fgsm"]', '["cw-l2"]'), ["threats[0].attacks[0]", "l2"]),
    ("unknown kind", GOOD + '\n[[extra]]\ndefenses = ["standard"]\nthreat = "linf:0.1"\nattacks = ["fgsm"]\nn = 5\n'
     'kind = "nope"\n', ["extra[0].kind", "unknown kind"]),
    ("curve without eps", GOOD + '\n[[curves]]\ncurve = "linf:0:0.2"\n', ["curves[0].curve", "NORM:START:STOP:COUNT"]),
    ("bad curve order", GOOD + '\n[[curves]]\ncurve = "linf:0:0.2:3"\norder = "sideways"\n', ["curves[0].order", '"down"']),
    ("epochs past the bound", GOOD.replace("epochs = 1", "epochs = 1000000000"),
     ["defenses[0]", "epochs must be <= 10000", "1000000000"]),
    ("steps past the bound", GOOD.replace('["fgsm"]', '[{ name = "pgd", steps = 10000000000 }]'),
     ["threats[0].attacks[0]", "pgd: steps must be <= 1000000"]),
    ("steps as a word", GOOD.replace('["fgsm"]', '[{ name = "pgd", steps = "ten" }]'),
     ["threats[0].attacks[0]: pgd: steps must be an int, got 'ten'"]),
    ("curve as an extra kind", GOOD + '\n[[extra]]\ndefenses = ["standard"]\nthreat = "linf:0.1"\nattacks = ["fgsm"]\n'
     'n = 5\nkind = "curve"\n', ["extra[0].kind", "[[curves]]"]),
]


@pytest.mark.parametrize("name,text,words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_fails_before_any_work_naming_file_key_and_fix(name, text, words, tmp_path, capsys):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(text)
    code = main(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"])
    _check_one_line_exit_2(code, capsys, ["bench.toml", *words])
    assert not (tmp_path / "w").exists()


def test_a_config_names_its_owner_once(tmp_path, capsys):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(GOOD.replace('["fgsm"]', '[{ name = "pgd", steps = "ten" }]'))
    main(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"])
    assert "pgd: pgd:" not in capsys.readouterr().err


def test_a_config_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    plain, bom = tmp_path / "plain.toml", tmp_path / "bom.toml"
    plain.write_text(GOOD, encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode("utf-8"))
    keys = [[c.key for c in load_grid(p).plan().cells] for p in (plain, bom)]
    assert keys[0] == keys[1] and keys[0]


def test_bad_model_kwargs_fail_before_any_training(tmp_path, capsys):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(GOOD.replace('name = "small-cnn"', 'name = "small-cnn"\nkwargs = { width = -4 }'))
    code = main(["run", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"])
    _check_one_line_exit_2(code, capsys, ["model 'small-cnn' with kwargs {'width': -4}", "fix the model's kwargs"])
    assert not list((tmp_path / "w" / "models").glob("*.json"))  # nothing trained
    with Store(tmp_path / "w" / "store.sqlite") as store:
        assert len(store) == 0


def test_a_missing_config_file_is_named(tmp_path, capsys):
    code = main(["run", "--config", str(tmp_path / "nope.toml"), "--workdir", str(tmp_path / "w")])
    _check_one_line_exit_2(code, capsys, ["nope.toml", "not found"])
