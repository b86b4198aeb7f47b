"""Execute a plan: train (or load) each model once, run its pending cells through their kinds,
store every row.

The unit of work is a *group*: the cells of one (data, model, defense).  :func:`run_group` does
one group (train or load the model through the on-disk cache, then hand each cell kind its cells,
in the kinds' order) and returns its rows; it never opens the store itself.  An executor runs
groups: :class:`LocalExecutor` one after another in this process, handing each row and each
evaluation stage to the driver's store the moment it is measured (a :class:`StoreSink`), so a
killed run resumes mid-group; :class:`~robustbench_lite.harness.ray_executor.RayExecutor` as Ray
tasks on a cluster, whose rows arrive per group.  Only the driver (:func:`run_plan`) writes the
SQLite store, so resume works the same under every executor: finished cells (status ``ok``) are
skipped, a cell that raises is stored as an error and the run goes on.

The driver claims each group in the store (a lease) before running it, so two runs on one
workdir never compute the same group: the second one says once that it waits for the first, shows
how far the first has got with those groups, and then skips what it finished (or takes over the
lease of a run that died).

Progress (:mod:`~robustbench_lite.core.progress`): a bar over the plan's pending cells, and the
kinds' own tasks (each attack's points, curves, verification, training) labelled with their group.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .._version import __version__
from ..core.data import Data
from ..core.device import make_policy
from ..core.progress import Progress, Task
from ..core.registry import load_plugin_file
from ..training.cache import ModelCache, train_or_load
from . import faults
from .advsave import check_save_dir
from .kinds import Group, Sink, Stage, kind, proofs_of
from .plan import Cell, Plan
from .rows import FINISHED, WORST_CASE, CellResult, OnRow, Row, error_row, model_identity
from .specs import DataSpec
from .store import Store

log = logging.getLogger(__name__)
WAIT_POLL_SECONDS = 2.0  # how often a run waiting for another run's group looks again

@dataclass
class RunSummary:
    computed: int = 0  # attack cells measured in this run
    skipped: int = 0  # attack cells found finished in the store (by an earlier run, or a concurrent one)
    errors: int = 0  # attack cells that raised in this run
    computed_keys: list[str] = field(default_factory=list)
    waited: int = 0  # groups this run found claimed by another live run and waited for (each counted once)


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
    save_adv: str | None = None  # a folder for each attack's adversarial examples (None: not kept)


@dataclass(frozen=True)
class GroupTask:
    """One group's cells, the rows already stored for them (``status == ok``) and the stages of
    an evaluation a killed run left behind."""

    cells: tuple[Cell, ...]
    done: Mapping[str, Row]
    stages: Mapping[str, Stage] = field(default_factory=dict)


def group_prefix(cells: Sequence[Cell]) -> str:
    """The stage-key (and lease) prefix of a group."""
    return "/".join(cells[0].group) + "/"


class Executor(Protocol):
    """Runs groups and yields ``(task, rows)`` as each finishes (in any order).  ``sink``, when
    the executor can use it, stores rows and stages as they are measured; ``progress``, when it
    runs groups in this process, is where their kinds report (else the driver counts the cells of
    each group as its rows arrive)."""

    def run(
        self, tasks: Sequence[GroupTask], ctx: RunContext, on_row: OnRow | None = None, sink: Sink | None = None,
        progress: Progress | None = None,
    ) -> Iterator[tuple[GroupTask, list[Row]]]:
        ...


class StoreSink:
    """A :class:`~robustbench_lite.harness.kinds.Sink` writing to the driver's store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def row(self, row: CellResult, mask: Tensor | None) -> None:
        self.store.put(row, mask)

    def rows(self, rows: Sequence[Row], drop_stages: str | None = None) -> None:
        self.store.put_many(rows, drop_stages)

    def stage(self, key: str, payload: dict[str, Any], mask: Tensor | None) -> None:
        self.store.put_stage(key, payload, mask)


class LocalExecutor:
    """Groups one after another in this process; ``sink`` (or ``on_row``) gets each row and
    stage the moment it is measured (the driver stores it at once, so a kill keeps it)."""

    parallel = False  # one group at a time: the driver claims each just before it runs

    def __init__(self) -> None:
        self.datasets: dict[DataSpec, Data] = {}  # loaded once per run (the driver's model checks fill it)

    def run(
        self, tasks: Sequence[GroupTask], ctx: RunContext, on_row: OnRow | None = None, sink: Sink | None = None,
        progress: Progress | None = None,
    ) -> Iterator[tuple[GroupTask, list[Row]]]:
        for task in tasks:
            yield task, run_group(
                task.cells, ctx, task.done, on_row=on_row, datasets=self.datasets, stages=task.stages, sink=sink,
                progress=progress,
            )


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
    progress: bool | Progress = True,
    autocast: str = "auto",
    autocast_eval: bool = False,
    executor: Executor | None = None,
    plugins: Sequence[str | Path] = (),
    save_adv: str | Path | None = None,
) -> RunSummary:
    """Run every pending cell of ``plan`` with ``executor`` (default :class:`LocalExecutor`);
    results go to ``workdir/store.sqlite``, written here only.  ``progress``: ``True`` (bars on a
    terminal, log lines elsewhere), ``False``, or a :class:`~robustbench_lite.core.progress.Progress`.

    ``save_adv`` names a folder for the adversarial examples of the evasion cells computed in this
    run (:mod:`~robustbench_lite.harness.advsave`; a Ray worker writes there too, so on a cluster
    it must be a shared folder).  Cells finished before (by a run without it) are not recomputed:
    a warning says how many have no examples file."""
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    make_policy(device, autocast, autocast_eval)  # bad flags fail here, before any work
    if not str(workdir).strip():
        raise ValueError("the workdir is empty; give a folder for the store and the model cache (default .rbl)")
    reporter = Progress.of(progress)
    workdir = Path(workdir).resolve()
    save_dir = None if save_adv is None else str(check_save_dir(save_adv))
    ctx = RunContext(
        workdir=str(workdir), device=str(device), autocast=autocast, autocast_eval=autocast_eval,
        data_root=None if data_root is None else str(Path(data_root).resolve()), batch_size=batch_size,
        progress=bool(reporter), plugins=tuple(str(Path(p).resolve()) for p in plugins), threads=torch.get_num_threads(),
        save_adv=save_dir,
    )
    executor = executor if executor is not None else LocalExecutor()
    summary = RunSummary()
    ModelCache(workdir / "models").clean_stale()
    with Store(workdir / "store.sqlite") as store:
        pending = [_refreshed(GroupTask(tuple(cells), {}), store) for cells in plan.groups().values()]
        cells = reporter.cells(c.key for t in pending for c in t.cells if c.key not in t.done)
        wait = _Wait(reporter, store)
        _check_models([t for t in pending if len(t.done) < len(t.cells)], ctx, getattr(executor, "datasets", {}))
        try:
            while pending:
                waiting, claimed = [], []
                for task in pending:
                    task = _refreshed(task, store)
                    if len(task.done) == len(task.cells):  # finished (by an earlier run, or the one we waited for)
                        _store_identities(task, store)
                        wait.resolved(task)
                        summary.skipped += len(task.done)
                        for c in task.cells:
                            reporter.cell_done(c.key)
                        settle(task.cells, store, _labels_of(task.cells[0].data, ctx))
                        if save_dir is not None:
                            for name, part in _by_kind(task.cells):
                                kind(name).check_saved(part, save_dir)
                        continue
                    if not store.claim(group_prefix(task.cells)):
                        waiting.append(task)
                        continue
                    task = _refreshed(task, store)  # what the store holds now that the group is ours
                    task = _store_identities(task, store)
                    wait.resolved(task)
                    summary.skipped += len(task.done)
                    for key in task.done:
                        reporter.cell_done(key)
                    claimed.append(task)
                    if not getattr(executor, "parallel", True):
                        _run_tasks(executor, [task], ctx, store, summary, reporter)
                        claimed = []
                if claimed:
                    _run_tasks(executor, claimed, ctx, store, summary, reporter)
                wait.update(waiting, summary)
                if waiting:
                    time.sleep(WAIT_POLL_SECONDS)
                pending = waiting
        finally:
            wait.close()
            cells.close()
    return summary


def _check_models(tasks: Sequence[GroupTask], ctx: RunContext, datasets: dict[DataSpec, Data]) -> None:
    """Build each pending group's model for its data once (on the meta device where it can be),
    so bad model kwargs fail before any training (:meth:`ModelSpec.check`).  Data that does not
    load is left to its groups, which record why."""
    seen: set[tuple] = set()
    for task in tasks:
        first = task.cells[0]
        key = (first.data, first.model.name, repr(sorted(first.model.kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        if first.data not in datasets:
            try:
                datasets[first.data] = first.data.load(ctx.data_root)
            except Exception:  # noqa: BLE001 - the group records the failure with its cells
                continue
        check = getattr(first.model, "check", None)
        if check is not None:
            check(datasets[first.data])


class _Wait:
    """Groups another run holds: said once (who holds them), then a task over their cells that
    advances as the other run stores them, ended (with how many it stored) when no group is
    waited for any more."""

    def __init__(self, reporter: Progress, store: Store) -> None:
        self.reporter, self.store = reporter, store
        self.groups: dict[str, tuple[int, int]] = {}  # prefix -> (cells, of them stored by the other run)
        self.task: Task | None = None
        self.said = False
        self.ever: set[str] = set()  # every group waited for in this run (the summary counts each once)

    def resolved(self, task: GroupTask) -> None:
        """A group no longer waited for (finished by the other run, or now ours): what it stored."""
        prefix = group_prefix(task.cells)
        if prefix in self.groups:
            self.groups[prefix] = (len(task.cells), len(task.done))

    def update(self, waiting: Sequence[GroupTask], summary: RunSummary) -> None:
        now = {group_prefix(t.cells): (len(t.cells), len(t.done)) for t in waiting}
        new = [p for p in now if p not in self.groups]
        summary.waited += len(set(new) - self.ever)
        self.ever.update(new)
        self.groups.update(now)
        if new and not self.said:
            self.said = True
            holder = self.store.holder_of(new[0]) or "a run that is finishing"
            log.warning(
                "%d group(s) of this plan are being computed by another run on this workdir (%s); waiting for it, "
                "then skipping what it finished", len(new), holder,
            )
        if new and self.task is None:
            self.task = self.reporter.task("waiting for another run on this workdir", 0, unit="cell")
        if self.task is not None:
            if new:
                self.task.restart(sum(t for t, _ in self.groups.values()))
            self.task.advance_to(sum(d for _, d in self.groups.values()))
            if not waiting:
                self.close()

    def close(self) -> None:
        if self.task is not None:
            total = sum(t for t, _ in self.groups.values())
            self.task.close(f"{self.task.done} of {total} cells stored by the other run")
            self.task = None
            self.groups = {}


def _refreshed(task: GroupTask, store: Store) -> GroupTask:
    """``task`` with its finished cells and stored stages as the store holds them now."""
    done = {}
    for c in task.cells:
        hit = store.get(c.key)
        if hit is not None and hit[0].status in FINISHED:
            done[c.key] = hit
    stages = store.stages(group_prefix(task.cells)) if len(done) < len(task.cells) else {}
    return GroupTask(task.cells, done, stages)


def _store_identities(task: GroupTask, store: Store) -> GroupTask:
    """``task`` with its finished rows that were stored before model identities existed given
    their cell's identity (:func:`~robustbench_lite.harness.rows.model_identity`), in the store too,
    so the tables tell their model apart from others of the same names (the kinds' derived rows,
    e.g. worst cases, get theirs when they are refreshed or recomputed)."""
    stale = {c.key: (dataclasses.replace(hit[0], **model_identity(c)), hit[1])
             for c in task.cells if (hit := task.done.get(c.key)) is not None and not hit[0].model_id}
    if not stale:
        return task
    store.put_many(list(stale.values()))
    return GroupTask(task.cells, {**task.done, **stale}, task.stages)


def _run_tasks(
    executor: Executor, tasks: list[GroupTask], ctx: RunContext, store: Store, summary: RunSummary, reporter: Progress,
) -> None:
    """Run claimed groups, store their rows (one transaction per group) and release them."""
    sink = StoreSink(store)
    try:
        for task, rows in executor.run(tasks, ctx, on_row=sink.row, sink=sink, progress=reporter):
            for row, _ in rows:
                reporter.cell_done(row.key)
            complete = _complete(task, rows)
            store.put_many(rows, drop_stages=group_prefix(task.cells) if complete else None)
            faults.point("group-stored")
            if complete:
                try:  # what several kinds derive together (a row's bracket), whichever ran first
                    settle(task.cells, store, _labels_of(task.cells[0].data, ctx))
                except Exception as exc:  # the rows are stored: the next run settles the group again
                    log.warning("settling %s/%s failed (%s: %s); the next run retries it",
                                task.cells[0].model.name, task.cells[0].defense.name, type(exc).__name__, _first_line(exc))
            store.release(group_prefix(task.cells))
            for row, _mask in rows:
                if row.attack == WORST_CASE or row.key in task.done:
                    continue
                if row.model_key:  # measured (an attack that raised is measured with its error)
                    summary.computed += 1
                    summary.computed_keys.append(row.key)
                if row.status == "error":
                    summary.errors += 1
                    if not row.model_key:
                        log.warning("%s on %s: %s", row.attack, row.defense, row.error.splitlines()[0] if row.error else "")
    finally:
        for task in tasks:
            store.release(group_prefix(task.cells))


def settle(cells: Sequence[Cell], store: Store, labels) -> None:
    """Recompute what is derived from a group's stored rows: every kind's
    :meth:`~robustbench_lite.harness.kinds.CellKind.refresh`, in the kinds' order, with the proofs
    of all the group's stored rows (so a verifier's falsified points lower the worst case, and the
    certified share is the union of the verifiers, whichever cell ran first)."""
    proofs = proofs_of(hit for c in cells if (hit := store.get(c.key)) is not None)
    for name, part in sorted(_by_kind(cells), key=lambda item: kind(item[0]).order):
        kind(name).refresh(part, store, labels, proofs)


def _complete(task: GroupTask, rows: Sequence[Row]) -> bool:
    """Every pending cell of the group got a row (its evaluations are over: their stages can go)."""
    keys = {r.key for r, _ in rows}
    return all(c.key in keys or c.key in task.done for c in task.cells)


def run_group(
    cells: Sequence[Cell],
    ctx: RunContext,
    done: Mapping[str, Row] | None = None,
    *,
    on_row: OnRow | None = None,
    datasets: dict[DataSpec, Data] | None = None,
    stages: Mapping[str, Stage] | None = None,
    sink: Sink | None = None,
    progress: Progress | None = None,
) -> list[Row]:
    """The one per-group function every executor calls: train or load the group's model once
    (through the model cache under ``ctx.workdir``), then let each cell kind run its cells (in the
    kinds' order) and return the rows to store.

    ``done`` maps finished cells' keys to their stored rows (a kind reuses them instead of
    rerunning, e.g. the evasion worst case folds in their masks); ``stages`` holds what a killed
    evaluation of the group stored; ``sink`` (else ``on_row`` for rows only) sees each row and
    stage as it is measured; ``progress`` (default: from ``ctx.progress``) hears the kinds' work,
    labelled with the group's model and defense.  Does not open the store."""
    done = dict(done or {})
    reporter = (progress if progress is not None else Progress.of(ctx.progress)).child(
        f"{cells[0].model.name}/{cells[0].defense.name}"
    )
    emit: OnRow = sink.row if sink is not None else on_row if on_row is not None else (lambda row, mask: None)
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
            datasets[first.data] = first.data.load(ctx.data_root)
        data = datasets[first.data]
        _warn_short_test(cells, data)
        cache = ModelCache(Path(ctx.workdir) / "models")
        trained = train_or_load(first.model, first.defense.build(), data, cache, policy=policy, progress=reporter)
    except Exception as exc:  # no model: every pending cell of the group records why
        log.error("training %s/%s failed: %s: %s", first.model.name, first.defense.name, type(exc).__name__, _first_line(exc))
        log.debug("the traceback", exc_info=True)
        return [(error_row(c, f"training failed: {type(exc).__name__}: {exc}", code_version()), None) for c in cells if c.key not in done]
    group = Group(
        trained, data, policy, cache, ctx.workdir, ctx.batch_size, code_version(), done, emit,
        stages=dict(stages or {}), sink=sink, prefix=group_prefix(cells), save_adv=ctx.save_adv, progress=reporter,
    )
    rows: list[Row] = []
    for name, part in sorted(_by_kind(cells), key=lambda item: kind(item[0]).order):
        rows.extend(kind(name).run(part, group))
    return rows


def _labels_of(spec: DataSpec, ctx: RunContext):
    """A loader of the test labels of ``spec``'s dataset (loaded once, on first call)."""

    @functools.lru_cache(maxsize=1)
    def labels() -> Tensor:
        return spec.load(ctx.data_root).test.y

    return labels


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _warn_short_test(cells: Sequence[Cell], data: Data) -> None:
    """Warn once per group when cells ask for more test points than the dataset has (the rows
    record the number really evaluated)."""
    asked = max(c.n for c in cells)
    if asked > len(data.test):
        log.warning(
            "%s has %d test points, fewer than the %d asked for (--n): evaluating all %d; the rows say n=%d",
            data.name, len(data.test), asked, len(data.test), len(data.test),
        )


def _by_kind(cells: Sequence[Cell]) -> list[tuple[str, list[Cell]]]:
    """The cells grouped by their kind, in plan order."""
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(c.kind, []).append(c)
    return list(out.items())


def error_rows(task: GroupTask, error: str) -> list[Row]:
    """Error rows for a group's pending cells (its task died before returning rows)."""
    return [(error_row(c, error, code_version()), None) for c in task.cells if c.key not in task.done]
