"""Execute a plan: train (or load) each model once, evaluate its pending cells, store every row,
then recompute each threat's worst case.

The unit of work is a *group*: the cells of one (data, model, defense).  :func:`run_group` does
one group (train or load the model through the on-disk cache, evaluate the pending cells) and
returns its rows; it never writes the store.  An executor runs groups: :class:`LocalExecutor`
one after another in this process, :class:`~robustbench_lite.ray_executor.RayExecutor` as Ray
tasks on a cluster.  Only the driver (:func:`run_plan`) writes the SQLite store, so resume works
the same under every executor: finished cells (status ``ok``) are skipped, a cell that raises is
stored as an error and the run goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from . import __version__
from .autotune import BatchTuner, attack_kind
from .checks import CERTIFIED_BROKEN
from .config import config_hash
from .data import Data, DataSplit, load
from .defense import Defense
from .device import make_policy
from .evaluate import AttackRecord, evaluate
from .model_cache import ModelCache, TrainedModel, train_or_load
from .plan import Cell, DataSpec, Plan
from .registry import load_plugin_file
from .rows import WORST_CASE, CellResult, error_row
from .run_other import is_other, run_other_cells
from .store import Store
from .threat import ThreatModel

log = logging.getLogger(__name__)

Row = tuple[CellResult, Tensor | None]  # a store row and its per-point robust mask
OnRow = Callable[[CellResult, Tensor | None], None]


@dataclass
class RunSummary:
    computed: int = 0  # attack cells measured in this run
    skipped: int = 0  # attack cells found finished in the store
    errors: int = 0  # attack cells that raised in this run
    computed_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunContext:
    """What a group needs besides its cells: plain values, so it travels to Ray workers.

    ``device`` and ``autocast`` are resolved where the group runs (a worker's GPU is its own);
    ``batch_size`` is a number or ``"auto"`` (probe and cache the fastest, see :mod:`autotune`)."""

    workdir: str
    device: str = "auto"
    autocast: str = "auto"
    autocast_eval: bool = False
    data_root: str | None = None
    batch_size: int | str = 500
    progress: bool = True
    plugins: tuple[str, ...] = ()
    threads: int | None = None  # torch CPU threads where the group runs (float sums depend on it)


@dataclass(frozen=True)
class GroupTask:
    """One group's cells and the rows already stored for them (``status == ok``)."""

    cells: tuple[Cell, ...]
    done: Mapping[str, Row]


class Executor(Protocol):
    """Runs groups and yields ``(task, rows)`` as each finishes (in any order)."""

    def run(self, tasks: Sequence[GroupTask], ctx: RunContext, on_row: OnRow | None = None) -> Iterator[tuple[GroupTask, list[Row]]]:
        ...


class LocalExecutor:
    """Today's loop: groups one after another in this process; ``on_row`` gets each attack row
    the moment it is measured (the driver stores it at once, so a kill keeps it)."""

    def run(self, tasks: Sequence[GroupTask], ctx: RunContext, on_row: OnRow | None = None) -> Iterator[tuple[GroupTask, list[Row]]]:
        datasets: dict[DataSpec, Data] = {}
        for task in tasks:
            yield task, run_group(task.cells, ctx, task.done, on_row=on_row, datasets=datasets)


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
    batch_size: int | str = 500,
    progress: bool = True,
    autocast: str = "auto",
    autocast_eval: bool = False,
    executor: Executor | None = None,
    plugins: Sequence[str | Path] = (),
) -> RunSummary:
    """Run every pending cell of ``plan`` with ``executor`` (default :class:`LocalExecutor`);
    results go to ``workdir/store.sqlite``, written here only."""
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    make_policy(device, autocast, autocast_eval)  # bad flags fail here, before any work
    workdir = Path(workdir).resolve()
    ctx = RunContext(
        workdir=str(workdir), device=str(device), autocast=autocast, autocast_eval=autocast_eval,
        data_root=None if data_root is None else str(Path(data_root).resolve()), batch_size=batch_size,
        progress=progress, plugins=tuple(str(Path(p).resolve()) for p in plugins), threads=torch.get_num_threads(),
    )
    executor = executor if executor is not None else LocalExecutor()
    summary = RunSummary()
    with Store(workdir / "store.sqlite") as store:
        tasks = []
        for cells in plan.groups().values():
            done = {}
            for c in cells:
                hit = store.get(c.key)
                if hit is not None and hit[0].status == "ok":
                    done[c.key] = hit
            summary.skipped += len(done)
            if len(done) == len(cells):
                _write_worst_cases(store, cells)
                continue
            tasks.append(GroupTask(tuple(cells), done))

        def store_row(row: CellResult, mask: Tensor | None) -> None:
            store.put(row, mask)

        for task, rows in executor.run(tasks, ctx, on_row=store_row):
            for row, mask in rows:
                store.put(row, mask)
                if row.attack == WORST_CASE or row.key in task.done:
                    continue
                if row.model_key:  # measured (an attack that raised is measured with its error)
                    summary.computed += 1
                    summary.computed_keys.append(row.key)
                if row.status != "ok":
                    summary.errors += 1
                    if not row.model_key:
                        log.warning("%s on %s: %s", row.attack, row.defense, row.error.splitlines()[0] if row.error else "")
    return summary


def run_group(
    cells: Sequence[Cell],
    ctx: RunContext,
    done: Mapping[str, Row] | None = None,
    *,
    on_row: OnRow | None = None,
    datasets: dict[DataSpec, Data] | None = None,
) -> list[Row]:
    """The one per-group function every executor calls: train or load the group's model once
    (through the model cache under ``ctx.workdir``), evaluate the cells not in ``done``, and return
    the rows to store: each attack row (with its flags) and one ``worst_case`` row per threat.

    ``done`` maps finished cells' keys to their stored rows (their masks feed the worst cases, so
    they are not rerun); ``on_row`` sees each attack row as it is measured, before flags are
    known.  Does not touch the store."""
    done = dict(done or {})
    emit: OnRow = on_row if on_row is not None else (lambda row, mask: None)
    first = cells[0]
    if ctx.threads is not None and torch.get_num_threads() != ctx.threads:
        # CPU reductions split by thread, so the thread count changes the last bits of training and
        # attacks: a worker uses the driver's count, so every executor gives the same numbers
        torch.set_num_threads(ctx.threads)
    try:
        for path in ctx.plugins:
            load_plugin_file(path)
        policy = make_policy(ctx.device, ctx.autocast, ctx.autocast_eval)
        datasets = datasets if datasets is not None else {}
        if first.data not in datasets:
            datasets[first.data] = load(
                first.data.name, ctx.data_root, val_fraction=first.data.val_fraction, train_limit=first.data.train_limit
            )
        data = datasets[first.data]
        cache = ModelCache(Path(ctx.workdir) / "models")
        defense = first.defense.build()
        trained = train_or_load(first.model, defense, data, cache, policy=policy, progress=ctx.progress)
    except Exception as exc:  # no model: every pending cell of the group records why
        log.exception("training %s/%s failed", first.model.name, first.defense.name)
        return [(error_row(c, f"training failed: {type(exc).__name__}: {exc}", code_version()), None) for c in cells if c.key not in done]
    rows: list[Row] = []
    tuner = BatchTuner(Path(ctx.workdir) / "autotune.json") if ctx.batch_size == "auto" else None
    # universal / sparse (L0) / poisoning cells: their own evaluation and row metrics (run_other.py)
    other = [c for c in cells if is_other(c) and c.key not in done]
    for row in run_other_cells(other, trained, data, policy.device, cache=cache, code_version=code_version()):
        emit(*row)
        rows.append(row)
    cells = [c for c in cells if not is_other(c)]
    by_survivors: dict[bool, list[Cell]] = {}
    for c in cells:
        by_survivors.setdefault(c.survivors, []).append(c)
    for survivors, group in by_survivors.items():
        n = group[0].n
        latest: dict[str, Row] = {c.key: done[c.key] for c in group if c.key in done}
        attacks, precomputed = [], {}
        for i, c in enumerate(group):
            try:
                attacks.append(c.build_attack())
            except Exception as exc:
                row = error_row(c, f"bad attack config: {type(exc).__name__}: {exc}", code_version())
                emit(row, None)
                rows.append((row, None))
                latest[c.key] = (row, None)
                attacks.append(None)
                continue
            hit = done.get(c.key)
            if hit is not None and hit[1] is not None:
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
            emit(_attack_row(cell, trained, rec, clean_acc, flags=""), rec.robust)
            if rec.error:
                log.warning("attack %s failed: %s", cell.attack.name, rec.error.splitlines()[0])

        ev = evaluate(
            trained.model, [attacks[i] for i in live], data.test, n=n, policy=policy,
            batch_size=_batch_rule(ctx.batch_size, tuner, trained, data, n, policy),
            survivors_only=survivors, precomputed={j: precomputed[i] for j, i in enumerate(live) if i in precomputed},
            on_record=on_record,
        )
        # the attack rows again, with their flags (flags need every attack of the threat)
        for j, rec in enumerate(ev.records):
            cell = group[live[j]]
            flags = _join(ev.flags.get(f"{cell.attack.name}@{cell.threat.label}", set()))
            row = (_attack_row(cell, trained, rec, ev.clean_acc, flags), rec.robust)
            rows.append(row)
            latest[cell.key] = row
        rows.extend(with_certificate(defense, trained.model, data.test.head(n), policy.device, worst_case_rows(group, latest, ev.flags)))
    return rows


def with_certificate(defense: Defense, model: torch.nn.Module, points: DataSplit, device, wc_rows: list[Row]) -> list[Row]:
    """Worst-case rows with the defense's certified share of the same points (``certified_acc``
    in their metrics) where it has a certificate, flagged ``certified-broken`` when an attack
    broke a point the certificate counts as robust."""
    x, y = points.x.to(device), points.y.to(device)
    out = []
    for row, mask in wc_rows:
        cert = defense.certify(model, x, y, ThreatModel(row.norm, row.eps))
        if cert is None or mask is None:
            out.append((row, mask))
            continue
        cert = cert.cpu().bool()
        broken = {CERTIFIED_BROKEN} if bool((cert & ~mask.cpu()).any()) else set()
        metrics = json.dumps({"certified_acc": float(cert.float().mean())})
        out.append((replace(row, flags=_flags_with(row, broken), metrics=metrics), mask))
    return out


def _batch_rule(batch_size, tuner, trained, data, n, policy):
    """A fixed batch size, or (``auto``) a function of the attack: the tuned batch of its kind."""
    if tuner is None:
        return batch_size
    test = data.test.head(n)
    chosen: dict[str, int] = {}

    def rule(attack) -> int:
        kind = attack_kind(attack)
        if kind not in chosen:
            chosen[kind] = tuner.batch_for(trained.model, trained.key, kind, test.x, test.y, policy)
        return chosen[kind]

    return rule


def worst_case_rows(cells: Iterable[Cell], latest: Mapping[str, Row], flags: Mapping[str, set[str]] | None = None) -> list[Row]:
    """One ``worst_case`` row per threat: the per-point AND of its cells' robust masks.

    ``latest`` maps cell keys to their newest rows (cells absent or not ``ok`` make the worst
    case ``incomplete``); ``flags`` are an evaluation's flags (``worst_case@<threat>`` keys)."""
    flags = flags or {}
    by_threat: dict[ThreatModel, list[Cell]] = {}
    for c in cells:
        if is_other(c):  # no per-point masks: not part of an evasion worst case
            continue
        by_threat.setdefault(c.threat, []).append(c)
    out: list[Row] = []
    for threat, tcells in by_threat.items():
        stored = [latest.get(c.key) for c in tcells]
        ok = [(r, m) for r, m in (s for s in stored if s is not None) if r.status == "ok" and m is not None]
        if not ok:
            continue
        mask = ok[0][1].clone()
        found: set[str] = set()
        for r, m in ok:
            mask &= m
            found.update(f for f in r.flags.split(";") if f)
        if len(ok) < len(tcells):
            found.add("incomplete")
        found.update(flags.get(f"{WORST_CASE}@{threat.label}", set()))
        ref = ok[0][0]
        key = config_hash({"worst_case": sorted(c.key for c in tcells)})
        row = CellResult(
            dataset=ref.dataset, model=ref.model, defense=ref.defense, attack=WORST_CASE, norm=ref.norm, eps=ref.eps,
            kind=ref.kind, n=ref.n, clean_acc=ref.clean_acc, robust_acc=float(mask.float().mean()),
            seconds=sum(r.seconds for r, _ in ok), grad_evals=sum(r.grad_evals for r, _ in ok),
            forward_evals=sum(r.forward_evals for r, _ in ok), attacked=max(r.attacked for r, _ in ok),
            scope="all", target_hit_rate=None, success_rate=None, median_l2=None, flags=_join(found), status="ok", error="",
            train_seconds=ref.train_seconds, attack_params=json.dumps(sorted(r.attack for r, _ in ok)),
            key=key, model_key=ref.model_key, code_version=code_version(),
        )
        out.append((row, mask))
    return out


def error_rows(task: GroupTask, error: str) -> list[Row]:
    """Error rows for a group's pending cells (its task died before returning rows)."""
    return [(error_row(c, error, code_version()), None) for c in task.cells if c.key not in task.done]


def _write_worst_cases(store: Store, cells: list[Cell]) -> None:
    """The worst-case rows of ``cells`` from what the store holds (a group with nothing pending)."""
    latest = {c.key: hit for c in cells if (hit := store.get(c.key)) is not None}
    for row, mask in worst_case_rows(cells, latest):
        old = store.get(row.key)
        if old is not None and old[0].metrics:  # keep what only a live group measures: the certificate
            kept = set(old[0].flags.split(";")) & {CERTIFIED_BROKEN}
            row = replace(row, metrics=old[0].metrics, flags=_flags_with(row, kept))
        store.put(row, mask)


def _join(flags: set[str]) -> str:
    return ";".join(sorted(f for f in flags if f))


def _flags_with(row: CellResult, extra: set[str]) -> str:
    """``row``'s flags with ``extra`` added."""
    return _join(set(row.flags.split(";")) | extra)


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
