"""A dataset declares its usual budgets; evaluations without an eps use them."""

from __future__ import annotations

import pytest

from robustbench_lite import Norm, default_eps, register_dataset
from robustbench_lite.core.data import dataset_default_eps


@register_dataset("test-default-eps-data")
@default_eps(linf=0.05, l2=0.75)
def _data(root):
    raise AssertionError("never loaded here")


def test_a_registered_dataset_declares_its_budgets_per_norm():
    assert dataset_default_eps("test-default-eps-data", Norm.LINF) == 0.05
    assert dataset_default_eps("test-default-eps-data", Norm.L2) == 0.75
    assert dataset_default_eps("test-default-eps-data", Norm.L1) is None  # none declared: the caller must pass eps
    assert dataset_default_eps("fashion-mnist", Norm.LINF) == 0.1 and dataset_default_eps("cifar10", Norm.LINF) == 8 / 255


def test_a_bad_declaration_fails_at_import_naming_it():
    with pytest.raises(ValueError, match="unknown norm"):
        default_eps(l3=0.1)
    with pytest.raises(ValueError, match="must be > 0"):
        default_eps(linf=0.0)
