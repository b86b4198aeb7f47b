"""Execute a plan: train (or load) each model once, run its pending cells through their kinds,
store every row.

The unit of work is a *group*: the cells of one (data, model, defense).  :func:`run_group` does
one group (train or load the model through the on-disk cache, then hand each cell kind its cells,
in the kinds' order) and returns its rows; it never writes the store.  An executor runs groups:
:class:`LocalExecutor` one after another in this process,
:class:`~robustbench_lite.harness.ray_executor.RayExecutor` as Ray tasks on a cluster.  Only the
driver (:func:`run_plan`) writes the SQLite store, so resume works the same under every executor:
finished cells (status ``ok``) are skipped, a cell that raises is stored as an error and the run
goes on.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from .. import __version__
from ..core.data import Data
from ..core.device import make_policy
from ..core.registry import load_plugin_file
from ..training.cache import ModelCache, train_or_load
from .kinds import Group, kind
from .plan import Cell, Plan
from .rows import WORST_CASE, CellResult, OnRow, Row, error_row
from .specs import DataSpec
from .store import Store

log = logging.getLogger(__name__)

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
                labels = _labels_of(cells[0].data, ctx)
                for name, part in _by_kind(cells):
                    kind(name).refresh(part, store, labels)
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
    (through the model cache under ``ctx.workdir``), then let each cell kind run its cells (in the
    kinds' order) and return the rows to store.

    ``done`` maps finished cells' keys to their stored rows (a kind reuses them instead of
    rerunning, e.g. the evasion worst case folds in their masks); ``on_row`` sees each row as it is
    measured.  Does not touch the store."""
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
            datasets[first.data] = first.data.load(ctx.data_root)
        data = datasets[first.data]
        cache = ModelCache(Path(ctx.workdir) / "models")
        trained = train_or_load(first.model, first.defense.build(), data, cache, policy=policy, progress=ctx.progress)
    except Exception as exc:  # no model: every pending cell of the group records why
        log.exception("training %s/%s failed", first.model.name, first.defense.name)
        return [(error_row(c, f"training failed: {type(exc).__name__}: {exc}", code_version()), None) for c in cells if c.key not in done]
    group = Group(trained, data, policy, cache, ctx.workdir, ctx.batch_size, code_version(), done, emit)
    rows: list[Row] = []
    for name, part in sorted(_by_kind(cells), key=lambda item: kind(item[0]).order):
        rows.extend(kind(name).run(part, group))
    return rows


def _labels_of(spec: DataSpec, ctx: RunContext):
    """A loader of the test labels of ``spec``'s dataset (loaded once, on first call)."""

    @functools.lru_cache(maxsize=1)
    def labels() -> Tensor:
        return load(spec.name, ctx.data_root, val_fraction=spec.val_fraction, train_limit=spec.train_limit).test.y

    return labels


def _by_kind(cells: Sequence[Cell]) -> list[tuple[str, list[Cell]]]:
    """The cells grouped by their kind, in plan order."""
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(c.kind, []).append(c)
    return list(out.items())


def error_rows(task: GroupTask, error: str) -> list[Row]:
    """Error rows for a group's pending cells (its task died before returning rows)."""
    return [(error_row(c, error, code_version()), None) for c in task.cells if c.key not in task.done]
