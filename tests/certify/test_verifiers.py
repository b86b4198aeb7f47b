"""Verifiers (IBP, CROWN, α-CROWN): soundness against exact solvers (MILP for Linf, activation
region enumeration with convex programs for L2), agreement with ART's interval bounds, the
tightness order IBP ≤ CROWN ≤ α-CROWN, supported layers and model modes, attacks never break a
certified point, and a contract every registered verifier passes."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from certify_exact import ResidualCNN, ResidualMLP, milp_min_margin, trained
from certify_exact import margins as _margins
from certify_exact import mlp as _mlp
from torch import nn

from robustbench_lite import ModelSpec, Norm, ThreatModel, create_attack, create_defense, train_or_load
from robustbench_lite.certify import create_verifier, list_verifiers, parse_network
from robustbench_lite.certify._bounds import InputSet, logit_interval

VERIFIERS = [n for n in list_verifiers() if n != "stable-relu"]  # the bound propagators (any network)
MAIN = [("ibp", {}), ("crown", {}), ("crown", {"intermediate": "ibp"}), ("alpha-crown", {})]


def _tiny_cnn(seed: int) -> nn.Sequential:
    """9 inputs (1x3x3): conv 2x2 -> ReLU -> 2x2 max-pool -> 2 features -> 4 ReLUs -> 3 logits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 4), nn.ReLU(),
                         nn.Linear(4, 3)).double()


def _tiny_cnn_affine_layers(seed: int) -> nn.Sequential:
    """9 inputs through Normalize, conv, eval-mode BatchNorm, ReLU, 2x2 average pooling, 4 ReLUs."""
    from robustbench_lite.core.models import Normalize

    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(2)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.2, 0.2)
    return nn.Sequential(Normalize([0.4], [0.3]), nn.Conv2d(1, 2, 2), bn, nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()


def _trained_mlp(seed: int) -> nn.Sequential:
    """A 4-input network trained on three Gaussian blobs (a trained instance for the MILP)."""
    return trained(_mlp(seed, 4, (8, 8)), (1, 2, 2), seed)


def _build_linf_cases():
    return [("mlp-2-5-5", _mlp(1, 2, (5, 5)), (1, 1, 2)), ("mlp-6-6-6-6", _mlp(2, 6, (6, 6, 6)), (1, 2, 3)),
            ("trained-4-8-8", _trained_mlp(4), (1, 2, 2)),
            ("cnn-maxpool-9", _tiny_cnn(5), (1, 3, 3)), ("cnn-norm-bn-avgpool-9", _tiny_cnn_affine_layers(6), (1, 3, 3)),
            ("residual-mlp-24", ResidualMLP(7, 4, 8).double().eval(), (1, 2, 2)),
            ("trained-residual-mlp-24", trained(ResidualMLP(8, 4, 8), (1, 2, 2), 8), (1, 2, 2)),
            ("residual-cnn-48", ResidualCNN(9).double().eval(), (1, 4, 4)),
            ("trained-residual-cnn-48", trained(ResidualCNN(10), (1, 4, 4), 10), (1, 4, 4))]


LINF_CASES = _build_linf_cases()


@pytest.mark.parametrize("name,model,shape", LINF_CASES, ids=[c[0] for c in LINF_CASES])
def test_every_verifier_is_below_the_exact_linf_minimum_from_a_milp(name, model, shape):
    gen = torch.Generator().manual_seed(7)
    checked = 0
    for eps in (0.05, 0.15) if "cnn-48" in name else (0.1, 0.3):  # the MILP of the 48-ReLU CNN is slow at 0.3
        x = torch.rand(2, *shape, generator=gen, dtype=torch.float64)
        y = model(x).argmax(1)
        bounds = {f"{n}{kw}": create_verifier(n, **kw).margin_bounds(model, x, y, ThreatModel("linf", eps)) for n, kw in MAIN}
        for b in range(x.shape[0]):
            for c in range(bounds["ibp{}"].shape[1]):
                if c == int(y[b]):
                    continue
                value, arg = milp_min_margin(model, x[b], int(y[b]), c, eps)
                realized = float(_margins(model, torch.tensor(arg).reshape(1, *shape), int(y[b]))[0, c])
                assert realized == pytest.approx(value, abs=1e-5)  # the MILP encodes the network
                sampled = (x[b] + eps * (2 * torch.rand(2000, *shape, generator=gen, dtype=torch.float64) - 1)).clamp(0, 1)
                assert value <= float(_margins(model, sampled, int(y[b]))[:, c].min()) + 1e-7  # and finds the minimum
                for key, bound in bounds.items():
                    assert float(bound[b, c]) <= realized + 1e-7, (name, key, eps, b, c)
                checked += 1
    assert checked >= 8
    # not vacuous: at a radius where every ReLU is stable CROWN is exact
    x = torch.rand(1, *shape, generator=gen, dtype=torch.float64)
    y = model(x).argmax(1)
    crown = create_verifier("crown").margin_bounds(model, x, y, ThreatModel("linf", 1e-4))
    c = (int(y[0]) + 1) % crown.shape[1]
    assert float(crown[0, c]) == pytest.approx(milp_min_margin(model, x[0], int(y[0]), c, 1e-4)[0], abs=1e-8)


def test_every_verifier_is_below_the_exact_l1_minimum_from_a_milp():
    gen = torch.Generator().manual_seed(5)
    for name, model, shape in LINF_CASES[1:3]:
        x = torch.rand(2, *shape, generator=gen, dtype=torch.float64)
        y = model(x).argmax(1)
        for eps in (0.2, 0.6):
            threat = ThreatModel(Norm.L1, eps)
            bounds = [create_verifier(n, **kw).margin_bounds(model, x, y, threat) for n, kw in MAIN]
            for b in range(2):
                for c in range(bounds[0].shape[1]):
                    if c != int(y[b]):
                        value, arg = milp_min_margin(model, x[b], int(y[b]), c, eps, norm="l1")
                        assert float(np.abs(arg - x[b].flatten().numpy()).sum()) <= eps + 1e-6
                        realized = float(_margins(model, torch.tensor(arg).reshape(1, *shape), int(y[b]))[0, c])
                        assert all(float(bd[b, c]) <= realized + 1e-7 for bd in bounds), (name, eps, b, c)


def _l2_exact_min_margin(model: nn.Sequential, x: torch.Tensor, y: int, c: int, eps: float) -> tuple[float, np.ndarray]:
    """Exact ``min f_y − f_c`` over the L2 ball ∩ [0, 1] for a ReLU MLP: enumerate the
    activation patterns of the neurons an interval bound (computed here, independently) leaves
    unstable; on each pattern's region the margin is affine, a convex program (cvxpy)."""
    cp = pytest.importorskip("cvxpy")
    lins = [m for m in model if isinstance(m, nn.Linear)]
    ws = [m.weight.detach().numpy() for m in lins]
    bs = [m.bias.detach().numpy() for m in lins]
    x0 = x.flatten().numpy()
    lo, hi = np.clip(x0 - eps, 0, 1), np.clip(x0 + eps, 0, 1)
    signs = []
    for w, b in zip(ws[:-1], bs[:-1], strict=True):
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        zl, zh = w @ mid + b - np.abs(w) @ rad, w @ mid + b + np.abs(w) @ rad
        signs.append(np.where(zl >= 0, 1, np.where(zh <= 0, 0, -1)))  # -1: unstable
        lo, hi = np.maximum(zl, 0), np.maximum(zh, 0)
    free = [(k, n) for k, s in enumerate(signs) for n in np.nonzero(s < 0)[0]]
    assert len(free) <= 10, "keep the instance small enough to enumerate"
    best, arg = np.inf, None
    for pattern in itertools.product((0, 1), repeat=len(free)):
        on = [s.copy() for s in signs]
        for (k, n), p in zip(free, pattern, strict=True):
            on[k][n] = p
        xv = cp.Variable(x0.size)
        cons, act = [cp.norm(xv - x0, 2) <= eps, xv >= 0, xv <= 1], xv
        for k, (w, b) in enumerate(zip(ws[:-1], bs[:-1], strict=True)):
            z = w @ act + b
            for n, p in enumerate(on[k]):
                cons.append(z[n] >= 0 if p == 1 else z[n] <= 0)
            act = cp.multiply(on[k].astype(float), z)
        out = ws[-1] @ act + bs[-1]
        prob = cp.Problem(cp.Minimize(out[y] - out[c]), cons)
        prob.solve(solver="CLARABEL")
        if prob.status == "optimal" and prob.value < best:
            best, arg = prob.value, xv.value
    return float(best), arg


def test_every_verifier_is_below_the_exact_l2_minimum_from_region_enumeration():
    gen = torch.Generator().manual_seed(11)
    checked = 0
    for seed, d, widths, eps in [(21, 3, (3, 3), 0.3), (23, 4, (4, 2), 0.25)]:
        model = _mlp(seed, d, widths)
        x = torch.rand(2, 1, 1, d, generator=gen, dtype=torch.float64)
        y = model(x).argmax(1)
        bounds = {f"{n}{kw}": create_verifier(n, **kw).margin_bounds(model, x, y, ThreatModel("l2", eps)) for n, kw in MAIN}
        for b in range(2):
            for c in range(3):
                if c == int(y[b]):
                    continue
                value, arg = _l2_exact_min_margin(model, x[b], int(y[b]), c, eps)
                realized = float(_margins(model, torch.tensor(arg).reshape(1, 1, 1, d), int(y[b]))[0, c])
                assert realized == pytest.approx(value, abs=1e-5)
                step = torch.randn(4000, d, generator=gen, dtype=torch.float64)
                step = step / step.norm(dim=1, keepdim=True) * eps * torch.rand(4000, 1, generator=gen, dtype=torch.float64)
                sampled = (x[b].flatten() + step).clamp(0, 1)
                sampled = sampled[(sampled - x[b].flatten()).norm(dim=1) <= eps]
                assert value <= float(_margins(model, sampled.reshape(-1, 1, 1, d), int(y[b]))[:, c].min()) + 1e-6
                for key, bound in bounds.items():
                    assert float(bound[b, c]) <= realized + 1e-6, (seed, key, b, c)
                checked += 1
    assert checked == 8


# --------------------------------------------------------------------------------------------
# agreement with ART, tightness order
# --------------------------------------------------------------------------------------------


def test_ibp_logit_intervals_equal_arts_interval_bound_propagation():
    pytest.importorskip("art")
    import warnings

    from art.estimators.certification.interval import PyTorchIBPClassifier

    class ArtNet(nn.Module):  # ART needs the layers as direct children and infers the flatten itself
        def __init__(self, conv, fc1, fc2):
            super().__init__()
            self.conv, self.r1, self.fc1, self.r2, self.fc2 = conv, nn.ReLU(), fc1, nn.ReLU(), fc2

        def forward(self, x):
            return self.fc2(self.r2(self.fc1(self.r1(self.conv(x)).flatten(1))))

    torch.manual_seed(0)
    conv, fc1, fc2 = nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Linear(64, 16), nn.Linear(16, 5)
    ours = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc1, nn.ReLU(), fc2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = PyTorchIBPClassifier(model=ArtNet(conv, fc1, fc2), loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                                   nb_classes=5, clip_values=(0.0, 1.0), device_type="cpu")
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for eps in (0.01, 0.05, 0.2):
        ref = art.predict_intervals(x.numpy(), bounds=eps, limits=[0.0, 1.0])
        with torch.no_grad():
            net = parse_network(ours, x[:1])
            lo, hi = logit_interval(net, InputSet.make(x.double(), Norm.LINF, torch.full((16,), eps, dtype=torch.float64)))
        np.testing.assert_allclose(lo.numpy(), ref[:, 0], atol=1e-5)
        np.testing.assert_allclose(hi.numpy(), ref[:, 1], atol=1e-5)
        assert float((hi - lo).min()) > 0


def test_crown_is_tighter_than_ibp_and_alpha_crown_than_crown_on_a_natural_network(digits, model_cache):
    defense = create_defense("standard", epochs=10, batch_size=64, lr=3e-3)
    model = train_or_load(ModelSpec("mlp", {"hidden": 64}), defense, digits, model_cache, progress=False).model
    x, y = digits.test.x[:40], digits.test.y[:40]
    threat = ThreatModel("linf", 0.01)
    ibp, crown, alpha = (create_verifier(n).margin_bounds(model, x, y, threat) for n in ("ibp", "crown", "alpha-crown"))
    pairs = torch.isfinite(ibp)
    assert float((crown[pairs] >= ibp[pairs]).float().mean()) >= 0.95
    assert bool((alpha[pairs] >= crown[pairs]).all())
    assert float((alpha[pairs] - crown[pairs]).max()) > 0  # the optimisation moves the slopes
    full = create_verifier("alpha-crown", skip_certified=False).margin_bounds(model, x, y, threat)
    # points CROWN certifies get optimised too (float64 rounding aside: the two runs sum in other orders)
    assert bool((full[pairs] >= alpha[pairs] - 1e-9).all())
    assert bool((((full > 0).all(1)) == ((alpha > 0).all(1))).all())  # without changing what is certified


# --------------------------------------------------------------------------------------------
# layers and modes
# --------------------------------------------------------------------------------------------


def test_an_unsupported_layer_is_refused_naming_it_and_what_is_supported():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 4)
    for layer in (nn.Tanh(), nn.LayerNorm(8)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), layer, nn.Linear(8, 3))
        pred = model(x).argmax(1)
        # refused whether some points are classified correctly or none (none: no bounds to compute)
        for y in (pred, (pred + 1) % 3):
            for name in VERIFIERS:
                for call in ("certify", "verify", "margin_bounds"):
                    with pytest.raises(ValueError, match=type(layer).__name__) as info:
                        getattr(create_verifier(name), call)(model, x, y, ThreatModel("linf", 0.1))
                    assert "Linear, Conv2d" in str(info.value) and "small-cnn" in str(info.value)


def test_nested_sequentials_pooling_and_normalization_are_parsed():
    from robustbench_lite.core.models import Normalize, create_model

    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU()),
                          nn.AvgPool2d(2), nn.Dropout(0.5), nn.Identity(), nn.Flatten(), nn.Linear(12, 4)).eval()
    x = torch.rand(5, 1, 8, 8)
    net = parse_network(model, x)
    assert [type(op).__name__ for op in net.ops] == ["ChannelAffineOp", "ConvOp", "ReLUOp", "ConvOp", "ReshapeOp", "LinearOp"]
    torch.testing.assert_close(net.forward(x), model(x))
    small = create_model("small-cnn", (1, 28, 28), 10).eval()
    xs = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(parse_network(small, xs).forward(xs), small(xs))


def test_a_train_mode_batchnorm_model_is_certified_in_eval_mode_and_its_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    for _ in range(5):
        model(torch.rand(16, 1, 8, 8))  # running statistics away from their start
    model.train()
    stats = copy.deepcopy(model.state_dict())
    x = torch.rand(6, 1, 8, 8)
    y = model.eval()(x).argmax(1)
    model.train()
    reference = copy.deepcopy(model).eval()
    for name in VERIFIERS:
        got = create_verifier(name).margin_bounds(model, x, y, ThreatModel("linf", 0.01))
        torch.testing.assert_close(got, create_verifier(name).margin_bounds(reference, x, y, ThreatModel("linf", 0.01)))
        assert model.training and model[1].training
        for key, value in model.state_dict().items():
            assert torch.equal(value, stats[key]), key  # nothing updated the running statistics
        with torch.no_grad():
            logits = reference(x).double()
        finite = torch.isfinite(got)
        assert bool((got <= logits.gather(1, y[:, None]) - logits + 1e-5)[finite].all())  # sound for the eval-mode function


def test_bounds_of_the_zoo_small_cnn_with_two_max_pools_hold_at_adversarial_points(digits_model, digits):
    x, y = digits.test.x[:6], digits.test.y[:6]
    threat = ThreatModel("linf", 0.02)
    x_adv = create_attack("pgd", eps=0.02, steps=20, loss="cw", seed=0).perturb(digits_model, x, y)
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.02 * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
    with torch.no_grad():
        seen = [digits_model(p).double() for p in (x, x_adv, noisy)]
    worst = torch.stack([s.gather(1, y[:, None]) - s for s in seen]).amin(0)
    for name, kw in MAIN:
        bound = create_verifier(name, **kw).margin_bounds(digits_model, x, y, threat)
        finite = torch.isfinite(bound)
        assert bool((bound[finite] <= worst[finite] + 1e-5).all()), name
    ibp = create_verifier("ibp").margin_bounds(digits_model, x, y, threat)
    crown = create_verifier("crown").margin_bounds(digits_model, x, y, threat)
    finite = torch.isfinite(ibp)
    assert float((crown[finite] >= ibp[finite]).float().mean()) >= 0.95


# --------------------------------------------------------------------------------------------
# attacks never break a certified point
# --------------------------------------------------------------------------------------------


def test_no_point_certified_by_any_verifier_is_broken_by_attacks(certified_model, digits):
    model, eps = certified_model, 0.05
    x, y = digits.test.x[:120], digits.test.y[:120]
    threat = ThreatModel("linf", eps)
    incomplete = [n for n in VERIFIERS if n != "bab"]  # bab on this model: tests/certify/test_bab.py
    certified = {name: create_verifier(name).certify(model, x, y, threat) for name in incomplete}
    broken = torch.zeros(len(y), dtype=torch.bool)
    for name, kw in [("pgd", {"steps": 30}), ("apgd-ce", {"steps": 30}), ("apgd-t-dlr", {"steps": 30, "n_targets": 3})]:
        x_adv = create_attack(name, eps=eps, seed=0, **kw).perturb(model, x, y)
        with torch.no_grad():
            broken |= model(x_adv).argmax(1) != y
    for name, cert in certified.items():
        assert int((cert & broken).sum()) == 0, name
        assert float(cert.float().mean()) >= 0.05, name  # the check is not vacuous
    assert float(certified["crown"].float().mean()) >= 0.3
    assert int((~broken).sum()) < len(y) and int(broken.sum()) > 0  # the attacks bite


# --------------------------------------------------------------------------------------------
# contract: every registered verifier
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contract_case():
    model = _mlp(5, 16, (12, 12), k=4).float()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(12, 1, 4, 4, generator=gen)
    y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 4  # two misclassified points
    return model, x, y


@pytest.mark.parametrize("name", VERIFIERS)
@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("l2", 0.1)])
def test_contract_margin_bounds_are_sound_shaped_and_chunk_independent(name, norm, eps, contract_case):
    model, x, y = contract_case
    threat = ThreatModel(norm, eps)
    if threat.norm not in create_verifier(name).norms:
        pytest.skip(f"{name} bounds {[n.value for n in create_verifier(name).norms]} balls only")
    bounds = create_verifier(name).margin_bounds(model, x, y, threat)
    assert bounds.shape == (12, 4) and bounds.dtype == torch.float64
    assert bool(torch.isinf(bounds.gather(1, y[:, None])).all()) and int(torch.isfinite(bounds).sum()) == 36
    with torch.no_grad():
        logits = model(x).double()
    finite = torch.isfinite(bounds)
    assert bool((bounds <= logits.gather(1, y[:, None]) - logits + 1e-5)[finite].all())  # x itself is in the ball
    torch.testing.assert_close(create_verifier(name, batch_size=5).margin_bounds(model, x, y, threat), bounds)
    cert = create_verifier(name).certify(model, x, y, threat)
    assert cert.dtype == torch.bool and not bool(cert[:2].any())
    assert bool((cert == ((bounds > 0).all(1) & (model(x).argmax(1) == y))).all())


@pytest.mark.parametrize("name", VERIFIERS)
def test_contract_radius_is_certified_and_zero_for_misclassified_points(name, contract_case):
    model, x, y = contract_case
    verifier = create_verifier(name)
    r = verifier.radius(model, x, y, "linf", hi=0.5, tol=1e-3)
    assert r.shape == (12,) and bool((r[:2] == 0).all()) and bool((r[2:] > 0).all())
    for b in range(2, 12):
        assert bool(verifier.certify(model, x[b : b + 1], y[b : b + 1], ThreatModel("linf", float(r[b])))[0])
    if name == "ibp":  # interval bounds grow with the set, so bisection finds the largest radius to tol
        beyond = [verifier.certify(model, x[b : b + 1], y[b : b + 1], ThreatModel("linf", float(r[b]) + 2e-3))[0]
                  for b in range(2, 12)]
        assert not any(bool(v) for v in beyond)


@pytest.mark.parametrize("name", VERIFIERS)
def test_contract_bad_input_is_refused_and_the_mode_restored(name, contract_case):
    model, x, y = contract_case
    verifier = create_verifier(name)
    linf = ThreatModel("linf", 0.1)
    with pytest.raises(ValueError, match="l0"):
        verifier.certify(model, x, y, ThreatModel("l0", 1))
    with pytest.raises(TypeError, match="ThreatModel"):
        verifier.certify(model, x, y, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        verifier.certify(model, x * 3, y, linf)
    with pytest.raises(ValueError, match="labels must be < 4"):
        verifier.certify(model, x, torch.full_like(y, 7), linf)
    with pytest.raises(ValueError, match="batch_size"):
        create_verifier(name, batch_size=0)
    assert verifier.get_params()["batch_size"] == 200
    model.train()
    verifier.certify(model, x, y, linf)
    assert all(m.training for m in model.modules())
    model.eval()


def test_crown_certifies_every_point_the_stable_relu_certificate_does_on_the_convex_architecture():
    """On a bias-free one-hidden-relu network the sign-stability certificate is exact where it
    applies, and CROWN is exact on stable neurons and also uses the [0, 1] box: it certifies a
    superset, with margin bounds at least as high; the convex rows can move onto CROWN."""
    from robustbench_lite import create_model

    torch.manual_seed(3)
    model = create_model("one-hidden-relu", (1, 4, 4), 3, hidden=6).double()
    x = torch.rand(60, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = model(x).argmax(1)
    for eps in (0.002, 0.01):
        threat = ThreatModel("linf", eps)
        stable = create_verifier("stable-relu").margin_bounds(model, x, y, threat)
        crown = create_verifier("crown").margin_bounds(model, x, y, threat)
        held = torch.isfinite(stable) & (stable != float("inf"))
        assert bool(held.any())  # not vacuous
        assert bool((crown[held] >= stable[held] - 1e-9).all())
        assert bool((create_verifier("stable-relu").certify(model, x, y, threat)
                     <= create_verifier("crown").certify(model, x, y, threat)).all())
