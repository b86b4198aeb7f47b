"""Name -> plugin registries: attacks, defenses, models, datasets (and, in their neighbourhoods,
verifiers and cell kinds).

One ``Registry`` class, one instance per kind of plugin.  Built-in plugins are found by importing
their package (every module in it registers itself with a decorator, e.g. ``robustbench_lite.attacks``);
third-party plugins arrive through the entry-point groups (``robustbench_lite.attacks``,
``.defenses``, ``.models``, ``.datasets``, ``.verifiers``, ``.kinds``) or a file passed to
:func:`load_plugin_file` (the CLI's ``--plugin path.py``).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import logging
import pkgutil
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """A plugin file or entry point could not be imported, or registered something that is not a
    plugin; the message names the file and the fix."""


class Registry:
    """A named collection of plugin factories with wildcard listing and close-match errors.

    ``base`` (a class, or ``"module:Class"`` resolved on first use, so a registry can be made
    before its base class is importable) is what every registered object must derive from;
    without it, registered objects must be callable (factories such as model builders)."""

    def __init__(self, noun: str, builtin_package: str, entry_point_group: str, base: type | str | None = None) -> None:
        self.noun = noun
        self._builtin_package = builtin_package
        self._group = entry_point_group
        self._items: dict[str, Callable[..., Any]] = {}
        self._loaded = False
        self._base = base
        _REGISTRIES.append(self)

    @property
    def base(self) -> type | None:
        """The class every registered object derives from (``None``: any callable)."""
        if isinstance(self._base, str):
            module, _, name = self._base.partition(":")
            self._base = getattr(importlib.import_module(module), name)
        return self._base  # type: ignore[return-value]

    def check(self, name: str, obj: object) -> None:
        """Raise ``TypeError`` naming the fix unless ``obj`` is a valid plugin for this registry."""
        base = self.base
        if base is None:
            if not callable(obj):
                raise TypeError(
                    f"{self.noun} {name!r}: register a function or class that builds the {self.noun}, "
                    f"got {type(obj).__name__} {obj!r:.60}"
                )
            return
        if not (isinstance(obj, type) and issubclass(obj, base)):
            what = f"class {obj.__qualname__}" if isinstance(obj, type) else f"{type(obj).__name__} {obj!r:.60}"
            raise TypeError(
                f"{self.noun} {name!r}: register a subclass of {base.__module__}.{base.__qualname__}{_BASE_HINTS.get(self.noun, '')} "
                f"(decorate the class itself), got {what}"
            )

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@ATTACKS.register("pgd")`` puts the class under ``name``."""
        if not isinstance(name, str) or not name or name != name.strip().lower():
            raise ValueError(f"{self.noun} names are non-empty lower-case strings, got {name!r}")

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            self.check(name, obj)
            existing = self._items.get(name)
            if existing is not None and _qualname(existing) != _qualname(obj):
                raise ValueError(
                    f"{self.noun} {name!r} is already registered by {_qualname(existing)}; "
                    "pick another name for your plugin"
                )
            self._items[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    # -- discovery ----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self._builtin_package)
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self._builtin_package}.{info.name}")
        for ep in entry_points(group=self._group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the others
                log.warning("could not load %s plugin %r from %s: %s", self.noun, ep.name, ep.value, exc)
                continue
            if ep.name not in self._items:
                try:
                    self.register(ep.name)(obj)
                except (TypeError, ValueError) as exc:
                    log.warning("could not register %s plugin %r from %s: %s", self.noun, ep.name, ep.value, exc)

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> Callable[..., Any]:
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
            raise KeyError(
                f"unknown {self.noun} {name!r}{hint} Known: {', '.join(sorted(self._items))}. "
                f"Use list_{self.noun}s() to see them, or --plugin path.py to add one."
            ) from None

    def create(self, name: str, **config: Any) -> Any:
        """Build the plugin ``name`` with its settings: ``create("pgd", eps=0.1, steps=20)``."""
        return self.get(name)(**config)

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching an ``fnmatch`` pattern, e.g. ``list("apgd*")``."""
        self._ensure_loaded()
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items


_REGISTRIES: list[Registry] = []
_BASE_HINTS = {"attack": " (EvasionAttack, UniversalAttack or PoisoningAttack)"}


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


ATTACKS = Registry("attack", "robustbench_lite.attacks", "robustbench_lite.attacks", base="robustbench_lite.core.attack:Attack")
DEFENSES = Registry(
    "defense", "robustbench_lite.defenses", "robustbench_lite.defenses", base="robustbench_lite.training.defense:Defense"
)
MODELS = Registry("model", "robustbench_lite.core.models", "robustbench_lite.models")
DATASETS = Registry("dataset", "robustbench_lite.core.datasets", "robustbench_lite.datasets")
# cell kinds live in the harness; their registry sits here so that a cell can find its kind
# without the harness modules importing one another in a circle
KINDS = Registry("kind", "robustbench_lite.harness.kinds", "robustbench_lite.kinds", base="robustbench_lite.harness.kinds:CellKind")

register_attack = ATTACKS.register
create_attack = ATTACKS.create
list_attacks = ATTACKS.list
register_defense = DEFENSES.register
create_defense = DEFENSES.create
list_defenses = DEFENSES.list
register_model = MODELS.register
list_models = MODELS.list
register_dataset = DATASETS.register
list_datasets = DATASETS.list


def load_plugin_file(path: str | Path) -> None:
    """Import a Python file so that its ``@register_*`` decorators run (the CLI's ``--plugin``).

    A file that does not import (a syntax error, an exception at import, a registration of
    something that is not a plugin) raises :class:`~robustbench_lite.core.registry.PluginError` naming the file, the line and
    the cause; the partly imported module is forgotten, and so is whatever it registered before
    it failed."""
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"--plugin expects an existing .py file, got {str(path)!r}")
    module_name = f"robustbench_lite_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if module_name in sys.modules:
        return
    # Make the built-ins known first so a plugin cannot silently shadow one.
    for reg in list(_REGISTRIES):
        reg._ensure_loaded()
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    before = {id(reg): dict(reg._items) for reg in _REGISTRIES}
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        for reg in _REGISTRIES:  # forget what the broken file registered before it failed
            if id(reg) in before:
                reg._items = before[id(reg)]
        if not isinstance(exc, Exception):
            raise
        raise PluginError(f"plugin {path}: {_where(exc, path)}{type(exc).__name__}: {_first_line(exc)}") from exc


def _where(exc: BaseException, path: Path) -> str:
    """``line N: `` of the plugin file where ``exc`` arose (syntax errors carry their own line)."""
    line = line_in(exc, path)
    return f"line {line}: " if line else ""


def line_in(exc: BaseException, path: str | Path) -> int | None:
    """The last line of ``path`` in ``exc``'s traceback (a syntax error's own line), or ``None``
    when the exception did not pass through that file."""
    path = Path(path).resolve()
    if isinstance(exc, SyntaxError) and exc.lineno and exc.filename and Path(exc.filename).resolve() == path:
        return exc.lineno
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def user_code_error(what: str, path: str | Path, exc: BaseException) -> PluginError:
    """A :class:`PluginError` for ``exc`` raised by the user's own code in ``path`` while doing
    ``what``: the file, the line and its text, and the cause (the CLI exits 3, ``-v`` adds the
    traceback)."""
    path = Path(path)
    line = line_in(exc, path)
    where = ""
    if line:
        import linecache

        text = linecache.getline(str(path.resolve()), line).strip()
        where = f", line {line}" + (f" ({text[:80]})" if text else "")
    return PluginError(f"{what} failed in {path.name}{where}: {type(exc).__name__}: {_first_line(exc)}; this is an error "
                       "in that code (rerun with -v for the traceback)")


def _first_line(exc: BaseException) -> str:
    text = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    return (text or "").strip().splitlines()[0] if text else "(no message)"
