"""Contract tests every registered evasion attack must pass (new plugins are tested automatically)."""

from __future__ import annotations

import pytest
import torch

from robustbench_lite import EvasionAttack, ops
from robustbench_lite.core.registry import ATTACKS, create_attack
from robustbench_lite.core.threat import Norm


def _evasion_cases():
    cases = []
    for name in ATTACKS.list():
        cls = ATTACKS.get(name)
        if not issubclass(cls, EvasionAttack):
            continue
        for norm in cls.norms:
            cases.append(pytest.param(name, norm, id=f"{name}-{norm.value}"))
    return cases


CASES = _evasion_cases()
NAMES = sorted({c.values[0] for c in CASES})


def _eps(norm: Norm) -> float:
    """The geometry's example budget (whole pixels for L0)."""
    return norm.geometry.example_eps * (3 if norm is Norm.L0 else 1)


def _fast(name: str, norm: Norm, **extra):
    """The attack with a small budget where it has one, so contract tests stay fast."""
    cls = ATTACKS.get(name)
    fields = {f for f in getattr(cls, "__dataclass_fields__", {})}
    cfg = {k: v for k, v in {"steps": 5, "restarts": 1, "n_iter": 5, "queries": 50, "generations": 3,
                             "population": 20, "search_steps": 2, "n_targets": 2}.items() if k in fields}
    cfg.update(extra)
    return create_attack(name, norm=norm, eps=_eps(norm), **cfg)


@pytest.fixture(scope="module")
def batch(digits):
    return digits.test.x[:24], digits.test.y[:24]


@pytest.mark.parametrize("name,norm", CASES)
def test_output_finite_in_box_and_inside_ball(name, norm, digits_model, batch):
    x, y = batch
    attack = _fast(name, norm)
    x_adv = attack.perturb(digits_model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if not attack.min_norm:
        dist = norm.geometry.distance(x_adv - x)
        assert (dist <= _eps(norm) * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("name,norm", CASES)
def test_same_seed_same_output(name, norm, digits_model, batch):
    x, y = batch
    a = _fast(name, norm, seed=3).perturb(digits_model, x, y)
    b = _fast(name, norm, seed=3).perturb(digits_model, x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,norm", CASES)
def test_attack_does_not_change_model_mode(name, norm, digits_model, batch):
    x, y = batch
    digits_model.train()
    try:
        _fast(name, norm).perturb(digits_model, x, y)
        assert digits_model.training
    finally:
        digits_model.eval()


@pytest.mark.parametrize("name,norm", CASES)
def test_attack_lowers_accuracy(name, norm, digits_model, batch):
    x, y = batch
    clean = (digits_model(x).argmax(1) == y).float().mean()
    adv = (digits_model(_fast(name, norm).perturb(digits_model, x, y)).argmax(1) == y).float().mean()
    assert adv <= clean


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("eps", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_eps_is_a_value_error(name, eps):
    with pytest.raises(ValueError, match="eps"):
        create_attack(name, eps=eps, norm=ATTACKS.get(name).norms[0])


@pytest.mark.parametrize("name", NAMES)
def test_eps_of_wrong_type_is_a_type_error(name):
    with pytest.raises(TypeError, match="eps"):
        create_attack(name, eps="0.1", norm=ATTACKS.get(name).norms[0])


@pytest.mark.parametrize("name", NAMES)
def test_bad_norm_names_the_allowed_ones(name):
    with pytest.raises(ValueError, match="norm"):
        create_attack(name, norm="l7")
    unsupported = [n for n in Norm if n not in ATTACKS.get(name).norms]
    for n in unsupported:
        with pytest.raises(ValueError, match="supports norm"):
            create_attack(name, norm=n, eps=_eps(n))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_get_errors_that_name_the_fix(name, digits_model, batch):
    x, y = batch
    attack = _fast(name, ATTACKS.get(name).norms[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack.perturb(digits_model, x * 255, y)
    with pytest.raises(ValueError, match="NaN"):
        attack.perturb(digits_model, torch.where(x > 0.5, float("nan"), x), y)
    with pytest.raises(ValueError, match="NCHW"):
        attack.perturb(digits_model, x[:, 0], y)
    with pytest.raises(TypeError, match="float"):
        attack.perturb(digits_model, (x * 255).to(torch.uint8), y)
    with pytest.raises(TypeError, match="integer"):
        attack.perturb(digits_model, x, y.float())
    with pytest.raises(ValueError, match="shape"):
        attack.perturb(digits_model, x, y[:-1])
    with pytest.raises(TypeError, match="nn.Module"):
        attack.perturb(lambda t: t, x, y)
    with pytest.raises(TypeError, match="Generator"):
        attack.perturb(digits_model, x, y, gen=0)


@pytest.mark.parametrize("name", NAMES)
def test_settings_are_frozen_and_visible(name):
    attack = create_attack(name, norm=ATTACKS.get(name).norms[0], eps=_eps(ATTACKS.get(name).norms[0]))
    assert isinstance(attack, EvasionAttack)
    params = attack.get_params()
    assert params["eps"] == attack.eps and params["norm"] == attack.norm.value
    with pytest.raises(AttributeError):
        attack.eps = 0.5  # type: ignore[misc]


def test_fgsm_moves_every_pixel_by_eps_or_to_a_bound(fmnist_model, fmnist):
    x, y = fmnist.test.x[:64], fmnist.test.y[:64]
    eps = 0.1
    x_adv = create_attack("fgsm", eps=eps).perturb(fmnist_model, x, y)
    _, _, grad = EvasionAttack.loss_grad(fmnist_model, x, y, ops.ce)
    moved = (x_adv - x).abs()
    at_bound = (x_adv == 0) | (x_adv == 1)
    live = grad != 0
    assert live.float().mean() > 0.5  # the check below covers most pixels
    assert torch.all(torch.isclose(moved, torch.tensor(eps), atol=1e-6) | at_bound | ~live)
    # where the gradient is zero, FGSM's sign step leaves the pixel alone
    assert torch.all(moved[~live] == 0)
    # and it moves in the direction of the gradient's sign
    step = (x_adv - x)[live & ~at_bound]
    assert torch.all(torch.sign(step) == torch.sign(grad[live & ~at_bound]))


def test_setting_checks_name_the_bound():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        create_attack("pgd", steps=0)
    with pytest.raises(TypeError, match="steps must be an int"):
        create_attack("pgd", steps=2.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        create_attack("pgd", loss="hinge")
