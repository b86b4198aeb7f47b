"""Presets: named grids that expand to a :class:`~robustbench_lite.harness.plan.Plan`.

The built-in presets are TOML files in ``robustbench_lite/presets/`` (read by
:mod:`~robustbench_lite.harness.gridfile`; ``robustbench-lite list presets`` shows where).
``quick`` is the main job (Fashion-MNIST, a standard-trained small CNN, the basic attacks);
``smoke`` is a seconds-long version on scikit-learn's digits for tests; ``full`` adds every defense
and the strong attacks, plus (:class:`Extra`) universal, one-pixel, poisoning and certified cells;
``poisoning`` is BadNets at two poison rates under standard and PGD-AT training.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path

from ..core.names import is_plain
from .grid import Extra, Preset
from .gridfile import load_grid

__all__ = ["PRESETS", "PRESET_DIR", "Extra", "Preset", "PresetFiles", "get_preset"]


class PresetFiles(MutableMapping):
    """The presets by name: the built-in ones are TOML files in ``folder`` (``<name>.toml``, read on
    first use); a plugin file adds its own with ``PRESETS[name] = Preset(...)``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._loaded: dict[str, Preset] = {}

    def path(self, name: str) -> Path:
        """The TOML file of the built-in preset ``name``; a name that is not a plain file stem
        (``../x``, a separator) names none, so a preset name never reads outside ``folder``."""
        if not isinstance(name, str) or not is_plain(name):
            raise KeyError(name)
        return self.folder / f"{name}.toml"

    def __getitem__(self, name: str) -> Preset:
        if name not in self._loaded:
            if not self.path(name).is_file():
                raise KeyError(name)
            self._loaded[name] = load_grid(self.path(name))
        return self._loaded[name]

    def __setitem__(self, name: str, preset: Preset) -> None:
        if not isinstance(preset, Preset):
            raise TypeError(f"PRESETS[{name!r}] must be a Preset, got {type(preset).__name__}")
        self._loaded[name] = preset

    def __delitem__(self, name: str) -> None:
        if name not in self._loaded:
            raise KeyError(f"{name!r} is not a preset added at run time (the built-in TOML files stay)")
        del self._loaded[name]

    def _names(self) -> list[str]:
        return sorted({p.stem for p in self.folder.glob("*.toml")} | set(self._loaded))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
PRESETS = PresetFiles(PRESET_DIR)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
