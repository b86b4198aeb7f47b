"""The built wheel installs into a fresh venv and exposes the attack and defense packages; ruff is clean."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_attacks_and_defenses(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    wheel = next(dist.glob("robustbench_lite-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # the fresh venv borrows this environment's heavy dependencies (torch, ...) but not its robustbench_lite
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "zz_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, cwd=tmp_path)
    code = (
        "import robustbench_lite, robustbench_lite.attacks, robustbench_lite.defenses, pathlib;"
        "from robustbench_lite import list_attacks, list_datasets, list_defenses, list_kinds, list_verifiers;"
        "assert 'pgd' in list_attacks() and 'standard' in list_defenses() and 'digits' in list_datasets();"
        "assert {'evasion', 'certified', 'curve'} <= set(list_kinds()) and list_verifiers();"
        "from robustbench_lite.harness.presets import PRESETS, get_preset;"
        "assert sorted(PRESETS) == ['certified', 'full', 'poisoning', 'quick', 'smoke'] and get_preset('quick').plan().cells;"
        f"assert not pathlib.Path(robustbench_lite.__file__).is_relative_to({str(ROOT)!r});"
        "print(robustbench_lite.attacks.__path__[0])"
    )
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert str(env_dir) in out.stdout
    cli = subprocess.run([str(env_dir / "bin" / "robustbench-lite"), "list", "attacks"], check=True,
                         capture_output=True, text=True, cwd=tmp_path)
    assert "pgd" in cli.stdout


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    res = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
