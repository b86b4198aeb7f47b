"""Execute a plan locally: train (or load) each model once, evaluate its pending cells, store
every row the moment it is measured, then recompute each threat's worst case from the store.

Finished cells (status ``ok``) are skipped, so a killed run resumes; a cell that raises is
stored as an error and the run goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .config import config_hash
from .data import Data, load
from .device import resolve_device
from .evaluate import AttackRecord, Evaluation, evaluate
from .model_cache import ModelCache, TrainedModel, train_or_load
from .plan import Cell, DataSpec, Plan
from .rows import WORST_CASE, CellResult
from .run_other import is_other, run_other_cells
from .store import Store
from .threat import ThreatModel

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    computed: int = 0  # attack cells measured in this run
    skipped: int = 0  # attack cells found finished in the store
    errors: int = 0  # attack cells that raised in this run
    computed_keys: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    try:
        here = Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        return f"{__version__}+g{sha}" if sha else __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def run_plan(
    plan: Plan,
    *,
    workdir: str | Path = ".rbl",
    device: str = "auto",
    data_root: str | Path | None = None,
    batch_size: int = 500,
    progress: bool = True,
) -> RunSummary:
    """Run every pending cell of ``plan``; results go to ``workdir/store.sqlite``."""
    workdir = Path(workdir)
    dev = resolve_device(device)
    cache = ModelCache(workdir / "models")
    summary = RunSummary()
    datasets: dict[DataSpec, Data] = {}
    with Store(workdir / "store.sqlite") as store:
        for cells in plan.groups().values():
            first = cells[0]
            pending = [c for c in cells if not store.done(c.key)]
            summary.skipped += len(cells) - len(pending)
            if not pending:
                _write_worst_cases(store, cells, None)
                continue
            try:
                if first.data not in datasets:
                    datasets[first.data] = load(
                        first.data.name, data_root, val_fraction=first.data.val_fraction, train_limit=first.data.train_limit
                    )
                data = datasets[first.data]
                trained = train_or_load(first.model, first.defense.build(), data, cache, device=dev, progress=progress)
            except Exception as exc:  # no model: every pending cell of the group records why
                log.exception("training %s/%s failed", first.model.name, first.defense.name)
                for c in pending:
                    store.put(_error_row(c, f"training failed: {type(exc).__name__}: {exc}"))
                    summary.errors += 1
                continue
            _evaluate_group(store, cells, trained, data, dev, batch_size, summary, cache)
    return summary


def _evaluate_group(
    store: Store, cells: list[Cell], trained: TrainedModel, data: Data, device: torch.device, batch_size: int,
    summary: RunSummary, cache: ModelCache | None = None,
) -> None:
    # universal / sparse (L0) / poisoning cells: their own evaluation and row metrics (run_other.py)
    other = [c for c in cells if is_other(c) and not store.done(c.key)]
    for row, mask in run_other_cells(other, trained, data, device, cache=cache, code_version=code_version()):
        store.put(row, mask)
        summary.computed += 1
        summary.computed_keys.append(row.key)
        summary.errors += row.status == "error"
    cells = [c for c in cells if not is_other(c)]
    by_survivors: dict[bool, list[Cell]] = {}
    for c in cells:
        by_survivors.setdefault(c.survivors, []).append(c)
    for survivors, group in by_survivors.items():
        n = group[0].n
        attacks, precomputed = [], {}
        for i, c in enumerate(group):
            try:
                attacks.append(c.build_attack())
            except Exception as exc:
                store.put(_error_row(c, f"bad attack config: {type(exc).__name__}: {exc}"))
                summary.errors += 1
                attacks.append(None)
                continue
            hit = store.get(c.key)
            if hit is not None and hit[0].status == "ok" and hit[1] is not None:
                r = hit[0]
                precomputed[i] = AttackRecord(
                    attacks[-1], hit[1], r.seconds, r.grad_evals, r.forward_evals, r.attacked, r.scope, r.target_hit_rate,
                    success_rate=r.success_rate, median_l2=r.median_l2,
                )
        live = [i for i, a in enumerate(attacks) if a is not None]
        if not live:
            continue

        def on_record(j: int, rec: AttackRecord, clean_acc: float, _live=live, _group=group) -> None:
            cell = _group[_live[j]]
            row = _attack_row(cell, trained, rec, clean_acc, flags="")
            store.put(row, rec.robust)
            summary.computed += 1
            summary.computed_keys.append(cell.key)
            if rec.error:
                summary.errors += 1
                log.warning("attack %s failed: %s", cell.attack.name, rec.error.splitlines()[0])

        ev = evaluate(
            trained.model, [attacks[i] for i in live], data.test, n=n, device=device, batch_size=batch_size,
            survivors_only=survivors, precomputed={j: precomputed[i] for j, i in enumerate(live) if i in precomputed},
            on_record=on_record,
        )
        # rewrite the attack rows with their flags (flags need every attack of the threat)
        for j, rec in enumerate(ev.records):
            cell = group[live[j]]
            flags = _join(ev.flags.get(f"{cell.attack.name}@{cell.threat.label}", set()))
            store.put(_attack_row(cell, trained, rec, ev.clean_acc, flags), rec.robust)
        _write_worst_cases(store, group, ev)


def _write_worst_cases(store: Store, cells: list[Cell], ev: Evaluation | None) -> None:
    """One ``worst_case`` row per threat: the per-point AND of its stored robust masks."""
    by_threat: dict[ThreatModel, list[Cell]] = {}
    for c in cells:
        if is_other(c):  # no per-point masks: not part of an evasion worst case
            continue
        by_threat.setdefault(c.threat, []).append(c)
    for threat, tcells in by_threat.items():
        stored = [store.get(c.key) for c in tcells]
        ok = [(r, m) for r, m in (s for s in stored if s is not None) if r.status == "ok" and m is not None]
        if not ok:
            continue
        mask = ok[0][1].clone()
        flags: set[str] = set()
        for r, m in ok:
            mask &= m
            flags.update(f for f in r.flags.split(";") if f)
        if len(ok) < len(tcells):
            flags.add("incomplete")
        if ev is not None:
            flags.update(ev.flags.get(f"{WORST_CASE}@{threat.label}", set()))
        ref = ok[0][0]
        key = config_hash({"worst_case": sorted(c.key for c in tcells)})
        row = CellResult(
            dataset=ref.dataset, model=ref.model, defense=ref.defense, attack=WORST_CASE, norm=ref.norm, eps=ref.eps,
            kind=ref.kind, n=ref.n, clean_acc=ref.clean_acc, robust_acc=float(mask.float().mean()),
            seconds=sum(r.seconds for r, _ in ok), grad_evals=sum(r.grad_evals for r, _ in ok),
            forward_evals=sum(r.forward_evals for r, _ in ok), attacked=max(r.attacked for r, _ in ok),
            scope="all", target_hit_rate=None, success_rate=None, median_l2=None, flags=_join(flags), status="ok", error="",
            train_seconds=ref.train_seconds, attack_params=json.dumps(sorted(r.attack for r, _ in ok)),
            key=key, model_key=ref.model_key, code_version=code_version(),
        )
        store.put(row, mask)


def _join(flags: set[str]) -> str:
    return ";".join(sorted(f for f in flags if f))


def _attack_row(cell: Cell, trained: TrainedModel, rec: AttackRecord, clean_acc: float, flags: str) -> CellResult:
    return CellResult(
        dataset=cell.data.name, model=cell.model.name, defense=cell.defense.name, attack=cell.attack.name,
        norm=cell.threat.norm.value, eps=cell.threat.eps, kind=rec.attack.kind.value, n=cell.n, clean_acc=clean_acc,
        robust_acc=rec.robust_acc, seconds=rec.seconds, grad_evals=rec.grad_evals, forward_evals=rec.forward_evals,
        attacked=rec.attacked, scope=rec.scope, target_hit_rate=rec.target_hit_rate, success_rate=rec.success_rate,
        median_l2=rec.median_l2, flags=flags,
        status="error" if rec.error else "ok", error=rec.error, train_seconds=trained.sidecar.get("train_seconds"),
        attack_params=json.dumps(rec.attack.get_params(), sort_keys=True), key=cell.key, model_key=trained.key,
        code_version=code_version(),
    )


def _error_row(cell: Cell, error: str) -> CellResult:
    return CellResult(
        dataset=cell.data.name, model=cell.model.name, defense=cell.defense.name, attack=cell.attack.name,
        norm=cell.threat.norm.value, eps=cell.threat.eps, kind="evasion", n=cell.n, clean_acc=float("nan"),
        robust_acc=None, seconds=0.0, grad_evals=0, forward_evals=0, attacked=0, scope="all", target_hit_rate=None,
        success_rate=None, median_l2=None, flags="", status="error", error=error[:4000], train_seconds=None,
        attack_params=json.dumps(cell.attack.params, sort_keys=True), key=cell.key, model_key="", code_version=code_version(),
    )
