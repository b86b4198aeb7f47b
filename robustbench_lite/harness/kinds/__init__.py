"""Cell kinds: one kind of evaluation per module, in a registry.

A kind says how to run its cells for one trained-model group (:meth:`CellKind.run`), its row type
(a frozen dataclass whose fields are its leaderboard columns, declared once: :attr:`CellKind.row`)
and its tables (:meth:`CellKind.tables`, by default one CSV per dataset named
``<dataset>_<kind>``).  The harness dispatches every cell through ``KINDS.get(cell.kind)``; a new
kind of evaluation is one module registered with :func:`register_kind` (here, in a package's
``robustbench_lite.kinds`` entry points, or in a ``--plugin`` file).

Every row goes to the store as a :class:`~robustbench_lite.harness.rows.CellResult`: the fields
of the kind's row type that are :class:`~robustbench_lite.harness.rows.CellResult` fields fill them, the others go into its JSON
``metrics``.

What a kind proves about single points (a verifier's certified and falsified points) it offers as
:class:`~robustbench_lite.eval.bracket.Proof` objects (:meth:`CellKind.proofs`); the evasion kind
folds every kind's proofs into each row's bracket (certified ≤ robust accuracy ≤ worst case).  Once
a group's cells are stored, the driver calls every kind's :meth:`CellKind.refresh` (in
:attr:`CellKind.order`) with the proofs of all the group's stored rows, so what is derived from
several kinds does not depend on which ran first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import pandas as pd
from torch import Tensor

from ...core.data import Data
from ...core.device import DevicePolicy
from ...core.progress import Progress
from ...core.registry import ATTACKS, KINDS, create_attack
from ...eval.bracket import Proof
from ...training.cache import ModelCache, TrainedModel
from .. import faults
from ..identity import distinguish
from ..rows import CellResult, OnRow, Row, cell_row, error_row, split_metrics

if TYPE_CHECKING:
    from ..plan import Cell
    from ..store import Store

log = logging.getLogger(__name__)

register_kind = KINDS.register
list_kinds = KINDS.list


Stage = tuple[dict[str, Any], Tensor | None]


class Sink(Protocol):
    """Where a group's results go as they are measured (the driver's store, for the local
    executor): single rows, a part's rows in one transaction, and evaluation stages."""

    def row(self, row: CellResult, mask: Tensor | None) -> None: ...

    def rows(self, rows: Sequence[Row], drop_stages: str | None = None) -> None: ...

    def stage(self, key: str, payload: dict[str, Any], mask: Tensor | None) -> None: ...


class GroupCheckpoint:
    """A group's stored stages under one part's prefix, as an evaluation checkpoint
    (:class:`~robustbench_lite.eval.checkpoint.Checkpoint`): a stage is stored through the sink the
    moment it is done, and the kill hook (``robustbench_lite.harness.faults``) sees its name."""

    def __init__(self, group: Group, part: str) -> None:
        self.group, self.prefix = group, f"{group.prefix}{part}/"

    def get(self, name: str) -> Stage | None:
        return self.group.stages.get(self.prefix + name)

    def put(self, name: str, payload: dict[str, Any], mask: Tensor | None) -> None:
        self.group.stages[self.prefix + name] = (payload, mask)
        if self.group.sink is not None:
            self.group.sink.stage(self.prefix + name, payload, mask)
        faults.point(f"stage:{name}")


@dataclass
class Group:
    """What a kind needs to run the cells of one trained-model group (one data, model, defense)."""

    trained: TrainedModel
    data: Data
    policy: DevicePolicy
    cache: ModelCache
    workdir: str
    batch_size: int | str
    version: str
    done: Mapping[str, Row]  #: finished rows of the group's cells, by cell key (resume)
    emit: OnRow  #: stores a row the moment it is measured
    measured: dict[str, Row] = field(default_factory=dict)  #: rows of this run, by key, in order
    stages: dict[str, Stage] = field(default_factory=dict)  #: stored stages of a killed evaluation (resume)
    sink: Sink | None = None  #: stores rows and stages as they are measured (None: returned rows only)
    prefix: str = ""  #: the group's stage-key prefix
    save_adv: str | None = None  #: a folder for the adversarial examples the group's attacks find (None: not kept)
    progress: Progress = field(default_factory=Progress.off)  #: where the kinds report their work (and the run's cells)

    def finished(self, key: str) -> None:
        """The cell ``key`` is measured (its row may be stored later, with its part's): the run's
        cell count advances."""
        self.progress.cell_done(key)

    def checkpoint(self, part: str) -> GroupCheckpoint:
        """The stages of one part of the group's work (e.g. an evaluation) as a checkpoint."""
        return GroupCheckpoint(self, part)

    def commit(self, rows: Sequence[Row], part: str | None = None) -> None:
        """Store ``rows`` in one transaction (all or none survive a kill), dropping the stages of
        ``part`` (the evaluation that produced them is done)."""
        for row, mask in rows:
            self.measured[row.key] = (row, mask)
            self.finished(row.key)
        if self.sink is not None:
            self.sink.rows(rows, None if part is None else f"{self.prefix}{part}/")
        faults.point(f"commit:{part or 'rows'}")

    def add(self, row: CellResult, mask: Any, *, emit: bool = True) -> Row:
        """Record a row of this run (and store it at once with ``emit``)."""
        if emit:
            self.emit(row, mask)
        self.measured[row.key] = (row, mask)
        self.finished(row.key)
        return row, mask

    def latest(self) -> dict[str, Row]:
        """Every row known for the group: stored ones, overridden by this run's."""
        return {**self.done, **self.measured}


class CellKind:
    """One kind of evaluation.  Subclasses set :attr:`row` and implement :meth:`measure` (one cell
    at a time; the base isolates errors and stores each row at once) or override :meth:`run`."""

    registry_name: ClassVar[str] = ""
    #: the kind's own columns: a frozen dataclass whose fields are its CSV columns, in order
    row: ClassVar[type | None] = None
    #: leaderboard sort: (column, ascending) pairs
    sort: ClassVar[tuple[tuple[str, bool], ...]] = ()
    #: run order inside a group (lower first); a kind that reads another's rows runs after it
    order: ClassVar[int] = 0
    #: where a grid file declares this kind's cells when not as ``[[extra]]`` (empty: in [[extra]])
    own_section: ClassVar[str] = ""
    #: table columns the terminal leaderboard leaves out (they are in the CSVs)
    hidden_in_terminal: ClassVar[tuple[str, ...]] = ("dataset", "attack_params", "error")

    @property
    def name(self) -> str:
        return self.registry_name

    # -- cells ----------------------------------------------------------------------------------
    def build(self, cell: Cell) -> Any:
        """What the cell runs (an attack by default), with the cell's threat."""
        return create_attack(cell.attack.name, norm=cell.threat.norm, eps=cell.threat.eps, **cell.attack.params)

    def summary_line(self, row: CellResult) -> str | None:
        """One line for the ``eval`` command's summary of ``row`` (None: the row is not summarised)."""
        return None

    def knows(self, method: str) -> bool:
        """Whether ``method`` names something this kind's cells can run (an attack by default)."""
        return method in ATTACKS

    def key_fields(self, cell: Cell) -> dict[str, Any]:
        """Extra fields of the cell's key (an attack's settings already hold its threat)."""
        return {}

    # -- running --------------------------------------------------------------------------------
    def run(self, cells: Sequence[Cell], group: Group) -> list[Row]:
        """Measure the group's pending cells of this kind, one at a time; a cell that raises is
        stored as an error row and the others go on."""
        rows = []
        for cell in cells:
            if cell.key in group.done:
                continue
            try:
                row, mask = self.measure(cell, group)
            except Exception as exc:
                log.warning("%s cell %s failed: %s", self.name, cell.attack.name, exc)
                error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
                row, mask = error_row(cell, error, group.version, model_key=group.trained.key), None
            rows.append(group.add(row, mask))
        return rows

    def measure(self, cell: Cell, group: Group) -> Row:
        """One cell's row and its per-point mask (or ``None``): build the row with :meth:`result`."""
        raise NotImplementedError(f"cell kind {self.name!r} must implement measure() or run()")

    def result(self, cell: Cell, group: Group, values: Any, *, method: Any = None, **envelope: Any) -> CellResult:
        """The store row of one measured cell: ``values`` (an instance of :attr:`row`) split into
        :class:`~robustbench_lite.harness.rows.CellResult` fields and ``metrics``, plus ``envelope`` fields set directly."""
        shared, metrics = split_metrics(dataclasses.asdict(values))
        fields = {
            "model_key": group.trained.key, "code_version": group.version,
            "train_seconds": group.trained.sidecar.get("train_seconds"), "metrics": metrics,
        }
        if method is not None:
            fields["attack_params"] = json.dumps(method.get_params(), sort_keys=True)
        return cell_row(cell, **{**fields, **shared, **envelope})

    def refresh(
        self, cells: Sequence[Cell], store: Store, labels: Callable[[], Tensor], proofs: Sequence[Proof] = ()
    ) -> None:
        """A group whose cells are all stored: recompute what is derived from them (nothing by
        default).  ``labels()`` loads the test labels of the group's dataset, when needed;
        ``proofs`` are every kind's per-point proofs over the group's stored rows."""

    def proofs(self, rows: Iterable[Row]) -> list[Proof]:
        """What this kind's stored rows among ``rows`` (a group's, with their masks) prove about
        single points (none by default): e.g. a verifier's certified and falsified points."""
        return []

    def check_saved(self, cells: Sequence[Cell], save_dir: str) -> None:
        """A finished group's cells under ``--save-adv save_dir``: say (a warning) which have no
        saved adversarial examples (they were computed by a run without it).  Nothing by default:
        only kinds that save examples check."""

    # -- tables ---------------------------------------------------------------------------------
    def tables(self, rows: Sequence[CellResult]) -> dict[str, pd.DataFrame]:
        """This kind's tables from all stored ``rows``: by default one per dataset
        (``<dataset>_<kind>``) with model, defense, attack and the fields of :attr:`row`, then the
        status and the first line of any error, sorted by :attr:`sort`.  Fields whose name starts
        with ``_`` are private (stored, e.g. per-point values, but not in the tables).  Models that
        share display names get distinguishing labels (``harness.identity.distinguish``)."""
        if self.row is None:
            return {}
        columns = [f.name for f in dataclasses.fields(self.row) if not f.name.startswith("_")]  # "_": private
        by_dataset: dict[str, list[dict[str, Any]]] = {}
        for r in rows_of_kind(distinguish(rows), self.name):
            metrics = json.loads(r.metrics) if r.metrics else {}
            values = r.as_row()
            out = {"dataset": r.dataset, "model": r.model, "defense": r.defense, "attack": r.attack}
            for col in columns:
                value = metrics.get(col, values.get(col))
                out[col] = float("nan") if value is None else value
            out["status"] = r.status
            out["error"] = r.error.splitlines()[0][:200] if r.error else ""
            by_dataset.setdefault(r.dataset, []).append(out)
        tables = {}
        for dataset, table_rows in sorted(by_dataset.items()):
            table = pd.DataFrame(table_rows)
            if self.sort:
                cols, ascending = zip(*self.sort, strict=True)
                table = table.sort_values(list(cols), ascending=list(ascending), na_position="last", kind="stable")
            tables[f"{dataset}_{self.name}"] = table.reset_index(drop=True)
        return tables

    def wide_columns(self, rows: Sequence[CellResult]) -> dict[tuple, dict[str, Any]]:
        """Columns this kind adds, from all stored ``rows``, to the evasion tables, keyed by
        ``wide_key`` of its rows (after ``harness.identity.distinguish``:
        one model, not one display name): e.g. the certified share beside the attacked worst
        case.  A ``flags`` entry (a set) joins the row's flags."""
        return {}


def wide_key(row: CellResult) -> tuple:
    """Where a row's numbers go in the evasion tables: (dataset, model_id, n, norm, eps), the
    model by its identity (its ``model_id``, filled in by ``harness.identity.distinguish``)."""
    return (row.dataset, row.model_id, row.n, row.norm, row.eps)


def kind(name: str) -> CellKind:
    """The registered cell kind ``name`` (an instance; kinds hold no state)."""
    return KINDS.get(name)()


def proofs_of(rows: Iterable[Row]) -> list[Proof]:
    """Every registered kind's proofs over a group's ``rows`` (each kind reads its own)."""
    rows = list(rows)
    return [p for name in KINDS.list() for p in kind(name).proofs(rows)]


def rows_of_kind(rows: Iterable[CellResult], name: str) -> list[CellResult]:
    """The rows of one kind."""
    return [r for r in rows if r.kind == name]
