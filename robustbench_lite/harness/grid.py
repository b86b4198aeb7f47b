"""Grids: a :class:`Preset` is a named grid (datasets × models × defenses × threats × attacks,
plus :class:`Extra` cells) that expands to a :class:`~robustbench_lite.harness.plan.Plan`.

Grid files are read into presets by :mod:`~robustbench_lite.harness.gridfile`; the built-in ones
are named in :mod:`~robustbench_lite.harness.presets`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..core.config import config_hash
from ..core.models import ModelSpec
from ..core.registry import ATTACKS, DATASETS, DEFENSES
from ..core.threat import ThreatModel
from .plan import Cell, Plan
from .specs import AttackSpec, DataSpec, DefenseSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extra:
    """Cells outside the evasion grid (universal, sparse, poisoning, certified) on some of a
    preset's defenses: each of ``attacks`` at ``threat`` on ``n`` test points, for the defenses
    named in ``defenses``; ``kind`` names the cell kind when the specs are not attacks (e.g.
    ``certified`` with verifier names)."""

    defenses: tuple[str, ...]
    threat: ThreatModel
    attacks: tuple[AttackSpec, ...]
    n: int
    kind: str = ""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    data: tuple[DataSpec, ...]
    models: tuple[ModelSpec, ...]
    defenses: tuple[DefenseSpec, ...]
    grid: tuple[tuple[ThreatModel, tuple[AttackSpec, ...]], ...]  # attacks per threat
    n: int
    survivors: bool = False
    paired: tuple[tuple[ModelSpec, DefenseSpec], ...] = ()  # defenses that need their own model
    extra: tuple[Extra, ...] = ()  # cells outside the grid, on the defenses each names

    def plan(
        self,
        *,
        attacks: Sequence[str] | None = None,
        threats: Sequence[ThreatModel] | None = None,
        n: int | None = None,
        defenses: Sequence[str] | None = None,
        datasets: Sequence[str] | None = None,
    ) -> Plan:
        """Expand to cells.  ``attacks``/``threats``/``defenses``/``datasets`` replace the preset's
        lists (an attack that does not support a threat's norm is left out of that threat; a
        dataset given by name is trained on in full).  Every name is checked against its registry
        before any work, an empty list or ``n < 1`` is refused, and a name given twice counts once
        (with a warning)."""
        attacks, threats, defenses, datasets = (
            _unique(v, what) for v, what in ((attacks, "attack"), (threats, "threat"), (defenses, "defense"), (datasets, "dataset"))
        )
        _check_names(attacks, defenses, datasets)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"--n must be a positive number of test points, got {n!r}")
        grid = list(self.grid)
        if threats is not None:
            default_attacks = tuple({a.name: a for _, atts in self.grid for a in atts}.values())
            grid = [(t, default_attacks) for t in threats]
        if attacks is not None:
            grid = [(t, tuple(AttackSpec(a) for a in attacks)) for t, _ in grid]
        defense_specs = self.defenses
        paired = self.paired
        if defenses is not None:
            own_model = {d.name for _, d in self.paired}
            defense_specs = tuple(
                next((d for d in self.defenses if d.name == name), replace(self.defenses[0], name=name))
                for name in defenses
                if name not in own_model
            )
            paired = tuple((m, d) for m, d in self.paired if d.name in defenses)
        combos = [(m, d) for m in self.models for d in defense_specs] + list(paired)
        cells = []
        in_extra = {a.name for ex in self.extra for a in ex.attacks}  # these run only where their Extra says
        data_specs = self.data if datasets is None else tuple(DataSpec(name) for name in datasets)
        for data in data_specs:
            for model, defense in combos:
                for threat, atts in grid:
                    for att in atts:
                        if att.name in in_extra:
                            continue
                        if not att.supports(threat):
                            log.info("%s does not support %s; left out", att.name, threat.norm.value)
                            continue
                        cells.append(Cell(data, model, defense, att, threat, n if n is not None else self.n, self.survivors))
                cells.extend(self._extra_cells(data, model, defense, attacks, threats))
        if not cells:
            raise ValueError("the plan has no cells: check --attacks and --threats (norms the attacks support)")
        for spec in {config_hash(c.defense.as_dict()): c.defense for c in cells}.values():
            spec.build()  # bad defense settings fail here, before any work
        return Plan(self.name, tuple(cells))

    def _extra_cells(self, data, model, defense, attacks, threats) -> list[Cell]:
        """The :attr:`extra` cells of one model/defense; ``--threats`` drops them, ``--attacks``
        keeps the named ones."""
        if threats is not None:
            return []
        out = []
        for ex in self.extra:
            if defense.name not in ex.defenses:
                continue
            for att in ex.attacks:
                if attacks is not None and att.name not in attacks:
                    continue
                out.append(Cell(data, model, defense, att, ex.threat, ex.n, kind=ex.kind))
        return out


def _unique(values: Sequence | None, what: str) -> list | None:
    """``values`` without repeats (first kept, a warning for the others); an empty list is refused."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        raise TypeError(f"give the {what}s as a list of names, not the string {values!r}")
    if not values:
        raise ValueError(f"the list of {what}s is empty; leave the option out to use the preset's, or name at least one")
    out = list(dict.fromkeys(values))
    if len(out) < len(values):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        log.warning("%s given more than once: %s; each runs once", what, ", ".join(repeated))
    return out


def _check_names(attacks: Sequence[str] | None, defenses: Sequence[str] | None, datasets: Sequence[str] | None) -> None:
    """Unknown names fail here, before any work (the registries suggest close matches).  An
    attack name may also be what another cell kind runs (a verifier, the smoothing certifier)."""
    from .kinds import KINDS, kind

    for names, registry in ((attacks, ATTACKS), (defenses, DEFENSES), (datasets, DATASETS)):
        for name in names or ():
            if not isinstance(name, str):
                raise TypeError(f"{registry.noun} names are strings, got {name!r}")
            if registry is ATTACKS and any(kind(k).knows(name) for k in KINDS.list()):
                continue
            registry.get(name)
