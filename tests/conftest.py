"""Shared fixtures: small datasets and models trained once per test session (CPU budget)."""

from __future__ import annotations

import pytest
import torch

from robustbench_lite import Data, ModelCache, ModelSpec, create_defense, load, train_or_load

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits() -> Data:
    return load("digits")


@pytest.fixture(scope="session")
def fmnist() -> Data:
    """Fashion-MNIST with the first 5000 training images (Debian's dataset-fashion-mnist)."""
    return load("fashion-mnist", train_limit=5000)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> ModelCache:
    return ModelCache(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def digits_model(digits, model_cache):
    """small-cnn on digits, standard training (seconds on a CPU; its accuracy: BENCHMARKS.md, trust table)."""
    defense = create_defense("standard", epochs=8, batch_size=64, lr=3e-3)
    return train_or_load(ModelSpec("small-cnn"), defense, digits, model_cache, progress=False).model


@pytest.fixture(scope="session")
def fmnist_model(fmnist, model_cache):
    """small-cnn on 5000 Fashion-MNIST images, one epoch of standard training."""
    defense = create_defense("standard", epochs=1, batch_size=64, lr=2e-3)
    return train_or_load(ModelSpec("small-cnn"), defense, fmnist, model_cache, progress=False).model
