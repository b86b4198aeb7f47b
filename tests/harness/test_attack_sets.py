"""The named attack sets: ``autoattack`` is exactly AutoAttack's standard version, ``autoattack-rand``
its EOT version, ``standard`` the cheaper set, all usable where sets are (``eval --attacks``,
``benchmark(attacks=)``, grid files); a reference set on a model with too few classes is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from robustbench_lite import create_attack, create_model
from robustbench_lite.cli import main
from robustbench_lite.eval.evasion import run_order
from robustbench_lite.harness.attack_sets import SETS, attack_specs, curve_spec


def _as_dict(specs):
    return {s.name: s.params for s in specs}


def test_autoattack_is_autoattacks_standard_version_in_its_order():
    specs = attack_specs("autoattack", "linf", 10)
    assert [s.name for s in specs] == ["apgd-ce", "apgd-t-dlr", "fab-t", "square"]
    got = _as_dict(specs)
    assert got["apgd-ce"] == {"steps": 100, "restarts": 1}
    assert got["apgd-t-dlr"] == {"steps": 100, "restarts": 1, "n_targets": 9}
    assert got["fab-t"] == {"steps": 100, "restarts": 1, "n_targets": 9, "early_stop": True}
    assert got["square"] == {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}
    built = [create_attack(s.name, norm="l2", eps=1.0, **s.params) for s in attack_specs("autoattack", "l2", 10)]
    # the evaluation runs them in AutoAttack's order: the gradient attacks, then FAB-T, then Square
    assert [a.name for a in sorted(built, key=run_order)] == ["apgd-ce", "apgd-t-dlr", "fab-t", "square"]
    fab = next(a for a in built if a.name == "fab-t")
    assert (fab.alpha_max, fab.eta, fab.beta) == (0.1, 1.05, 0.9)


def test_autoattack_rand_averages_20_draws_and_standard_has_no_fab():
    assert _as_dict(attack_specs("autoattack-rand", "linf", 10)) == {"apgd-ce": {"eot": 20}, "apgd-dlr": {"eot": 20}}
    assert "fab-t" not in _as_dict(attack_specs("standard", "linf", 10))
    assert {"fab", "fab-t"} <= set(_as_dict(attack_specs("full", "l1", 10)))  # every attack with the norm
    assert set(SETS) >= {"quick", "standard", "full", "autoattack", "autoattack-rand"}


def test_targets_follow_the_classes_and_curves_drop_the_early_stop():
    got = _as_dict(attack_specs("autoattack", "linf", 5))
    assert got["apgd-t-dlr"]["n_targets"] == 4 and got["fab-t"]["n_targets"] == 4
    spec = next(s for s in attack_specs("autoattack", "linf", 10) if s.name == "fab-t")
    assert "early_stop" not in curve_spec(spec).params


@pytest.mark.parametrize("name,classes,words", [("autoattack", 2, ["at least 4 classes", "has 2", "--attacks standard"]),
                                                ("autoattack", 3, ["at least 4 classes", "FAB-T"]),
                                                ("autoattack-rand", 2, ["at least 3 classes", "DLR"])])
def test_a_reference_set_on_too_few_classes_is_one_clear_error(name, classes, words):
    with pytest.raises(ValueError) as err:
        attack_specs(name, "linf", classes)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_eval_autoattack_on_a_two_class_model_exits_2_with_one_line(digits, tmp_path, capsys):
    torch.manual_seed(0)
    save_file(create_model("small-cnn", (1, 8, 8), 2).state_dict(), str(tmp_path / "two.safetensors"))
    keep = digits.test.y < 2
    np.savez(tmp_path / "two.npz", x=digits.test.x[keep][:40, 0].numpy(), y=digits.test.y[keep][:40].numpy())
    code = main(["eval", "--model", "small-cnn", "--weights", str(tmp_path / "two.safetensors"), "--data",
                 str(tmp_path / "two.npz"), "--num-classes", "2", "--threats", "linf:0.1", "--attacks", "autoattack",
                 "--n", "10", "--device", "cpu", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "at least 4 classes" in err, (code, err)


def test_benchmark_runs_the_autoattack_set(digits_model, digits, tmp_path):
    """``benchmark(attacks="autoattack")`` on a few digits points: AutoAttack's four columns."""
    from robustbench_lite import benchmark
    from robustbench_lite.harness.store import Store

    x, y = digits.test.x[:16], digits.test.y[:16]
    clean, robust = benchmark(digits_model, 16, (x, y), "Linf", eps=0.05, attacks="autoattack", device="cpu",
                              workdir=tmp_path)
    assert 0.0 <= robust <= clean
    with Store(tmp_path / "store.sqlite") as store:
        names = {r.attack for r in store.rows()}
    assert {"apgd-ce", "apgd-t-dlr", "fab-t", "square", "worst_case"} <= names


def test_fab_under_an_unsupported_norm_is_one_clear_line():
    with pytest.raises(ValueError) as err:
        attack_specs("fab,fab-t", "l0")
    msg = str(err.value)
    assert "\n" not in msg and "l0" in msg and "'fab': ['linf', 'l2', 'l1']" in msg, msg
    with pytest.raises(ValueError, match="fab supports norm linf, l2, l1, not l0"):
        create_attack("fab", norm="l0", eps=1.0)


def test_a_grid_file_takes_the_autoattack_sets(tmp_path):
    from robustbench_lite.harness.gridfile import load_grid

    (tmp_path / "aa.toml").write_text(
        'name = "aa"\nn = 20\n\n[[datasets]]\nname = "digits"\n\n[[models]]\nname = "small-cnn"\n\n'
        '[[defenses]]\nname = "standard"\nepochs = 1\n\n[[threats]]\nthreat = "linf:0.1"\nattacks = "autoattack"\n\n'
        '[[threats]]\nthreat = "l2:1.0"\nattacks = "autoattack-rand"\n'
    )
    cells = load_grid(tmp_path / "aa.toml").plan().cells
    got = {(c.threat.label, c.attack.name): c.attack.params for c in cells if c.attack is not None}
    assert got[("linf_0.1", "fab-t")] == {"steps": 100, "restarts": 1, "n_targets": 9, "early_stop": True}
    assert got[("linf_0.1", "square")]["queries"] == 5000
    assert got[("l2_1", "apgd-dlr")] == {"eot": 20}
