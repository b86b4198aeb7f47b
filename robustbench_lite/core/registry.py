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


class Registry:
    """A named collection of plugin factories with wildcard listing and close-match errors."""

    def __init__(self, noun: str, builtin_package: str, entry_point_group: str) -> None:
        self.noun = noun
        self._builtin_package = builtin_package
        self._group = entry_point_group
        self._items: dict[str, Callable[..., Any]] = {}
        self._loaded = False
        _REGISTRIES.append(self)

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@ATTACKS.register("pgd")`` puts the class under ``name``."""
        if not isinstance(name, str) or not name or name != name.strip().lower():
            raise ValueError(f"{self.noun} names are non-empty lower-case strings, got {name!r}")

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
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
                self.register(ep.name)(obj)

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> Callable[..., Any]:
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
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


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


ATTACKS = Registry("attack", "robustbench_lite.attacks", "robustbench_lite.attacks")
DEFENSES = Registry("defense", "robustbench_lite.defenses", "robustbench_lite.defenses")
MODELS = Registry("model", "robustbench_lite.core.models", "robustbench_lite.models")
DATASETS = Registry("dataset", "robustbench_lite.core.datasets", "robustbench_lite.datasets")

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
    """Import a Python file so that its ``@register_*`` decorators run (the CLI's ``--plugin``)."""
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
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
