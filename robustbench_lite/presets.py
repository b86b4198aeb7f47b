"""Presets: named grids that expand to a :class:`~robustbench_lite.plan.Plan`.

``quick`` is the main job (Fashion-MNIST, a standard-trained small CNN, the basic attacks);
``smoke`` is a seconds-long version on scikit-learn's digits for tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .model_cache import ModelSpec
from .plan import AttackSpec, Cell, DataSpec, DefenseSpec, Plan
from .threat import ThreatModel

log = logging.getLogger(__name__)


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

    def plan(
        self,
        *,
        attacks: Sequence[str] | None = None,
        threats: Sequence[ThreatModel] | None = None,
        n: int | None = None,
        defenses: Sequence[str] | None = None,
    ) -> Plan:
        """Expand to cells.  ``attacks``/``threats``/``defenses`` replace the preset's lists
        (an attack that does not support a threat's norm is left out of that threat)."""
        grid = list(self.grid)
        if threats is not None:
            default_attacks = tuple(dict.fromkeys(a for _, atts in self.grid for a in atts))
            grid = [(t, default_attacks) for t in threats]
        if attacks is not None:
            grid = [(t, tuple(AttackSpec(a) for a in attacks)) for t, _ in grid]
        defense_specs = self.defenses
        if defenses is not None:
            defense_specs = tuple(
                next((d for d in self.defenses if d.name == name), replace(self.defenses[0], name=name)) for name in defenses
            )
        cells = []
        for data in self.data:
            for model in self.models:
                for defense in defense_specs:
                    for threat, atts in grid:
                        for att in atts:
                            if not att.supports(threat):
                                log.info("%s does not support %s; left out", att.name, threat.norm.value)
                                continue
                            cells.append(Cell(data, model, defense, att, threat, n or self.n, self.survivors))
        if not cells:
            raise ValueError("the plan has no cells: check --attacks and --threats (norms the attacks support)")
        return Plan(self.name, tuple(cells))


def _linf(eps: float) -> ThreatModel:
    return ThreatModel("linf", eps)


_BASIC = (AttackSpec("fgsm"), AttackSpec("ifgsm"), AttackSpec("least-likely"), AttackSpec("pgd"))
# the gradient-free sanity check against gradient masking joins every threat's worst case
_SQUARE = AttackSpec("square", {"queries": 1000})

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="Fashion-MNIST, standard-trained small-cnn; FGSM, I-FGSM, least-likely, PGD, Square at Linf 0.05/0.1, PGD and Square L2 at 1.5; 1000 test points",
        data=(DataSpec("fashion-mnist"),),
        models=(ModelSpec("small-cnn"),),
        defenses=(DefenseSpec("standard", {"epochs": 3}),),
        grid=(
            (_linf(0.05), (*_BASIC, _SQUARE)),
            (_linf(0.1), (*_BASIC, _SQUARE)),
            (ThreatModel("l2", 1.5), (AttackSpec("pgd"), _SQUARE)),
        ),
        n=1000,
    ),
    "smoke": Preset(
        name="smoke",
        description="digits (8x8), small-cnn trained briefly; the basic attacks at Linf 0.1 and PGD-L2 at 1.0; 200 points. For tests.",
        data=(DataSpec("digits"),),
        models=(ModelSpec("small-cnn"),),
        defenses=(DefenseSpec("standard", {"epochs": 4, "batch_size": 64}),),
        grid=(
            (_linf(0.1), (AttackSpec("fgsm"), AttackSpec("ifgsm"), AttackSpec("least-likely"), AttackSpec("pgd", {"steps": 10}))),
            (ThreatModel("l2", 1.0), (AttackSpec("pgd", {"steps": 10}),)),
        ),
        n=200,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
