"""Harness cells for the attacks that are not per-point evasion (issue 6): universal
perturbations, sparse (L0) evasion and poisoning.

:func:`run_other_cells` turns each such cell of a trained-model group into one store row
(:class:`~robustbench_lite.rows.CellResult` with ``kind`` = ``universal`` / ``sparse`` /
``poisoning`` and its own numbers in the JSON ``metrics`` column, keys in :data:`METRICS`), so
these cells share the evasion cells' resume (the caller skips stored ``ok`` keys), error isolation
(a cell that raises becomes an ``error`` row and the others go on) and leaderboards
(:mod:`robustbench_lite.leaderboard` writes ``<dataset>_<kind>.csv``).

* universal: fit on the first :data:`FIT_POINTS` training points, evaluate on the first ``n``
  test points (:func:`~robustbench_lite.evaluate_other.evaluate_universal`, random-noise floor
  included); ``robust_acc`` = accuracy under ``x + delta``, ``success_rate`` = fooling rate.
* sparse: :func:`~robustbench_lite.evaluate_other.evaluate_sparse` on the first ``n`` test points;
  ``success_rate`` over the clean-correct points, ``forward_evals`` = queries.
* poisoning: poison the group's training split, train the cell's model under the cell's defense
  on it (cached by the poisoned split's fingerprint, so a rerun loads it), report the clean test
  accuracy, its drop from the group's unpoisoned model and the attack success rate.  Attacks
  that need a model (feature collision) retrain only the last layer of the group's model.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .data import Data
from .evaluate_other import evaluate_poisoning, evaluate_sparse, evaluate_universal
from .model_cache import ModelCache, TrainedModel
from .plan import Cell
from .rows import CellResult, error_row

log = logging.getLogger(__name__)

FIT_POINTS = 500  # the universal attacker's set: the first training points

# the metrics column of each kind (also the leaderboard columns, in this order)
METRICS: dict[str, tuple[str, ...]] = {
    "universal": ("fooling_rate", "noise_fooling_rate", "acc_under_delta", "noise_acc", "delta_norm", "n_fit"),
    "sparse": ("pixels", "success_rate", "queries", "queries_per_point"),
    "poisoning": (
        "poison_rate", "n_poison", "clean_acc_unpoisoned", "clean_acc_drop", "attack_success_rate",
        "n_success_points", "retrain", "poison_linf", "poison_l2", "poison_seconds",
    ),
}


def is_other(cell: Cell) -> bool:
    """True for the cells :func:`run_other_cells` handles (everything but dense evasion)."""
    return cell.kind != "evasion"


def run_other_cells(
    cells: list[Cell],
    trained: TrainedModel,
    data: Data,
    device: torch.device | str,
    *,
    cache: ModelCache | None = None,
    code_version: str = "",
) -> Iterator[tuple[CellResult, Tensor | None]]:
    """Yield one ``(row, mask)`` per cell, in order, as soon as it is measured (store it at once,
    so a killed run keeps it); ``mask`` is always ``None`` (these kinds have no per-point robust
    mask to fold into an evasion worst case).  Never raises for a cell."""
    for cell in cells:
        try:
            row = _run_cell(cell, trained, data, torch.device(device), cache, code_version)
        except Exception as exc:  # error isolation: the cell is stored as an error, the run goes on
            log.warning("%s cell %s failed: %s", cell.kind, cell.attack.name, exc)
            # it ran on the group's model and raised: the driver counts it as measured, with its error
            row = error_row(
                cell, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", code_version, model_key=trained.key
            )
        yield row, None


def _run_cell(
    cell: Cell, trained: TrainedModel, data: Data, device: torch.device, cache: ModelCache | None, version: str
) -> CellResult:
    kind = cell.kind
    attack = cell.build_attack()
    params = json.dumps(attack.get_params(), sort_keys=True)
    test = data.test.head(cell.n)
    base = _base(cell, kind, params, trained.key, version, trained.sidecar.get("train_seconds"))
    if kind == "universal":
        fit = data.train.head(FIT_POINTS)
        r = evaluate_universal(trained.model, attack, fit, test, device=device)
        m = {"fooling_rate": r.fooling_rate, "noise_fooling_rate": r.noise_fooling_rate, "acc_under_delta": r.acc_under_delta,
             "noise_acc": r.noise_acc, "delta_norm": r.delta_norm, "n_fit": r.n_fit}
        return CellResult(**base, n=r.n_eval, clean_acc=r.clean_acc, robust_acc=r.acc_under_delta, seconds=r.seconds,
                          grad_evals=r.grad_evals, forward_evals=r.forward_evals, attacked=r.n_eval,
                          success_rate=r.fooling_rate, metrics=json.dumps(m))
    if kind == "sparse":
        r = evaluate_sparse(trained.model, attack, test, device=device)
        m = {"pixels": r.pixels, "success_rate": r.success_rate, "queries": r.forward_evals,
             "queries_per_point": r.forward_evals / max(r.attacked, 1)}
        return CellResult(**base, n=r.n, clean_acc=r.clean_acc, robust_acc=r.robust_acc, seconds=r.seconds,
                          grad_evals=0, forward_evals=r.forward_evals, attacked=r.attacked, success_rate=r.success_rate,
                          metrics=json.dumps(m))
    if kind == "poisoning":
        defense = cell.defense.build()
        if attack.needs_model:
            r = evaluate_poisoning(attack, data, defense, model=trained.model, retrain="last-layer", device=device,
                                   feature_space=cell.defense.name == "standard")
        else:
            r = evaluate_poisoning(attack, data, defense, spec=cell.model, cache=cache, device=device)
        ref = trained.sidecar.get("clean_acc")
        ref = float(ref) if ref is not None else float("nan")
        m = {"poison_rate": r.poison_rate, "n_poison": r.n_poison, "clean_acc_unpoisoned": ref,
             "clean_acc_drop": ref - r.clean_acc, "attack_success_rate": r.attack_success_rate,
             "n_success_points": r.n_success_points, "retrain": r.retrain, "poison_linf": r.poison_linf,
             "poison_l2": r.poison_l2, "poison_seconds": r.poison_seconds}
        base.update(train_seconds=r.train_seconds, model_key=r.model_key or trained.key)
        return CellResult(**base, n=len(data.test), clean_acc=r.clean_acc, robust_acc=None,
                          seconds=r.poison_seconds + r.train_seconds, grad_evals=0, forward_evals=0, attacked=r.n_poison,
                          success_rate=r.attack_success_rate, metrics=json.dumps(_finite(m)))
    raise ValueError(f"run_other_cells does not handle {kind} cells ({cell.attack.name}); evaluate them with evaluate()")


def _base(cell: Cell, kind: str, params: str, model_key: str, version: str, train_seconds: Any) -> dict[str, Any]:
    return {
        "dataset": cell.data.name, "model": cell.model.name, "defense": cell.defense.name, "attack": cell.attack.name,
        "norm": cell.threat.norm.value, "eps": cell.threat.eps, "kind": kind, "scope": "all", "target_hit_rate": None,
        "median_l2": None, "flags": "", "status": "ok", "error": "", "train_seconds": train_seconds,
        "attack_params": params, "key": cell.key, "model_key": model_key, "code_version": version,
    }


def _finite(m: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: store missing numbers as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
