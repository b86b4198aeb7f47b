"""Our PGD is at least as strong as torchattacks' at the same eps, steps and step size."""

from __future__ import annotations

import pytest
import torch

from robustbench_lite import create_attack

torchattacks = pytest.importorskip("torchattacks")

N = 400


def _robust_acc(model, x_adv, y) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


@pytest.mark.parametrize(
    "norm,eps,step,steps",
    [("linf", 0.05, 0.01, 10), ("linf", 0.1, 0.01, 20), ("l2", 1.0, 0.2, 10), ("l2", 1.5, 0.25, 20)],
)
def test_pgd_at_least_as_strong_as_torchattacks(fmnist_model, fmnist, norm, eps, step, steps):
    x, y = fmnist.test.x[:N], fmnist.test.y[:N]
    ours = create_attack("pgd", norm=norm, eps=eps, step=step, steps=steps).perturb(fmnist_model, x, y)
    torch.manual_seed(0)
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    ref = cls(fmnist_model, eps=eps, alpha=step, steps=steps, random_start=True)(x, y)
    ours_acc, ref_acc = _robust_acc(fmnist_model, ours, y), _robust_acc(fmnist_model, ref, y)
    clean = _robust_acc(fmnist_model, x, y)
    assert ours_acc < clean  # the attack does something on this model
    assert ours_acc <= ref_acc + 0.01, f"ours {ours_acc:.3f} vs torchattacks {ref_acc:.3f}"


def test_ifgsm_at_least_as_strong_as_torchattacks_bim(fmnist_model, fmnist):
    x, y = fmnist.test.x[:N], fmnist.test.y[:N]
    ours = create_attack("ifgsm", eps=0.05).perturb(fmnist_model, x, y)
    steps = create_attack("ifgsm", eps=0.05).n_steps
    ref = torchattacks.BIM(fmnist_model, eps=0.05, alpha=1 / 255, steps=steps)(x, y)
    assert _robust_acc(fmnist_model, ours, y) <= _robust_acc(fmnist_model, ref, y) + 0.01
