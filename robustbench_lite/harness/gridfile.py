"""Grids as data: a TOML file declares a benchmark grid, and :func:`load_grid` turns it into a
:class:`FilePreset` (a :class:`~robustbench_lite.harness.presets.Preset` plus robustness curves).

The built-in presets are such files (``robustbench_lite/presets/*.toml``; ``robustbench-lite
list presets`` prints where): copy one, edit it, run it with ``robustbench-lite run --config
my.toml``.  Everything is checked while the file is read, before any work: unknown keys, unknown
names (datasets, models, defenses, attacks, kinds), wrong types, bad settings and eps outside its
range each raise a ``ValueError`` naming the file, the key and the fix.  The keys::

    name = "my-grid"            # default: the file's stem
    description = "..."
    n = 1000                    # test points per cell
    survivors = false           # strong attacks only on the points cheaper ones left

    [[datasets]]                # name = a registered dataset (train_limit, val_fraction), or
    name = "fashion-mnist"      # path = a folder / .npz of evaluation points (models with weights only)
    [[models]]                  # name = registry name, timm:NAME or file.py:build; kwargs = {...}
    name = "small-cnn"          # weights = "m.safetensors" (+ normalize = {mean, std}, num_classes,
                                # trust_pickle): evaluated as given, not trained by the defenses;
                                # trust_pickle = true also needs --trust-pickle on the command line
    [[defenses]]                # name + the defense's settings, flat
    name = "pgd-at"
    epochs = 2
    [[threats]]                 # threat = "NORM:EPS" (or norm, eps); attacks = names, {name, settings}
    threat = "linf:0.1"         # tables, or a set name (quick, standard, full)
    attacks = ["fgsm", { name = "pgd", steps = 10 }]
    [[paired]]                  # a model trained only by its own defense
    model = { name = "one-hidden-relu", kwargs = { hidden = 400 } }
    defense = { name = "convex-robust", eps = 0.1 }
    [[extra]]                   # cells outside the grid, on the named defenses (kind: e.g. certified)
    defenses = ["standard"]
    threat = "l0:1"
    attacks = [{ name = "one-pixel", generations = 20 }]
    n = 100
    [[curves]]                  # robust accuracy over eps: curve = "NORM:START:STOP:COUNT" or
    curve = "linf:0:0.2:11"     # norm + eps = [..]; attacks as in threats; n (default: n);
                                # order = "up" (default) or "down" (AttackBench's search)
    attacks = ["fgsm", "pgd"]

TOML comes from the standard library's ``tomllib`` (Python 3.11+); on Python 3.10 the package
depends on ``tomli``, the same parser published separately.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.models import ModelSpec
from ..core.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from ..core.threat import Norm, ThreatModel
from .attack_sets import SETS, attack_specs
from .grid import Extra, Preset
from .plan import Cell, Plan
from .specs import AttackSpec, DataSpec, DefenseSpec

_TOP = ("name", "description", "n", "survivors", "datasets", "models", "defenses", "threats", "paired", "extra", "curves")
_KEYS = {
    "datasets": ("name", "path", "train_limit", "val_fraction", "channels"),
    "models": ("name", "kwargs", "weights", "normalize", "num_classes", "trust_pickle"),
    "threats": ("threat", "norm", "eps", "attacks"),
    "paired": ("model", "defense"),
    "extra": ("defenses", "threat", "norm", "eps", "attacks", "n", "kind"),
    "curves": ("curve", "norm", "eps", "attacks", "n", "order"),
}


def toml_loads(text: str) -> dict[str, Any]:
    """Parse TOML with ``tomllib`` (or ``tomli`` on Python 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ValueError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    return tomllib.loads(text)


@dataclass(frozen=True)
class CurveSpec:
    """A curve of a grid file: the attacks' robust accuracy at every eps of ``grid`` (positive)."""

    norm: Norm
    grid: tuple[float, ...]
    attacks: tuple[AttackSpec, ...]
    n: int | None = None
    order: str = "up"


@dataclass(frozen=True)
class FilePreset(Preset):
    """A preset read from a TOML file, with its curves."""

    curves: tuple[CurveSpec, ...] = ()
    source: str = ""

    def plan(self, *, attacks: Sequence[str] | None = None, threats: Sequence[ThreatModel] | None = None,
             n: int | None = None, defenses: Sequence[str] | None = None,
             datasets: Sequence[str] | None = None) -> Plan:
        base = ()
        if self.grid or self.extra or not self.curves:
            base = super().plan(attacks=attacks, threats=threats, n=n, defenses=defenses, datasets=datasets).cells
        if not self.curves:
            return Plan(self.name, base)
        from .kinds.curve import CurveCell

        defense_specs, paired = self.defenses, self.paired
        if defenses is not None:
            defense_specs = tuple(d for d in self.defenses if d.name in defenses)
            paired = tuple((m, d) for m, d in self.paired if d.name in defenses)
        combos = [(m, d) for m in self.models for d in defense_specs] + list(paired)
        data_specs = self.data if datasets is None else tuple(DataSpec(name) for name in datasets)
        cells = list(base)
        for data in data_specs:
            for model, defense in combos:
                for curve in self.curves:
                    specs = curve.attacks if attacks is None else tuple(AttackSpec(a) for a in attacks)
                    for att in specs:
                        if att.supports(ThreatModel(curve.norm, curve.grid[-1])):
                            cells.append(CurveCell(data, model, defense, att, ThreatModel(curve.norm, curve.grid[-1]),
                                                   n or curve.n or self.n, kind="curve", grid=curve.grid,
                                                   order=curve.order))
        if not cells:
            raise ValueError(f"{self.source or self.name}: the plan has no cells")
        return Plan(self.name, tuple(cells))


class GridError(ValueError):
    """A problem in a grid file: ``<file>: <key>: <problem>; <fix>``."""


def load_grid(path: str | Path, *, data_root: str | Path | None = None, trust_pickle: bool = False) -> FilePreset:
    """Read and check a grid file; every problem raises :class:`GridError` before any work.

    A model's ``trust_pickle = true`` (unpickle its checkpoint: that runs any code the file names)
    takes effect only when the caller passes ``trust_pickle=True`` too (the CLI's
    ``--trust-pickle``): a grid file someone shared cannot switch it on by itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        doc = toml_loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is not TOML: drop it
    except UnicodeDecodeError:
        raise GridError(f"{path.name}: not a UTF-8 text file; write the config as TOML text") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise GridError(f"{path.name}: malformed TOML: {exc}; fix the syntax (https://toml.io)") from None
    return _Reader(path, data_root, trust_pickle).preset(doc)


class _Reader:
    def __init__(self, path: Path, data_root: str | Path | None, trust_pickle: bool = False) -> None:
        self.path, self.data_root, self.trust_pickle = path, data_root, trust_pickle
        self._data: dict[int, Any] = {}

    def fail(self, where: str, problem: str) -> GridError:
        return GridError(f"{self.path.name}: {where}: {problem}")

    # -- small checks ---------------------------------------------------------------------------
    def keys(self, table: Any, allowed: Sequence[str], where: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, f"must be a table ({{...}} or [[...]]), got {type(table).__name__}")
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
                raise self.fail(f"{where}.{key}", f"unknown key; {hint}")
        return table

    def typed(self, value: Any, typ: type | tuple, where: str, what: str) -> Any:
        ok = isinstance(value, typ) and not (isinstance(value, bool) and typ in (int, float, (int, float)))
        if not ok:
            raise self.fail(where, f"must be {what}, got {value!r}")
        return value

    def positive_int(self, value: Any, where: str) -> int:
        self.typed(value, int, where, "a whole number >= 1")
        if value < 1:
            raise self.fail(where, f"must be >= 1, got {value}")
        return value

    def section(self, doc: dict, key: str) -> list:
        """The tables of ``[[key]]`` (none if absent)."""
        return self.array(doc.get(key, []), key)

    def array(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise self.fail(where, f"must be an array [[...]] or [...], got {type(value).__name__}")
        return value

    def threat(self, table: dict, where: str) -> ThreatModel:
        from .user import parse_number, parse_threat

        try:
            if "threat" in table:
                return parse_threat(self.typed(table["threat"], str, f"{where}.threat", 'a string "NORM:EPS"'))
            if "norm" in table and "eps" in table:
                eps = table["eps"]
                value = parse_number(eps) if isinstance(eps, str) else self.typed(eps, (int, float), f"{where}.eps", "a number")
                return ThreatModel(Norm.parse(self.typed(table["norm"], str, f"{where}.norm", "a string")), value)
        except GridError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.fail(f"{where}.threat", str(exc)) from None
        raise self.fail(where, 'needs threat = "NORM:EPS" (e.g. "linf:0.1"), or norm and eps')

    # -- sections -------------------------------------------------------------------------------
    def preset(self, doc: dict) -> FilePreset:
        self.keys(doc, _TOP, "top level")
        name = self.typed(doc.get("name", self.path.stem), str, "name", "a string")
        if not name.strip() or name.strip(".") == "" or any(c in "/\\" or not c.isprintable() for c in name):
            raise self.fail("name", f"{name!r} is not a usable grid name (no path separators, control characters, "
                            "or only dots); name the grid with words, e.g. name = \"my-grid\"")
        description = self.typed(doc.get("description", ""), str, "description", "a string")
        if "n" not in doc:
            raise self.fail("n", "missing; set the number of test points, e.g. n = 1000")
        n = self.positive_int(doc["n"], "n")
        survivors = self.typed(doc.get("survivors", False), bool, "survivors", "true or false")
        data = tuple(self.dataset(t, f"datasets[{i}]") for i, t in enumerate(self.section(doc, "datasets")))
        if not data:
            raise self.fail("datasets", 'missing; add [[datasets]] with name = "fashion-mnist" (or path = ...)')
        trained, own = [], []
        for i, t in enumerate(self.section(doc, "models")):
            spec = self.model(t, f"models[{i}]", data)
            (own if isinstance(spec, tuple) else trained).append(spec)
        defenses = tuple(self.defense(t, f"defenses[{i}]") for i, t in enumerate(self.section(doc, "defenses")))
        paired = tuple(self.pair(t, f"paired[{i}]") for i, t in enumerate(self.section(doc, "paired")))
        if trained and not defenses:
            raise self.fail("defenses", "missing; models without weights need a [[defenses]] entry (e.g. standard)")
        if any(hasattr(d, "fingerprint") for d in data) and (trained or paired):
            raise self.fail("datasets", "a path dataset holds evaluation points only; train models on a registered "
                            "dataset, or give every model its weights")
        grid = tuple(self.grid(t, f"threats[{i}]") for i, t in enumerate(self.section(doc, "threats")))
        extra = tuple(self.extra(t, f"extra[{i}]") for i, t in enumerate(self.section(doc, "extra")))
        curves = tuple(self.curve(t, f"curves[{i}]") for i, t in enumerate(self.section(doc, "curves")))
        known = {d.name for d in defenses} | {d.name for _, d in paired}
        for i, ex in enumerate(extra):
            for d in ex.defenses:
                if d not in known:
                    raise self.fail(f"extra[{i}].defenses", f"{d!r} is not a defense of this file ({sorted(known)})")
        preset = FilePreset(name=name, description=description, data=data, models=tuple(trained), defenses=defenses,
                            grid=grid, n=n, survivors=survivors, paired=paired + tuple(own), extra=extra, curves=curves,
                            source=self.path.name)
        try:
            preset.plan()
        except (ValueError, TypeError, KeyError) as exc:
            raise self.fail("grid", f"{exc.args[0] if exc.args else exc}") from None
        return preset

    def dataset(self, table: Any, where: str) -> DataSpec:
        from .user import resolve_data

        t = self.keys(table, _KEYS["datasets"], where)
        if ("name" in t) == ("path" in t):
            raise self.fail(where, 'give either name = "<registered dataset>" or path = "<folder or .npz>"')
        if "path" in t:
            p = self.typed(t["path"], str, f"{where}.path", "a string")
            channels = t.get("channels")
            if channels is not None and channels not in (1, 3):
                raise self.fail(f"{where}.channels", f"must be 1 or 3, got {channels!r}")
            full = Path(p) if Path(p).is_absolute() else self.path.parent / p
            try:
                spec, data = resolve_data(str(full), channels=channels)
            except (ValueError, TypeError, FileNotFoundError) as exc:
                raise self.fail(f"{where}.path", str(exc)) from None
            self._data[id(spec)] = data
            return spec
        name = self.typed(t["name"], str, f"{where}.name", "a string")
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS.list(), n=1)
            raise self.fail(f"{where}.name", f"unknown dataset {name!r}; " + (f"did you mean {close[0]!r}?" if close else
                            f"registered: {', '.join(DATASETS.list())}"))
        limit = t.get("train_limit")
        if limit is not None:
            self.positive_int(limit, f"{where}.train_limit")
        frac = t.get("val_fraction", 0.0)
        self.typed(frac, (int, float), f"{where}.val_fraction", "a number in [0, 1)")
        if not 0 <= frac < 1:
            raise self.fail(f"{where}.val_fraction", f"must be in [0, 1), got {frac}")
        return DataSpec(name, limit, float(frac))

    def model(self, table: Any, where: str, data: tuple[DataSpec, ...]) -> ModelSpec | tuple:
        from .user import prepare

        t = self.keys(table, _KEYS["models"], where)
        name = self.typed(t.get("name", ""), str, f"{where}.name", "a string")
        kwargs = self.typed(t.get("kwargs", {}), dict, f"{where}.kwargs", "a table of the model's arguments")
        if "weights" not in t:
            for k in ("normalize", "num_classes", "trust_pickle"):
                if k in t:
                    raise self.fail(f"{where}.{k}", "only for a model with weights; add weights = \"model.safetensors\"")
            if not name:
                raise self.fail(f"{where}.name", 'missing; e.g. name = "small-cnn"')
            if not (name.startswith("timm:") or name in MODELS):
                close = difflib.get_close_matches(name, MODELS.list(), n=1)
                raise self.fail(f"{where}.name", f"unknown model {name!r}; " + (f"did you mean {close[0]!r}?" if close
                                else f"registered: {', '.join(MODELS.list())}, or timm:NAME"))
            return ModelSpec(name, dict(kwargs))
        weights = self.typed(t["weights"], str, f"{where}.weights", "a path string")
        trust = self.typed(t.get("trust_pickle", False), bool, f"{where}.trust_pickle", "true or false")
        if trust and not self.trust_pickle:
            raise self.fail(f"{where}.trust_pickle", "a grid file cannot allow unpickling by itself (unpickling runs any "
                            "code the checkpoint names, and a shared file could ask for it); pass --trust-pickle on the "
                            "command line as well, only for a checkpoint from a source you trust, or save a state dict")
        wpath = Path(weights) if Path(weights).is_absolute() else self.path.parent / weights
        norm = t.get("normalize")
        if norm is not None:
            self.keys(norm, ("mean", "std"), f"{where}.normalize")
            norm = (tuple(norm.get("mean", ())), tuple(norm.get("std", ())))
        arch = name or None
        if arch and arch.split(":", 1)[0].endswith(".py") and not Path(arch.split(":", 1)[0]).is_absolute():
            arch = str(self.path.parent / arch)
        spec = None
        for d in data:
            loaded = self._load(d)
            try:
                from ..core.usermodel import check_normalize

                if norm is not None:
                    check_normalize(*norm, loaded.input_shape[0])
                spec, wspec, _ = prepare(loaded, arch=arch, weights=wpath, kwargs=kwargs, normalize=norm,
                                         num_classes=t.get("num_classes"), trust_pickle=trust)
            except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
                raise self.fail(where, exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None
        return (spec, wspec)

    def _load(self, spec: DataSpec):
        if id(spec) not in self._data:
            self._data[id(spec)] = spec.load(self.data_root)
        return self._data[id(spec)]

    def defense(self, table: Any, where: str) -> DefenseSpec:
        t = self.keys(table, ("name", *_all_settings(DEFENSES, self.typed(_get(table, "name"), str, f"{where}.name",
                                                                          "a defense name"), self, where)), where)
        params = {k: v for k, v in t.items() if k != "name"}
        cls = DEFENSES.get(t["name"])
        params = _coerce(cls, params)
        try:
            DEFENSES.create(t["name"], **params)
        except (ValueError, TypeError) as exc:
            raise self.fail(where, str(exc)) from None
        return DefenseSpec(t["name"], params)

    def pair(self, table: Any, where: str) -> tuple[ModelSpec, DefenseSpec]:
        t = self.keys(table, _KEYS["paired"], where)
        if "model" not in t or "defense" not in t:
            raise self.fail(where, "needs model = {name = ...} and defense = {name = ...}")
        model = self.keys(t["model"], ("name", "kwargs"), f"{where}.model")
        spec = self.model(model, f"{where}.model", ())
        return spec, self.defense(t["defense"], f"{where}.defense")

    def attacks(self, value: Any, threat: ThreatModel, where: str, kind: str = "") -> tuple[AttackSpec, ...]:
        if isinstance(value, str):
            if value not in SETS:
                raise self.fail(where, f"{value!r} is not an attack set ({', '.join(SETS)}); list attacks as an array")
            return attack_specs(value, threat.norm)
        out = []
        for j, item in enumerate(self.array(value, where)):
            at = f"{where}[{j}]"
            if isinstance(item, str):
                spec = AttackSpec(item)
            elif isinstance(item, dict) and isinstance(item.get("name"), str):
                params = {k: v for k, v in item.items() if k != "name"}
                spec = AttackSpec(item["name"], _coerce(ATTACKS.get(item["name"]), params) if item["name"] in ATTACKS
                                  else params)
            else:
                raise self.fail(at, 'must be an attack name or a table {name = "pgd", steps = 10}')
            try:
                cell = Cell(DataSpec("check"), ModelSpec("check"), DefenseSpec("check"), spec, threat, 1, kind=kind)
                cell.build()
            except KeyError as exc:
                raise self.fail(at, str(exc.args[0] if exc.args else exc)) from None
            except (ValueError, TypeError) as exc:
                text = str(exc)  # the settings checks name their owner already
                raise self.fail(at, text if text.startswith(f"{spec.name}:") else f"{spec.name}: {text}") from None
            out.append(spec)
        if not out:
            raise self.fail(where, 'is empty; list attacks, e.g. ["fgsm", "pgd"]')
        return tuple(out)

    def grid(self, table: Any, where: str) -> tuple[ThreatModel, tuple[AttackSpec, ...]]:
        t = self.keys(table, _KEYS["threats"], where)
        threat = self.threat(t, where)
        if "attacks" not in t:
            raise self.fail(where, 'needs attacks = ["fgsm", "pgd"] (or a set: "standard")')
        return threat, self.attacks(t["attacks"], threat, f"{where}.attacks")

    def extra(self, table: Any, where: str) -> Extra:
        from .kinds import KINDS

        t = self.keys(table, _KEYS["extra"], where)
        threat = self.threat(t, where)
        kind = self.typed(t.get("kind", ""), str, f"{where}.kind", "a cell kind name")
        if kind and kind not in KINDS:
            raise self.fail(f"{where}.kind", f"unknown kind {kind!r}; kinds: {', '.join(KINDS.list())}")
        if kind and (section := KINDS.get(kind).own_section):
            raise self.fail(f"{where}.kind", f"{kind} cells have their own section: {section}")
        listed = self.array(t.get("defenses", []), f"{where}.defenses")
        names = tuple(self.typed(d, str, f"{where}.defenses", "defense names") for d in listed)
        if not names:
            raise self.fail(f"{where}.defenses", 'missing; name the defenses the cells run on, e.g. ["standard"]')
        if "n" not in t:
            raise self.fail(f"{where}.n", "missing; set the number of test points")
        return Extra(names, threat, self.attacks(t.get("attacks", []), threat, f"{where}.attacks", kind),
                     self.positive_int(t["n"], f"{where}.n"), kind)

    def curve(self, table: Any, where: str) -> CurveSpec:
        from .user import parse_curve, parse_number

        t = self.keys(table, _KEYS["curves"], where)
        try:
            if "curve" in t:
                norm, grid = parse_curve(self.typed(t["curve"], str, f"{where}.curve", '"NORM:START:STOP:COUNT"'))
            elif "norm" in t and "eps" in t:
                norm = Norm.parse(t["norm"])
                values = [parse_number(e) if isinstance(e, str) else e for e in self.array(t["eps"], f"{where}.eps")]
                grid = tuple(sorted({float(self.typed(e, (int, float), f"{where}.eps", "numbers")) for e in values if e != 0}))
                for e in grid:
                    ThreatModel(norm, e)
            else:
                raise self.fail(where, 'needs curve = "linf:0:0.2:11" (or norm and eps = [...])')
        except GridError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.fail(f"{where}.curve", str(exc)) from None
        if not grid:
            raise self.fail(f"{where}.eps", "needs at least one eps > 0")
        attacks = self.attacks(t.get("attacks", "quick"), ThreatModel(norm, grid[-1]), f"{where}.attacks")
        n = self.positive_int(t["n"], f"{where}.n") if "n" in t else None
        order = t.get("order", "up")
        if order not in ("up", "down"):
            raise self.fail(f"{where}.order", f'must be "up" or "down", got {order!r}')
        return CurveSpec(norm, grid, attacks, n, order)


def _get(table: Any, key: str) -> Any:
    return table.get(key) if isinstance(table, dict) else None


def _all_settings(registry, name: str, reader: _Reader, where: str) -> tuple[str, ...]:
    if name not in registry:
        close = difflib.get_close_matches(name, registry.list(), n=1)
        raise reader.fail(f"{where}.name", f"unknown defense {name!r}; " + (f"did you mean {close[0]!r}?" if close
                          else f"registered: {', '.join(registry.list())}"))
    return tuple(f.name for f in dataclasses.fields(registry.get(name)))


def _coerce(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """Whole numbers given for float settings become floats (``eps = 1`` and ``eps = 1.0`` are
    one setting, so they must give one key)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    return {k: float(v) if types.get(k) == "float" and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in params.items()}
