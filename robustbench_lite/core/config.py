"""Frozen, validated settings shared by every plugin, and stable config hashes.

Settings are dataclass fields declared with :func:`setting`; :func:`validate_settings` checks
type and bounds of every one at construction (:class:`Plugin` does it for attacks, defenses and
verifiers), so plugins never write those checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}

#: the largest value of an int setting that declares no ``high`` of its own: a count of steps,
#: epochs, queries or samples beyond a million is a typo (such a run would not finish), so it is
#: refused while the settings are read rather than discovered hours into a run
MAX_INT = 1_000_000
#: the largest seed (torch and numpy generators take 64-bit seeds)
MAX_SEED = 2**63 - 1


def setting(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: tuple[Any, ...] | None = None,
    keep_keys: bool = False,
) -> Any:
    """A dataclass field whose type and bounds are checked when the object is built.

    ``low``/``high`` are inclusive (``low_open=True`` makes ``low`` exclusive); ``choices``
    lists the allowed values.  The field's annotation (int, float, bool, str) is enforced.  An
    int setting without ``high`` is at most ``MAX_INT``; one that needs more (seeds, Monte
    Carlo samples) says so with its own ``high``.

    ``keep_keys=True`` marks a setting added to a plugin after results were stored: at its default
    it is left out of ``params_of`` (hence of every cell key and cache key), so the stored
    results of the plugin keep their keys and a rerun resumes instead of recomputing them.
    """
    meta = {"low": low, "high": high, "low_open": low_open, "choices": choices, "keep_keys": keep_keys}
    return field(default=default, metadata={"rbl": meta})


def validate_settings(obj: Any, owner: str) -> None:
    """Check every :func:`setting` field of a dataclass instance; raise naming the fix."""
    for f in dataclasses.fields(obj):
        meta = f.metadata.get("rbl")
        if meta is not None:
            _check(owner, f.name, _TYPES.get(str(f.type), f.type), getattr(obj, f.name), meta)


def _check(owner: str, name: str, typ: Any, value: Any, meta: dict) -> None:
    if typ is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fix = f"; write {int(value)}" if isinstance(value, float) and value.is_integer() else ""
            raise TypeError(f"{owner}: {name} must be an int, got {value!r}{fix}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    elif typ is str and not isinstance(value, str):
        raise TypeError(f"{owner}: {name} must be a string, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"{owner}: {name} must be one of {list(meta['choices'])}, got {value!r}")
    low, high = meta["low"], meta["high"]
    if high is None and typ is int:
        high = MAX_INT
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        raise ValueError(f"{owner}: {name} must be {'>' if meta['low_open'] else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{owner}: {name} must be <= {high}, got {value!r}")


def params_of(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as JSON-able values (enums as their value); a ``keep_keys`` setting at
    its default is left out."""
    return {
        f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
        if not (f.metadata.get("rbl", {}).get("keep_keys") and getattr(obj, f.name) == f.default)
    }


def _plain(v: Any) -> Any:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, (list, tuple)):
        return [_plain(i) for i in v]
    if isinstance(v, dict):
        return {str(k): _plain(i) for k, i in v.items()}
    return v


def config_hash(payload: Any, length: int = 16) -> str:
    """A stable hex digest of a JSON-able payload (keys sorted)."""
    text = json.dumps(_plain(payload), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True, kw_only=True)
class Plugin:
    """The base of every registered settings class (attacks, defenses, verifiers): a frozen
    dataclass whose :func:`~robustbench_lite.setting` fields are checked at construction, named after its registry
    entry, with its settings visible as plain values (:meth:`get_params`)."""

    registry_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        validate_settings(self, self.name)

    @property
    def name(self) -> str:
        return self.registry_name or type(self).__name__.lower()

    def get_params(self) -> dict[str, Any]:
        """All settings as plain JSON-able values (enums as strings)."""
        return params_of(self)
