"""The typed result row: one :class:`CellResult` per evaluated cell.

``dataclasses.asdict`` gives the store row and the CSV row; nothing else builds rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..core.config import config_hash

if TYPE_CHECKING:
    import pandas as pd

    from .plan import Cell

WORST_CASE = "worst_case"
SKIPPED = "skipped"  # status of a cell whose attack needs more of the model than it gives (the note in ``error``)
FINISHED = frozenset({"ok", SKIPPED})  # statuses a rerun does not compute again


@dataclass(frozen=True)
class CellResult:
    dataset: str
    model: str
    defense: str
    attack: str  # registry name, or "worst_case" for the per-point minimum over a threat's attacks
    norm: str
    eps: float
    kind: str  # the cell kind: evasion | universal | sparse | poisoning | certified | a plugin's
    n: int  # evaluated points
    clean_acc: float  # fraction of the n points classified correctly
    robust_acc: float | None  # fraction correct and not broken by this attack
    seconds: float  # attack wall time
    grad_evals: int  # input-gradient evaluations (images)
    forward_evals: int  # forward evaluations (images)
    attacked: int  # points the attack ran on (clean-correct, or survivors)
    scope: str  # "all" clean-correct points, or "survivors" of cheaper attacks
    target_hit_rate: float | None  # targeted attacks: share of attacked points sent to the target class
    success_rate: float | None  # min-norm attacks (cw-l2): share of attacked points with any adversarial
    median_l2: float | None  # min-norm attacks: median L2 distance of the adversarials found
    flags: str  # ';'-separated codes from eval.flags.FLAGS
    status: str  # ok | error | skipped
    error: str  # the error, or why the cell was skipped
    train_seconds: float | None
    attack_params: str  # JSON of the attack's settings
    key: str  # the cell's config hash (store key)
    model_key: str  # the trained model's cache key
    code_version: str
    # a kind's own numbers that are not fields here (JSON object; "" for evasion): the fields of the
    # kind's row type (see harness.kinds). Defaulted, so rows stored before it existed still load.
    metrics: str = ""
    # the measured model's identity (see harness.identity): the hash of its data, architecture and
    # settings, and defense and settings (or weights hash), and those facts as a JSON object. Rows
    # stored before they existed load with "" (tables then resolve them from model_key or names).
    model_id: str = ""
    identity: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CellResult:
        """A row read back (from the store): every field checked for its type, accuracies for
        [0, 1], counts and seconds for >= 0, ``status`` for ok/error, the JSON fields for a JSON
        object; a row that fails raises ``ValueError``/``TypeError`` naming the field.  Unknown
        keys are ignored and defaulted fields may be missing (rows of older versions)."""
        if not isinstance(row, dict):
            raise TypeError(f"a stored row must be a JSON object, got {type(row).__name__}")
        values = {}
        for f in fields(cls):
            if f.name not in row:
                if f.default is MISSING:
                    raise ValueError(f"the stored row lacks the field {f.name!r}")
                continue
            values[f.name] = _checked(f.name, str(f.type), row[f.name])
        return cls(**values)


_UNIT = frozenset({"clean_acc", "robust_acc"})  # accuracies: in [0, 1] (NaN: not measured)
_STATUS = FINISHED | {"error"}
_JSON_OBJECTS = frozenset({"metrics", "identity"})


def _checked(name: str, typ: str, value: Any) -> Any:
    """``value`` of the field ``name`` (annotated ``typ``) as read back, or ``ValueError``/
    ``TypeError`` naming what is wrong."""
    if typ.endswith("| None"):
        if value is None:
            return None
        typ = typ.removesuffix("| None").strip()
    bad = f"the stored row's {name} is {value!r:.60}"
    if typ == "str":
        if not isinstance(value, str):
            raise TypeError(f"{bad}, which must be a string")
        if name == "status" and value not in _STATUS:
            raise ValueError(f"{bad}, which must be one of {sorted(_STATUS)}")
        if name in _JSON_OBJECTS and value:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError(f"{bad}, which must be empty or a JSON object")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{bad}, which must be a number")
    if typ == "int":
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{bad}, which must be a whole number")
        value = int(value)
    else:
        value = float(value)
    if math.isnan(value):
        return value  # a float not measured
    if name in _UNIT and not 0.0 <= value <= 1.0:
        raise ValueError(f"{bad}, which must be a share in [0, 1]")
    if value < 0:
        raise ValueError(f"{bad}, which must be >= 0")
    return value


def model_identity(cell: Cell) -> dict[str, str]:
    """The ``model_id`` and ``identity`` fields of ``cell``'s rows: everything that makes the model
    it measures (the data spec, the model spec with its settings, the defense spec with its settings;
    for a user's checkpoint the weights' SHA-256), hashed, and the same facts as JSON plus where a
    user's weights file lies (not hashed: the same bytes elsewhere are the same model)."""
    facts: dict[str, Any] = {"data": cell.data.as_dict(), "model": cell.model.as_dict(), "defense": cell.defense.as_dict()}
    model_id = config_hash(facts)
    weights = getattr(cell.defense, "path", "")
    if weights:
        facts["weights"] = str(weights)
    return {"model_id": model_id, "identity": json.dumps(facts, sort_keys=True, default=str)}


def cell_row(cell: Cell, *, attack_params: str | None = None, **values: Any) -> CellResult:
    """A row for ``cell``: its identity (dataset, model, defense, attack, threat, kind, n, key, and
    :func:`model_identity`) from the cell, every measurement from ``values`` (the ones not given are
    empty)."""
    row = {
        "dataset": cell.data.name, "model": cell.model.name, "defense": cell.defense.name, "attack": cell.attack.name,
        "norm": cell.threat.norm.value, "eps": cell.threat.eps, "kind": cell.kind, "n": cell.n,
        "clean_acc": float("nan"), "robust_acc": None, "seconds": 0.0, "grad_evals": 0, "forward_evals": 0,
        "attacked": 0, "scope": "all", "target_hit_rate": None, "success_rate": None, "median_l2": None, "flags": "",
        "status": "ok", "error": "", "train_seconds": None,
        "attack_params": attack_params if attack_params is not None else json.dumps(cell.attack.params, sort_keys=True),
        "key": cell.key, "model_key": "", "code_version": "", **model_identity(cell),
    }
    unknown = set(values) - set(row) - {"metrics"}
    if unknown:
        raise TypeError(f"cell_row: unknown fields {sorted(unknown)}")
    row.update(values)
    return CellResult(**row)


def error_row(cell: Cell, error: str, version: str = "", model_key: str = "") -> CellResult:
    """The stored row of a cell that raised or could not run (retried on the next run), filed
    under its kind."""
    return cell_row(cell, status="error", error=error[:4000], model_key=model_key, code_version=version)


RESULT_FIELDS = frozenset(f.name for f in fields(CellResult))


def split_metrics(values: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A kind's row values split into the :class:`CellResult` fields and the JSON ``metrics`` of the
    others (non-finite numbers stored as null: JSON has no NaN)."""
    shared = {k: v for k, v in values.items() if k in RESULT_FIELDS}
    extra = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in values.items() if k not in RESULT_FIELDS
    }
    return shared, json.dumps(extra)


Row = tuple[CellResult, Tensor | None]  # a store row and its per-point mask (robust, or certified)
OnRow = Callable[[CellResult, Tensor | None], None]


def long_table(rows: Sequence[CellResult]) -> pd.DataFrame:
    """The rows as one table (``cells.csv``'s order: per dataset, threat and model, each model's
    attacks cheapest first and its worst case last)."""
    import pandas as pd  # only the tables need pandas

    df = pd.DataFrame([r.as_row() for r in rows])
    if df.empty:
        return df
    df["_wc"] = df["attack"] == WORST_CASE
    df = df.sort_values(["dataset", "norm", "eps", "model", "defense", "_wc", "grad_evals", "attack"], kind="stable")
    return df.drop(columns="_wc").reset_index(drop=True)
