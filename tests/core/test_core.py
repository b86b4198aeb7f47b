"""Registry, threat model, ops, data and models."""

from __future__ import annotations

import copy
import gzip
import struct

import numpy as np
import pytest
import torch

from robustbench_lite import DatasetNotFoundError, Norm, ThreatModel, create_model, load, ops
from robustbench_lite.core.datasets import read_idx
from robustbench_lite.core.device import resolve_device
from robustbench_lite.core.registry import ATTACKS, DEFENSES, MODELS, Registry, create_attack, list_attacks


# -- registry --------------------------------------------------------------------------------------
def test_registry_lists_with_wildcards():
    assert "pgd" in list_attacks()
    assert list_attacks("pg*") == [n for n in list_attacks() if n.startswith("pg")]
    assert "standard" in DEFENSES.list()
    assert {"small-cnn", "mlp", "one-hidden-relu"} <= set(MODELS.list())


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match="did you mean 'pgd'"):
        create_attack("pdg")


def test_duplicate_registration_is_refused():
    reg = Registry("thing", "robustbench_lite.attacks", "robustbench_lite.things")

    @reg.register("a")
    class A:  # noqa: B903
        pass

    with pytest.raises(ValueError, match="already registered"):

        @reg.register("a")
        class B:
            pass


def test_registry_names_must_be_lower_case():
    with pytest.raises(ValueError, match="lower-case"):
        ATTACKS.register("PGD")


# -- threat ---------------------------------------------------------------------------------------
def test_threat_parses_strings_to_enums():
    t = ThreatModel.parse("linf:0.1")
    assert t.norm is Norm.LINF and t.eps == 0.1 and t.label == "linf_0.1"
    assert ThreatModel("L2", 1.5).norm is Norm.L2
    with pytest.raises(ValueError, match="linf"):
        Norm.parse("l3")
    with pytest.raises(ValueError, match="255"):
        ThreatModel("linf", 8)
    with pytest.raises(ValueError, match="NORM:EPS"):
        ThreatModel.parse("linf")


# -- ops --------------------------------------------------------------------------------------------
def test_projections_land_in_ball_and_box():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    far = x + 3 * torch.randn(16, 1, 8, 8, generator=gen)
    for norm, eps in [(Norm.LINF, 0.1), (Norm.L2, 0.5)]:
        p = norm.geometry.project(far, x, eps)
        assert (norm.geometry.distance(p - x) <= eps + 1e-5).all()
        assert p.min() >= 0 and p.max() <= 1
        start = norm.geometry.random_start(x, eps, gen)
        assert (norm.geometry.distance(start - x) <= eps + 1e-5).all()


def test_linf_projection_is_identity_inside():
    x = torch.full((2, 1, 4, 4), 0.5)
    inside = x + 0.05
    assert torch.equal(Norm.LINF.geometry.project(inside, x, 0.1), inside)


def test_margin_masks_true_class_even_for_negative_logits():
    logits = torch.tensor([[-5.0, -1.0, -3.0]])
    y = torch.tensor([1])
    assert ops.max_other(logits, y).item() == -3.0
    assert ops.margin(logits, y).item() == 2.0


def test_ce_and_kl_basics():
    logits = torch.randn(5, 4)
    assert torch.allclose(ops.kl_div(logits, logits), torch.zeros(5), atol=1e-6)
    assert (ops.ce(logits, torch.zeros(5, dtype=torch.long)) > 0).all()


def test_l0_norm_counts_pixels_not_channels():
    d = torch.zeros(1, 3, 4, 4)
    d[0, :, 1, 1] = 0.3
    d[0, 0, 2, 2] = -0.1
    assert Norm.L0.geometry.distance(d).item() == 2


# -- data -------------------------------------------------------------------------------------------
def test_fashion_mnist_loads_from_debian_files():
    data = load("fashion-mnist", train_limit=100)
    assert data.train.x.shape == (100, 1, 28, 28) and len(data.test) == 10000
    assert data.train.x.min() >= 0 and data.train.x.max() <= 1 and data.num_classes == 10


def test_missing_dataset_names_the_apt_command(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load("fashion-mnist", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="data-root"):
        load("cifar10")
    with pytest.raises(DatasetNotFoundError, match="nothing is downloaded"):
        load("mnist", root=tmp_path)
    with pytest.raises(ValueError, match="choose one of"):
        load("imagenet")


def test_data_root_env_points_at_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in [("train", 12), ("t10k", 5)]:
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n, dtype=np.uint8)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + imgs.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBBI", 0, 8, 1, n) + labs.tobytes())
        written[prefix] = imgs
    monkeypatch.setenv("RBL_DATA_ROOT", str(tmp_path))
    data = load("fashion-mnist")
    assert len(data.train) == 12 and len(data.test) == 5
    assert torch.equal((data.train.x[3, 0] * 255).round().to(torch.uint8), torch.from_numpy(written["train"][3]))
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").shape == (5, 28, 28)


def test_validation_split_is_seeded_and_disjoint(digits):
    a = load("digits", val_fraction=0.2, seed=1)
    b = load("digits", val_fraction=0.2, seed=1)
    assert torch.equal(a.val.x, b.val.x)
    assert len(a.val) + len(a.train) == len(digits.train)


# -- models -----------------------------------------------------------------------------------------
def test_small_cnn_has_about_0_4m_parameters():
    m = create_model("small-cnn", (1, 28, 28), 10)
    n = sum(p.numel() for p in m.parameters())
    assert 350_000 < n < 450_000
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_small_cnn_pools_before_relu_with_the_same_numbers_as_relu_then_pool():
    """The default small-cnn runs max pooling before ReLU (cheaper); its logits, input gradients
    and parameter gradients equal the conv-ReLU-pool order's exactly, and the names of its
    parameters are the same."""
    torch.manual_seed(0)
    model = create_model("small-cnn", (1, 28, 28), 10)
    assert [type(m).__name__ for m in model[:3]] == ["Conv2d", "MaxPool2d", "ReLU"]
    usual = copy.deepcopy(model)
    usual[1], usual[2], usual[4], usual[5] = model[2], model[1], model[5], model[4]
    x = torch.rand(64, 1, 28, 28)
    x[:8] = 0.0  # windows of equal values: ties in the pooling
    y = torch.randint(0, 10, (64,))
    numbers = []
    for net in (model, usual):
        xx = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(net(xx), y)
        numbers.append((net(x), *torch.autograd.grad(loss, [xx, *net.parameters()])))
    assert all(torch.equal(a, b) for a, b in zip(*numbers, strict=True))
    assert list(dict(model.named_parameters())) == list(dict(usual.named_parameters()))
    smooth = create_model("small-cnn", (1, 28, 28), 10, activation="elu", pool="avg")
    assert [type(m).__name__ for m in smooth[:3]] == ["Conv2d", "ELU", "AvgPool2d"]  # they do not commute


@pytest.mark.parametrize("name", ["small-cnn", "mlp", "one-hidden-relu", "timm:resnet10t"])
def test_models_build_for_the_dataset_shape(name):
    m = create_model(name, (3, 32, 32), 7)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_timm_model_is_an_error():
    with pytest.raises(KeyError, match="timm"):
        create_model("timm:not-a-net", (1, 28, 28), 10)


def test_device_auto_is_cpu_here_and_bad_devices_are_errors():
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(ValueError, match="use auto, cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_setting_added_later_keeps_stored_keys_at_its_default():
    """APGD's ``eot`` and Square's ``rescale_schedule`` came after results were stored: at their
    defaults they stay out of the params (so out of every cell key), set they are in."""
    from robustbench_lite import create_attack
    from robustbench_lite.core.config import config_hash

    plain, eot = create_attack("apgd-ce", eps=0.1), create_attack("apgd-ce", eps=0.1, eot=20)
    assert "eot" not in plain.get_params() and eot.get_params()["eot"] == 20
    assert config_hash(plain.get_params()) != config_hash(eot.get_params())
    assert create_attack("apgd-ce", **plain.get_params()) == plain  # the params still rebuild the attack
    assert "rescale_schedule" not in create_attack("square", eps=0.1).get_params()
    assert create_attack("square", eps=0.1, rescale_schedule=False).get_params()["rescale_schedule"] is False
