"""Shared fixtures: small datasets and models trained once per test session (CPU budget)."""

from __future__ import annotations

import os

import pytest
import torch

from robustbench_lite import Data, ModelCache, ModelSpec, create_defense, load, train_or_load

# pytest-xdist runs the suite in one process per core (pyproject's addopts): each gets its share of
# the cores, so torch's thread pools do not oversubscribe them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
torch.set_num_threads(max(1, _CORES // _WORKERS))


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


@pytest.fixture(scope="session")
def user_checkpoint(digits, tmp_path_factory):
    """A user's model: small-cnn trained on digits by a plain torch loop (not the harness), saved as
    safetensors, as a ``.pt`` state dict and as a whole pickled module.  Returns (model, folder)."""
    from safetensors.torch import save_file

    from robustbench_lite import create_model

    torch.manual_seed(0)
    model = create_model("small-cnn", digits.input_shape, digits.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        perm = torch.randperm(len(digits.train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(digits.train.x[idx]), digits.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    folder = tmp_path_factory.mktemp("user")
    save_file(model.state_dict(), str(folder / "digits_cnn.safetensors"))
    torch.save(model.state_dict(), folder / "digits_cnn.pt")
    torch.save(model, folder / "digits_module.pt")
    return model, folder


@pytest.fixture(autouse=True)
def _shared_models_kept(request):
    """The session's trained models are shared by many tests: one that comes back from a test in
    another memory layout (e.g. channels_last left behind by an evaluation) fails that test here,
    not some later test that happens to check the layout."""
    yield
    for name in ("digits_model", "fmnist_model"):
        if name in request.fixturenames:
            changed = [n for n, p in request.getfixturevalue(name).named_parameters() if not p.is_contiguous()]
            assert not changed, f"{request.node.nodeid} left {name}'s {changed[0]} in another memory layout"
