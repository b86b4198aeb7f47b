"""Fixtures of the certify tests."""

from __future__ import annotations

import pytest

from robustbench_lite import ModelSpec, create_defense, train_or_load


@pytest.fixture(scope="session")
def certified_model(digits, model_cache):
    """cnn-cert-small trained by IBP on digits (8x8) at Linf 0.05: a model the verifiers certify
    much of, shared by the verifier and branch-and-bound tests (trained once per session)."""
    defense = create_defense("ibp", eps=0.05, epochs=6, warmup_epochs=1, ramp_epochs=3, batch_size=64, lr=3e-3)
    return train_or_load(ModelSpec("cnn-cert-small"), defense, digits, model_cache, progress=False).model
