"""Which model a row measures, and the label that tells it apart from another of the same name.

A leaderboard row is one model.  What makes a model is its data (dataset, ``train_limit``,
``val_fraction``; a user's data by its content hash), its architecture with its settings, and its
defense with its settings (a user's checkpoint by the SHA-256 of its weights).  Every row stores
these facts (``identity``, JSON) and their hash (``model_id``, see
:func:`~robustbench_lite.harness.rows.model_identity`); every kind's tables group rows by
``model_id``, never by the display names ``model`` and ``defense`` alone, so two models that share
a name are two rows, not one row mixing their numbers.

:func:`distinguish` keeps a display name wherever it names one model of a dataset.  Where several
share it, each gets what sets it apart, and only that: ``small-cnn(width=8)`` beside ``small-cnn``,
``pgd-at(epochs=5)``, ``small-cnn(train_limit=500)``, a weights file's parent folders
(``run2/model.pt`` beside ``run1/model.pt``), or its hash (``model.pt@1a2b3c4d``) when the file
itself changed.

Rows stored before identities were recorded have empty fields.  They take the identity of a newer
row of the same trained model (same ``model_key``), else of the only model stored under their
names, else (an old store that mixed models under one name) their trained model's cache key
(labelled ``small-cnn#0fc617ac``), else one identity per display names, as every row had before.
An old row without a cache key records a model whose training failed: it is kept apart from the
trained model of its names (``small-cnn#untrained``), whose row must not take its error flags.
A rerun of their grid on the workdir stores their full identity
(:func:`~robustbench_lite.harness.run.run_plan`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import PurePath
from typing import Any

from ..core.config import config_hash
from .rows import CellResult

LEGACY = "names:"  # prefix of the model_id of an old row known only by its display names
KEYED = "key:"  # prefix of the model_id of old rows known by their trained model's cache key
UNTRAINED = "untrained:"  # prefix of the model_id of old rows of a model whose training failed
_DATA_DEFAULTS = {"train_limit": None, "val_fraction": 0.0}  # not shown at these values
_ABSENT = "\0absent"
_HEX = re.compile(r"([0-9a-f]{8})[0-9a-f]{8,}")


def distinguish(rows: Iterable[CellResult]) -> list[CellResult]:
    """``rows`` with every ``model_id`` filled in (old rows resolved, see the module docstring) and
    ``model``/``defense`` replaced by labels that tell apart the models of a dataset sharing them.
    Idempotent, and the order of ``rows`` is kept."""
    rows = _resolved(list(rows))
    labels = _labels(rows)
    out = []
    for r in rows:
        label = labels.get((r.dataset, r.model, r.defense, r.model_id))
        out.append(r if label is None else dataclasses.replace(r, model=label[0], defense=label[1]))
    return out


# -- old rows ---------------------------------------------------------------------------------------
def _resolved(rows: list[CellResult]) -> list[CellResult]:
    """Every row with a ``model_id``; an old row (none stored) takes, in this order: the identity of
    a newer row with its ``model_key``; the one trained model its display names hold (the newer
    rows' identities and the model keys that several old rows share: a model's rows share its
    cache key; a poisoning row's own retrained model has a key of its own); its model key when
    that is shared but the names hold several models (an old store that mixed two models under one
    name: they stay apart, labelled by their keys); else its display names, as every row had."""
    if all(r.model_id for r in rows):
        return rows
    by_key: dict[tuple[str, str], tuple[str, str]] = {}
    known: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        if r.model_id:
            if r.model_key:
                by_key.setdefault((r.dataset, r.model_key), (r.model_id, r.identity))
            known.setdefault((r.dataset, r.model, r.defense), {})[r.model_id] = r.identity
    old_keys: dict[tuple[str, str, str], dict[str, int]] = {}
    for r in rows:
        if not r.model_id and r.model_key and (r.dataset, r.model_key) not in by_key:
            counts = old_keys.setdefault((r.dataset, r.model, r.defense), {})
            counts[r.model_key] = counts.get(r.model_key, 0) + 1
    out = []
    for r in rows:
        if not r.model_id:
            names = (r.dataset, r.model, r.defense)
            hit = by_key.get((r.dataset, r.model_key)) if r.model_key else None
            if hit is None and not r.model_key:  # no model was trained: never another model's row
                hit = (UNTRAINED + config_hash(list(names)), "")
            if hit is None:
                shared = {KEYED + k: "" for k, n in old_keys.get(names, {}).items() if n > 1}
                candidates = {**known.get(names, {}), **shared}
                if KEYED + r.model_key in shared and len(candidates) > 1:
                    hit = (KEYED + r.model_key, "")
                elif len(candidates) == 1:
                    hit = next(iter(candidates.items()))
                else:
                    hit = (LEGACY + config_hash(list(names)), "")
            r = dataclasses.replace(r, model_id=hit[0], identity=hit[1])
        out.append(r)
    return out


# -- labels -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Facts:
    model: dict[str, Any]  # data and architecture settings, shown in the model column
    defense: dict[str, Any]  # the defense's settings, shown in the defense column
    weights: str | None  # a user's weights file
    sha256: str | None  # a user's weights hash


def _facts(identity: str) -> _Facts:
    doc = json.loads(identity) if identity else {}
    data, model, defense = doc.get("data") or {}, doc.get("model") or {}, doc.get("defense") or {}
    shown = {k: v for k, v in data.items() if k != "name" and _DATA_DEFAULTS.get(k, _ABSENT) != v}
    shown.update({k: v for k, v in model.items() if k not in ("name", "kwargs")})
    shown.update(model.get("kwargs") or {})
    params = dict(defense.get("params") or {})
    sha = params.pop("sha256", None)
    return _Facts(shown, params, doc.get("weights"), sha)


def _labels(rows: Sequence[CellResult]) -> dict[tuple[str, str, str, str], tuple[str, str]]:
    """``(dataset, model, defense, model_id) -> (model label, defense label)`` for the models that
    share their dataset and display names with another (the others keep their names)."""
    buckets: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        buckets.setdefault((r.dataset, r.model, r.defense), {}).setdefault(r.model_id, r.identity)
    out: dict[tuple[str, str, str, str], tuple[str, str]] = {}
    for (dataset, model, defense), ids in buckets.items():
        if len(ids) > 1:
            facts = {mid: _facts(text) if text else None for mid, text in ids.items()}
            out.update({(dataset, model, defense, mid): label
                        for mid, label in _bucket_labels(model, defense, facts).items()})
    return out


def _bucket_labels(model: str, defense: str, facts: dict[str, _Facts | None]) -> dict[str, tuple[str, str]]:
    """The labels of the models sharing ``model`` and ``defense`` (``None``: an old row's model,
    whose settings were not recorded: labelled by its id, never by settings it may not have)."""
    known = {mid: f for mid, f in facts.items() if f is not None}
    model_keys = _differing([f.model for f in known.values()])
    defense_keys = _differing([f.defense for f in known.values()])
    paths = {mid: f.weights for mid, f in known.items() if f.weights}
    by_path = _path_labels(paths, defense) if len({_canon(p) for p in paths.values()}) > 1 else {}
    show_sha = not model_keys and not defense_keys and not by_path
    labels = {}
    for mid, f in facts.items():
        if f is None:
            labels[mid] = (f"{model}#{_short_id(mid)}", defense)
            continue
        m = _with_settings(model, f.model, model_keys)
        d = _with_settings(by_path.get(mid, defense), f.defense, defense_keys)
        if show_sha and f.sha256 and len(known) > 1:
            d = f"{d}@{f.sha256[:8]}"
        labels[mid] = (m, d)
    seen: dict[tuple[str, str], int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    for mid, (m, d) in list(labels.items()):
        if seen[(m, d)] > 1:  # nothing recorded tells them apart: the id does
            labels[mid] = (f"{m}#{_short_id(mid)}", d)
    return labels


def _short_id(model_id: str) -> str:
    if model_id.startswith(LEGACY):
        return "legacy"
    if model_id.startswith(UNTRAINED):
        return "untrained"
    return model_id.removeprefix(KEYED)[:8]


def _differing(dicts: list[dict[str, Any]]) -> list[str]:
    keys = sorted(set().union(*dicts))
    return [k for k in keys if len({_canon(d.get(k, _ABSENT)) for d in dicts}) > 1]


def _canon(value: Any) -> str:
    return value if value is _ABSENT else json.dumps(value, sort_keys=True, default=str)


def _with_settings(name: str, values: dict[str, Any], keys: list[str]) -> str:
    shown = [f"{k}={_fmt(values[k])}" for k in keys if values.get(k) is not None]
    return f"{name}({','.join(shown)})" if shown else name


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    text = _HEX.sub(r"\1", text)  # hashes: their first 8 hex digits
    return text if len(text) <= 40 else text[:39] + "…"


def _path_labels(paths: dict[str, str], name: str) -> dict[str, str]:
    """Per weights file: its parent folder and name, with as many more folders as it takes for no
    other path of the bucket to end the same way (``run2/model.pt``); a display name other than
    the file's name is kept, with that path after it."""
    parts = {mid: PurePath(p).parts for mid, p in paths.items()}
    out = {}
    for mid, mine in parts.items():
        others = [p for m, p in parts.items() if m != mid and p != mine]
        k = min(2, len(mine))
        while k < len(mine) and any(p[-k:] == mine[-k:] for p in others):
            k += 1
        suffix = str(PurePath(*mine[-k:]))
        out[mid] = suffix if mine[-1] == name else f"{name}({suffix})"
    return out
