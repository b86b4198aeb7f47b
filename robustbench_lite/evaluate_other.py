"""Evaluation for the attacks that are not per-point evasion: universal perturbations, sparse
(L0) attacks reported by success rate, and poisoning.

* Universal: fit ``delta`` on the attacker's points, then on held-out points report the
  **fooling rate** — the fraction whose prediction under ``clip(x + delta)`` differs from the
  *clean prediction* (Moosavi-Dezfooli et al. 2017; not 1 − accuracy) — and the accuracy under
  ``x + delta``, next to the same numbers for random noise of the same norm (the floor).
* Sparse: success rate of an L0 attack on the clean-correct points, with its query count.
* Poisoning: poison the training split, train a model on it with a chosen defense (from scratch,
  or only the last layer of a fixed feature extractor), report clean test accuracy and the
  attack success rate on the attack's :meth:`~robustbench_lite.attack.PoisoningAttack.success_points`
  (BadNets: triggered test points of true class != target classified as target).

Results are frozen dataclasses; :func:`to_frame` turns a list of them into a pandas DataFrame
(one row per result) for the leaderboard CSVs.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .attack import EvasionAttack, PoisoningAttack, UniversalAttack, apply_delta
from .data import Data, DataSplit
from .defense import Defense, accuracy, predict
from .model_cache import ModelCache, ModelSpec, train_or_load
from .ops import lp_norm, normalize_l2
from .threat import Norm

__all__ = [
    "PoisonResult",
    "SparseResult",
    "UniversalResult",
    "evaluate_poisoning",
    "evaluate_sparse",
    "evaluate_universal",
    "random_delta",
    "retrain_last_layer",
    "split_head",
    "to_frame",
]


# -------------------------------------------------------------------------------------------------
# universal perturbations
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniversalResult:
    """One universal attack on one model; rates are over the ``n_eval`` held-out points."""

    attack: str
    norm: str
    eps: float
    n_fit: int
    n_eval: int
    clean_acc: float
    fooling_rate: float  # prediction under x + delta != clean prediction
    acc_under_delta: float  # prediction under x + delta == true label
    noise_fooling_rate: float  # the same for random noise of the same norm (mean over draws)
    noise_acc: float
    noise_draws: int
    delta_norm: float
    seconds: float
    grad_evals: int
    forward_evals: int
    attack_params: str
    dataset: str = ""
    model: str = ""
    defense: str = ""


def random_delta(shape: Sequence[int], norm: Norm, eps: float, gen: torch.Generator) -> Tensor:
    """Random noise on the sphere of the norm ball: Linf ``±eps`` per coordinate (a random vertex),
    L2 a Gaussian direction scaled to ``eps``.  Shape ``[1, *shape]``."""
    if norm is Norm.LINF:
        return (torch.randint(0, 2, (1, *shape), generator=gen).float() * 2 - 1) * eps
    if norm is Norm.L2:
        return normalize_l2(torch.randn((1, *shape), generator=gen)) * eps
    raise ValueError(f"random_delta supports Linf and L2, not {norm}")


def _predict_with(model: nn.Module, x: Tensor, delta: Tensor, device: torch.device, batch_size: int = 1000) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(apply_delta(x[i : i + batch_size].to(device), delta.to(device))).argmax(1).cpu()
             for i in range(0, len(x), batch_size)]
        )


def evaluate_universal(
    model: nn.Module,
    attack: UniversalAttack,
    fit_split: DataSplit,
    eval_split: DataSplit,
    *,
    device: torch.device | str = "cpu",
    noise_draws: int = 5,
    noise_seed: int = 0,
) -> UniversalResult:
    """Fit ``attack`` on ``fit_split`` and measure it on the held-out ``eval_split``."""
    if not isinstance(attack, UniversalAttack):
        raise TypeError(f"evaluate_universal takes a UniversalAttack, got {type(attack).__name__}")
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
    device = torch.device(device)
    model = model.to(device).eval()
    out = attack.run(model, DataSplit(fit_split.x.to(device), fit_split.y.to(device)))
    clean = predict(model, eval_split.x, device)
    adv = _predict_with(model, eval_split.x, out.delta, device)
    gen = torch.Generator().manual_seed(noise_seed)
    noise_fool, noise_acc = [], []
    for _ in range(noise_draws):
        noisy = _predict_with(model, eval_split.x, random_delta(eval_split.x.shape[1:], attack.norm, attack.eps, gen), device)
        noise_fool.append(float((noisy != clean).float().mean()))
        noise_acc.append(float((noisy == eval_split.y).float().mean()))
    return UniversalResult(
        attack=attack.name, norm=attack.norm.value, eps=attack.eps, n_fit=len(fit_split), n_eval=len(eval_split),
        clean_acc=float((clean == eval_split.y).float().mean()),
        fooling_rate=float((adv != clean).float().mean()),
        acc_under_delta=float((adv == eval_split.y).float().mean()),
        noise_fooling_rate=sum(noise_fool) / noise_draws, noise_acc=sum(noise_acc) / noise_draws,
        noise_draws=noise_draws, delta_norm=float(lp_norm(out.delta, attack.norm)[0]),
        seconds=out.seconds, grad_evals=out.grad_evals, forward_evals=out.forward_evals,
        attack_params=json.dumps(attack.get_params(), sort_keys=True),
    )


# -------------------------------------------------------------------------------------------------
# sparse (L0) evasion attacks, reported by success rate
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseResult:
    attack: str
    pixels: int  # the L0 budget k
    n: int
    clean_acc: float
    attacked: int  # clean-correct points
    success_rate: float  # of the attacked points, the share misclassified after the attack
    robust_acc: float  # over all n points
    seconds: float
    forward_evals: int
    attack_params: str
    dataset: str = ""
    model: str = ""
    defense: str = ""


def evaluate_sparse(
    model: nn.Module, attack: EvasionAttack, split: DataSplit, *, device: torch.device | str = "cpu",
    batch_size: int = 100,
) -> SparseResult:
    """Run an L0 evasion attack on the clean-correct points of ``split``."""
    if attack.norm is not Norm.L0:
        raise ValueError(f"evaluate_sparse is for L0 attacks, got {attack.norm.value}")
    device = torch.device(device)
    model = model.to(device).eval()
    correct = predict(model, split.x, device) == split.y
    idx = correct.nonzero().flatten()
    broken, seconds, fwd = 0, 0.0, 0
    gen = torch.Generator(device=device).manual_seed(attack.seed)
    for i in range(0, len(idx), batch_size):
        sel = idx[i : i + batch_size]
        x, y = split.x[sel].to(device), split.y[sel].to(device)
        out = attack.run(model, x, y, gen)
        with torch.no_grad():
            broken += int((model(out.x_adv).argmax(1) != y).sum())
        seconds += out.seconds
        fwd += out.forward_evals
    return SparseResult(
        attack=attack.name, pixels=int(attack.eps), n=len(split), clean_acc=float(correct.float().mean()),
        attacked=len(idx), success_rate=broken / max(len(idx), 1), robust_acc=(len(idx) - broken) / len(split),
        seconds=seconds, forward_evals=fwd, attack_params=json.dumps(attack.get_params(), sort_keys=True),
    )


# -------------------------------------------------------------------------------------------------
# poisoning
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoisonResult:
    attack: str
    defense: str
    retrain: str  # "scratch" or "last-layer"
    n_train: int
    n_poison: int
    poison_rate: float
    clean_acc: float  # test accuracy of the model trained on the poisoned split
    attack_success_rate: float | None  # success_points classified as their goal class; None: no goal
    n_success_points: int
    poison_linf: float  # largest Linf / L2 distance of a poisoned image from its clean original
    poison_l2: float
    poison_seconds: float
    train_seconds: float
    attack_params: str
    dataset: str = ""
    model: str = ""
    model_key: str = ""  # cache key of the model trained on the poisoned split (scratch only)


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(features, head)`` of a model that is an ``nn.Sequential`` ending in an ``nn.Linear``."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise TypeError("feature extraction needs an nn.Sequential whose last layer is nn.Linear (e.g. small-cnn)")
    return model[:-1], model[-1]


def retrain_last_layer(
    model: nn.Module, data: Data, defense: Defense, *, device: torch.device | str = "cpu", feature_space: bool = False
) -> nn.Module:
    """A copy of ``model`` whose last layer is re-initialized and trained by ``defense`` on
    ``data.train`` with every other parameter frozen (the fixed-feature-extractor setting).

    ``feature_space=True`` computes the frozen features once and trains the head on them (much
    faster).  It is exact only for defenses whose loss looks at the model's outputs on the clean
    training inputs (``standard``); a defense that perturbs inputs (PGD-AT) would perturb features
    instead, so keep the default for those.
    """
    fresh = copy.deepcopy(model).to(device)
    features, head = split_head(fresh)
    for p in fresh.parameters():
        p.requires_grad_(False)
    torch.manual_seed(defense.seed)
    head.reset_parameters()
    for p in head.parameters():
        p.requires_grad_(True)
    if feature_space:
        with torch.no_grad():
            feats = torch.cat([features(data.train.x[i : i + 500].to(device)).flatten(1).cpu()
                               for i in range(0, len(data.train), 500)])
        fdata = Data(data.name, DataSplit(feats[:, :, None, None], data.train.y), data.test, data.num_classes)
        defense.fit(nn.Sequential(nn.Flatten(), head), fdata, device=device, progress=False)
    else:
        defense.fit(fresh, data, device=device, progress=False)
    for p in fresh.parameters():
        p.requires_grad_(True)
    return fresh.eval()


def evaluate_poisoning(
    attack: PoisoningAttack,
    data: Data,
    defense: Defense,
    *,
    spec: ModelSpec | None = None,
    model: nn.Module | None = None,
    retrain: str = "scratch",
    cache: ModelCache | None = None,
    device: torch.device | str = "cpu",
    feature_space: bool = False,
) -> PoisonResult:
    """Poison ``data.train``, train on it with ``defense`` and measure clean accuracy and attack
    success.  ``retrain="scratch"`` trains ``spec`` from its seeded initialization (cached by the
    poisoned data's fingerprint in ``cache``); ``"last-layer"`` retrains only the head of
    ``model`` (which is also the attack's feature extractor when it needs one); ``feature_space``
    is passed to :func:`retrain_last_layer`."""
    if not isinstance(attack, PoisoningAttack):
        raise TypeError(f"evaluate_poisoning takes a PoisoningAttack, got {type(attack).__name__}")
    if retrain not in ("scratch", "last-layer"):
        raise ValueError(f"retrain must be 'scratch' or 'last-layer', got {retrain!r}")
    if retrain == "scratch" and spec is None:
        raise ValueError("retrain='scratch' needs spec=ModelSpec(...)")
    if (retrain == "last-layer" or attack.needs_model) and model is None:
        raise ValueError("this evaluation needs model= (the fixed feature extractor / the attacker's model)")
    device = torch.device(device)
    t0 = time.perf_counter()
    poisoned = attack.poison(data.train, model=model, test=data.test)
    poison_seconds = time.perf_counter() - t0
    pdata = Data(name=data.name, train=poisoned, test=data.test, num_classes=data.num_classes, val=data.val)
    t0 = time.perf_counter()
    key = ""
    if retrain == "scratch":
        fit = train_or_load(spec, defense, pdata, cache or ModelCache(None), device=device, progress=False)
        trained, key = fit.model, fit.key
    else:
        trained = retrain_last_layer(model, pdata, defense, device=device, feature_space=feature_space)
    train_seconds = time.perf_counter() - t0
    if retrain == "scratch" and fit.from_cache and fit.sidecar.get("train_seconds") is not None:
        train_seconds = float(fit.sidecar["train_seconds"])  # a cached model: report its original training time
    goal = attack.success_points(data.test)
    asr = None
    if goal is not None and len(goal) > 0:
        asr = float((predict(trained, goal.x, device) == goal.y).float().mean())
    n_poison = attack.n_poison(len(data.train))
    moved = poisoned.x - data.train.x
    return PoisonResult(
        attack=attack.name, defense=defense.name, retrain=retrain, n_train=len(data.train), n_poison=n_poison,
        poison_rate=n_poison / len(data.train), clean_acc=accuracy(trained, data.test, device),
        attack_success_rate=asr, n_success_points=0 if goal is None else len(goal),
        poison_linf=float(lp_norm(moved, Norm.LINF).max()), poison_l2=float(lp_norm(moved, Norm.L2).max()),
        poison_seconds=poison_seconds, train_seconds=train_seconds,
        attack_params=json.dumps(attack.get_params(), sort_keys=True),
        dataset=data.name, model=spec.name if spec is not None else type(model).__name__, model_key=key,
    )


# -------------------------------------------------------------------------------------------------
# tables
# -------------------------------------------------------------------------------------------------


# leaderboard order per kind: the column that ranks attacks (strongest first)
_RANK = {UniversalResult: "fooling_rate", SparseResult: "success_rate", PoisonResult: "attack_success_rate"}
LEADERBOARD_NAMES = {UniversalResult: "universal", SparseResult: "sparse", PoisonResult: "poisoning"}


def to_frame(results: Sequence[UniversalResult | SparseResult | PoisonResult], *, ranked: bool = False):
    """A pandas DataFrame with one row per result (columns = the dataclass fields, in order).

    ``ranked=True`` sorts for a leaderboard CSV (``leaderboards/<dataset>_<kind>.csv``, kind from
    :data:`LEADERBOARD_NAMES`): strongest attack first by fooling rate / success rate / attack
    success rate, ties by name.  Results must all be of one kind.
    """
    import pandas as pd

    kinds = {type(r) for r in results}
    if len(kinds) != 1:
        raise ValueError(f"to_frame takes a non-empty list of results of one kind, got {sorted(k.__name__ for k in kinds)}")
    kind = kinds.pop()
    frame = pd.DataFrame([asdict(r) for r in results])
    if ranked:
        frame = frame.sort_values([_RANK[kind], "attack"], ascending=[False, True], na_position="last", kind="stable")
        frame = frame.reset_index(drop=True)
    return frame
