"""The computation graph the verifiers bound: torch.fx tracing of residual models, batch-norm
folding, the bounds of the former flat-list propagators reproduced on the Sequential zoo models,
and the errors for what cannot be traced or bounded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from certify_exact import ResidualCNN, ResidualMLP
from safetensors.torch import load_file
from torch import nn

from robustbench_lite import Norm, ThreatModel, create_model
from robustbench_lite.certify import InputSet, create_verifier, layer_bounds, parse_network
from robustbench_lite.certify._bounds import logit_interval
from robustbench_lite.certify._layers import AddOp, ChannelAffineOp, ConvOp

FIXTURE = Path(__file__).parent / "data" / "flat_bounds.safetensors"
ZOO = {"small-cnn": {"width": 4, "hidden": 16}, "cnn-cert-small": {"width": 4, "hidden": 20},
       "mlp": {"hidden": 24, "depth": 2}, "one-hidden-relu": {"hidden": 16}}
VERIFIERS = {"ibp": ("ibp", {}), "crown": ("crown", {}), "crown-ibp": ("crown", {"intermediate": "ibp"}),
             "alpha-crown": ("alpha-crown", {"steps": 5})}


@pytest.mark.parametrize("name", list(ZOO))
def test_the_graph_propagators_equal_the_flat_list_bounds_on_the_sequential_zoo_models(name):
    """``flat_bounds.safetensors`` holds the weights, inputs and float64 margin bounds computed by
    the flat-list propagators the graph replaced (commit 19803a6): 4 threats x 4 verifiers."""
    ref = load_file(str(FIXTURE))
    model = create_model(name, (1, 12, 12), 10, **ZOO[name]).eval()
    model.load_state_dict({k.split("/w/")[1]: v for k, v in ref.items() if k.startswith(f"{name}/w/")})
    x, y = ref["x"], ref[f"{name}/y"]
    compared = 0
    for threat in ("linf:0.01", "linf:0.04", "l2:0.3", "l1:1.0"):
        for key, (verifier, kw) in VERIFIERS.items():
            got = create_verifier(verifier, **kw).margin_bounds(model, x, y, ThreatModel.parse(threat))
            want = ref[f"{name}/{threat}/{key}"]
            finite = want.abs() < 1e299  # the c = y entries were stored clamped
            assert float((got[finite] - want[finite]).abs().max()) <= 1e-9, (threat, key)
            compared += int(finite.sum())
    with torch.no_grad():
        eps = torch.full((x.shape[0],), 0.04, dtype=torch.float64)
        lo, hi = logit_interval(parse_network(model, x[:1]), InputSet.make(x.double(), Norm.LINF, eps))
    assert float((lo - ref[f"{name}/logit_lo"]).abs().max()) <= 1e-9
    assert float((hi - ref[f"{name}/logit_hi"]).abs().max()) <= 1e-9
    assert compared == 16 * 27


class TorchvisionBlock(nn.Module):
    """A basic block written as torchvision writes it: in-place ``+=``, ``relu`` module reused,
    ``x.view(x.size(0), -1)`` before the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.down = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3))
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        identity = self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(out.view(out.size(0), -1))


def _warm(model: nn.Module, shape) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *shape))  # running statistics away from their start
    return model.eval()


@pytest.mark.parametrize("build,shape", [
    (lambda: ResidualMLP(1, 4, 8), (1, 2, 2)), (lambda: ResidualCNN(2), (1, 4, 4)),
    (TorchvisionBlock, (1, 4, 4)),
], ids=["residual-mlp", "residual-cnn", "torchvision-block"])
def test_residual_models_trace_into_a_graph_that_computes_the_model(build, shape):
    model = _warm(build(), shape)
    x = torch.rand(5, *shape)
    net = parse_network(model, x)
    torch.testing.assert_close(net.forward(x), model(x))
    adds = [node for node in net.nodes[1:] if isinstance(node.op, AddOp)]
    assert len(adds) == 1 and len({*adds[0].inputs}) == 2  # the shortcut joins two branches
    assert not any(isinstance(op, ChannelAffineOp) for op in net.ops)  # every eval-mode batch norm folded
    assert any(isinstance(op, ConvOp) and op.bn is not None for op in net.ops) or isinstance(model, ResidualMLP)


def test_bounds_of_a_residual_model_hold_at_sampled_points_and_tighten_with_crown():
    model = _warm(TorchvisionBlock(), (1, 4, 4)).double()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.05)
    bounds = {n: create_verifier(n).margin_bounds(model, x, y, threat) for n in ("ibp", "crown", "alpha-crown")}
    noise = (x[:, None] + 0.05 * (2 * torch.rand(4, 500, 1, 4, 4, dtype=torch.float64) - 1)).clamp(0, 1)
    with torch.no_grad():
        out = model(noise.reshape(-1, 1, 4, 4)).reshape(4, 500, -1)
    seen = (out.gather(2, y[:, None, None].expand(4, 500, 1)) - out).amin(1)
    finite = torch.isfinite(bounds["ibp"])
    for name, b in bounds.items():
        assert bool((b[finite] <= seen[finite] + 1e-9).all()), name
    assert bool((bounds["alpha-crown"][finite] >= bounds["crown"][finite] - 1e-12).all())
    assert float((bounds["crown"][finite] - bounds["ibp"][finite]).max()) > 0


def test_a_batch_norm_in_train_mode_is_refused_by_the_graph_and_bound_to_batch_statistics_for_training():
    model = _warm(TorchvisionBlock(), (1, 4, 4)).train()
    x = torch.rand(8, 1, 4, 4)
    net = parse_network(model, x)
    inset = InputSet.make(x, ThreatModel("linf", 0.01).norm, torch.full((8,), 0.01))
    with pytest.raises(ValueError, match=r"train mode: certify the model in eval mode \(model.eval\(\)\)"):
        layer_bounds(net, inset, "ibp")
    stats = copy.deepcopy(model.state_dict())
    logits = net.use_batch_statistics(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key  # running statistics untouched
    torch.testing.assert_close(logits, copy.deepcopy(model)(x))  # what the train-mode model computes
    bounds, _ = layer_bounds(net, inset, "ibp")
    assert bounds  # now bounded, with the clean batch's statistics


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        return self.fc2(h * torch.sigmoid(h))


@pytest.mark.parametrize("model,match", [
    (DataDependent(), r"cannot trace DataDependent with torch.fx \(.*control flow"),
    (Gated(), r"cannot bound node sigmoid \(call_function sigmoid\); supported layers: .*\+ of two tensors"),
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)), r"cannot bound layer 2 \(Tanh\(\)\); supported layers"),
], ids=["control-flow", "unsupported-function", "unsupported-module"])
def test_what_cannot_be_traced_or_bounded_is_one_clear_error_for_every_verifier(model, match):
    x = torch.rand(2, 1, 4, 4)
    for name in ("ibp", "crown", "alpha-crown"):
        with pytest.raises(ValueError, match=match) as info:
            create_verifier(name).margin_bounds(model, x, torch.tensor([0, 1]), ThreatModel("linf", 0.1))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_the_geometry_bounds_a_linear_function_over_the_ball_and_knows_its_diameter(norm):
    """``linear_min`` is what concretizes every linear bound: below ``a·x'`` at points of the ball
    ∩ [0, 1] (checked at the exact minimiser of the ball alone and at projected random points),
    and exact over the Linf box."""
    geometry = ThreatModel(norm, 0.5).geometry
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    eps = torch.full((4,), 0.3, dtype=torch.float64)
    lo, hi = (x - 0.3).clamp(0, 1), (x + 0.3).clamp(0, 1)
    low = geometry.linear_min(a, x, eps, lo, hi)
    for _ in range(50):
        pts = geometry.project(torch.rand(4, 6, generator=gen, dtype=torch.float64), x, 0.3)
        assert bool((low <= torch.einsum("bsd,bd->bs", a, pts) + 1e-12).all())
    ball = torch.einsum("bsd,bd->bs", a, x) - 0.3 * geometry.dual_norm(a)  # the minimum over the ball alone
    if geometry.ball_is_box:  # exact over the box, which the [0, 1] clip lifts above the ball's minimum
        corner = torch.where(a > 0, lo[:, None], hi[:, None])
        torch.testing.assert_close(low, (a * corner).sum(-1))
        assert bool((low >= ball - 1e-12).all())
    else:
        torch.testing.assert_close(low, ball)
    assert geometry.diameter(4) == {"linf": 1.0, "l2": 2.0, "l1": 4.0}[norm]
