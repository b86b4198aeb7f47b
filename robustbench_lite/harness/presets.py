"""Presets: named grids that expand to a :class:`~robustbench_lite.harness.plan.Plan`.

``quick`` is the main job (Fashion-MNIST, a standard-trained small CNN, the basic attacks);
``smoke`` is a seconds-long version on scikit-learn's digits for tests; ``full`` adds every defense
and the strong attacks, plus (:class:`Extra`) universal, one-pixel, poisoning and certified cells;
``poisoning`` is BadNets at two poison rates under standard and PGD-AT training.
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
    """Unknown names fail here, before any work (the registries suggest close matches)."""
    for names, registry in ((attacks, ATTACKS), (defenses, DEFENSES), (datasets, DATASETS)):
        for name in names or ():
            if not isinstance(name, str):
                raise TypeError(f"{registry.noun} names are strings, got {name!r}")
            registry.get(name)


def _linf(eps: float) -> ThreatModel:
    return ThreatModel("linf", eps)


_BASIC = (AttackSpec("fgsm"), AttackSpec("ifgsm"), AttackSpec("least-likely"), AttackSpec("pgd"))
# the gradient-free sanity check against gradient masking (p_init 0.3 rather than the paper's
# ImageNet 0.05: 28x28 images need larger squares; see BENCHMARKS.md)
_SQUARE = AttackSpec("square", {"queries": 1000, "p_init": 0.3})
# the strong white-box attacks: run on the survivors of the cheap ones
_STRONG = (AttackSpec("apgd-ce"), AttackSpec("apgd-dlr"), AttackSpec("apgd-t-dlr", {"n_targets": 3}), AttackSpec("acg", {"loss": "cw"}))

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="Fashion-MNIST, standard-trained small-cnn; FGSM, I-FGSM, least-likely, PGD at Linf 0.05/0.1, PGD-L2 at 1.5; 1000 test points",
        data=(DataSpec("fashion-mnist"),),
        models=(ModelSpec("small-cnn"),),
        defenses=(DefenseSpec("standard", {"epochs": 3}),),
        grid=((_linf(0.05), _BASIC), (_linf(0.1), _BASIC), (ThreatModel("l2", 1.5), (AttackSpec("pgd"),))),
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


_ADV = {"eps": 0.1, "steps": 5}  # the multi-step inner searches of the full preset (step 2.5 eps / 5)
_FULL_EPOCHS = 2  # on the 60k training images, to fit a CPU budget (the measured time: BENCHMARKS.md)
_MONITOR = {"monitor_eps": 0.1, "monitor_points": 500}  # per-epoch PGD accuracy in the sidecar
_FULL_CONVEX = {"max_points": 2000, "iterations": 500, "epochs": 5, "certify_points": 1000}
# the clean-data standard and PGD-AT recipes of `full`, shared by `poisoning` (so its unpoisoned
# reference models are the same cached ones)
_FULL_STANDARD = DefenseSpec("standard", {"epochs": _FULL_EPOCHS})
_FULL_PGD_AT = DefenseSpec("pgd-at", {"epochs": _FULL_EPOCHS, **_ADV})

# -- the cells of `full` outside its evasion grid (the defenses are looked up by name in the preset) --
_BADNETS_THREAT = ThreatModel("l0", 9)  # badnets changes up to patch² = 9 pixels (its 3x3 trigger)
_FULL_OTHER = (
    # universal perturbations (fit on 500 training points, evaluated on 1000 test points)
    Extra(("standard", "pgd-at"), _linf(0.1), (AttackSpec("uap", {"passes": 1}), AttackSpec("sga")), 1000),
    # one-pixel (k = 1): the paper's population 400, fewer generations to fit the budget
    Extra(("standard",), ThreatModel("l0", 1), (AttackSpec("one-pixel", {"generations": 20}),), 100),
    # poisoning: each cell trains its own model on the poisoned 60k split
    Extra(("standard",), _BADNETS_THREAT, (AttackSpec("badnets", {"rate": 0.05}), AttackSpec("label-flip", {"rate": 0.1})), 10000),
    # the convex pair's certificate, on the same points as the worst case
    Extra(("convex-standard", "convex-robust"), _linf(0.1), (AttackSpec("stable-relu"),), 500, kind="certified"),
)

PRESETS["full"] = Preset(
    name="full",
    description=(
        "Fashion-MNIST Linf 0.1: every defense (small-cnn, 2 epochs on 60k images, 5-step inner searches; the convex pair "
        "one-vs-rest on a one-hidden-relu with 20 patterns per class, 2000 training points) x the basic attacks, "
        "then APGD-CE/DLR/T-DLR, ACG and Square on the survivors; 500 test points. Plus: UAP and SGA at Linf 0.1 "
        "(standard, pgd-at), one-pixel k=1 on 100 points, BadNets 5% / label-flip 10% (standard) and the convex "
        "pair's certificate."
    ),
    data=(DataSpec("fashion-mnist"),),
    models=(ModelSpec("small-cnn"),),
    defenses=(
        _FULL_STANDARD,
        _FULL_PGD_AT,
        DefenseSpec("fgsm-rs", {"epochs": _FULL_EPOCHS, "eps": 0.1, **_MONITOR}),
        DefenseSpec("vat", {"epochs": _FULL_EPOCHS}),
        DefenseSpec("elle", {"epochs": _FULL_EPOCHS, "eps": 0.1}),
        DefenseSpec("elle-a", {"epochs": _FULL_EPOCHS, "eps": 0.1, **_MONITOR}),
        DefenseSpec("trades", {"epochs": _FULL_EPOCHS, **_ADV}),
        DefenseSpec("mart", {"epochs": _FULL_EPOCHS, **_ADV}),
        DefenseSpec("arow", {"epochs": _FULL_EPOCHS, **_ADV}),
    ),
    grid=((_linf(0.1), (*_BASIC, *_STRONG, _SQUARE)),),
    n=500,
    survivors=True,
    extra=_FULL_OTHER,
    paired=(
        (ModelSpec("one-hidden-relu", {"hidden": 400}), DefenseSpec("convex-standard", {**_FULL_CONVEX, "certify_eps": 0.1})),
        (ModelSpec("one-hidden-relu", {"hidden": 400}), DefenseSpec("convex-robust", {**_FULL_CONVEX, "eps": 0.1})),
    ),
)


PRESETS["poisoning"] = Preset(
    name="poisoning",
    description=(
        "Fashion-MNIST (all 60k training images), small-cnn: BadNets at poison rates 1% and 5% (3x3 trigger, target "
        "class 0) under standard and PGD-AT training (the full preset's settings); clean accuracy, its drop and attack "
        "success rate on the 10k test images."
    ),
    data=(DataSpec("fashion-mnist"),),
    models=(ModelSpec("small-cnn"),),
    defenses=(_FULL_STANDARD, _FULL_PGD_AT),
    grid=(),
    n=10000,
    extra=(
        Extra(("standard", "pgd-at"), _BADNETS_THREAT,
              (AttackSpec("badnets", {"rate": 0.01}), AttackSpec("badnets", {"rate": 0.05})), 10000),
    ),
)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
