"""Poisoning: poison the training split, train a model on it with a chosen defense (from scratch,
or only the last layer of a fixed feature extractor), and report clean test accuracy and the attack
success rate on the attack's :meth:`~robustbench_lite.core.attack.PoisoningAttack.success_points`
(BadNets: triggered test points of true class != target classified as target).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.attack import PoisoningAttack
from ..core.data import Data, DataSplit
from ..core.device import DevicePolicy, as_policy
from ..core.models import ModelSpec, accuracy, predict, split_head
from ..core.threat import Norm
from ..training.cache import ModelCache, train_or_load
from ..training.defense import Defense


@dataclass(frozen=True)
class PoisonResult:
    """One poisoning attack against one training recipe."""

    poison_rate: float
    n_poison: int
    n_train: int
    clean_acc: float  # test accuracy of the model trained on the poisoned split
    attack_success_rate: float | None  # success_points classified as their goal class; None: no goal
    n_success_points: int
    retrain: str  # "scratch" or "last-layer"
    train_seconds: float
    poison_seconds: float
    poison_linf: float  # largest Linf / L2 distance of a poisoned image from its clean original
    poison_l2: float
    model_key: str  # cache key of the model trained on the poisoned split ("" for last-layer retraining)


def retrain_last_layer(
    model: nn.Module, data: Data, defense: Defense, *, policy: DevicePolicy | torch.device | str = "cpu",
    feature_space: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose last layer is re-initialized and trained by ``defense`` on
    ``data.train`` with every other parameter frozen (the fixed-feature-extractor setting).

    ``feature_space=True`` computes the frozen features once and trains the head on them (much
    faster).  It is exact only for defenses whose loss looks at the model's outputs on the clean
    training inputs (``standard``); a defense that perturbs inputs (PGD-AT) would perturb features
    instead, so keep the default for those.
    """
    policy = as_policy(policy)
    fresh = policy.model_to(copy.deepcopy(model), training=True)
    features, head = split_head(fresh)
    for p in fresh.parameters():
        p.requires_grad_(False)
    torch.manual_seed(defense.seed)
    head.reset_parameters()
    for p in head.parameters():
        p.requires_grad_(True)
    if feature_space:
        with torch.no_grad():
            feats = torch.cat([features(policy.batch_to(data.train.x[i : i + 500])).flatten(1).cpu()
                               for i in range(0, len(data.train), 500)])
        fdata = Data(data.name, DataSplit(feats[:, :, None, None], data.train.y), data.test, data.num_classes)
        defense.fit(nn.Sequential(nn.Flatten(), head), fdata, progress=False, policy=policy)
    else:
        defense.fit(fresh, data, progress=False, policy=policy)
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
    policy: DevicePolicy | torch.device | str = "cpu",
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
    policy = as_policy(policy)
    device = policy.device
    t0 = time.perf_counter()
    poisoned = attack.poison(data.train, model=model, test=data.test)
    poison_seconds = time.perf_counter() - t0
    pdata = Data(name=data.name, train=poisoned, test=data.test, num_classes=data.num_classes, val=data.val)
    t0 = time.perf_counter()
    key = ""
    if retrain == "scratch":
        fit = train_or_load(spec, defense, pdata, cache or ModelCache(None), policy=policy, progress=False)
        trained, key = fit.model, fit.key
    else:
        trained = retrain_last_layer(model, pdata, defense, policy=policy, feature_space=feature_space)
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
        poison_rate=n_poison / len(data.train), n_poison=n_poison, n_train=len(data.train),
        clean_acc=accuracy(trained, data.test, device), attack_success_rate=asr,
        n_success_points=0 if goal is None else len(goal), retrain=retrain, train_seconds=train_seconds,
        poison_seconds=poison_seconds, poison_linf=float(Norm.LINF.geometry.distance(moved).max()),
        poison_l2=float(Norm.L2.geometry.distance(moved).max()), model_key=key,
    )
