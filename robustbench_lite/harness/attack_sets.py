"""Named attack sets, run on survivors (each attack only on the points the earlier ones left;
fixed-eps gradient attacks first, cheapest first, then the minimum-norm and black-box ones, as
AutoAttack runs FAB-T and Square last):

* ``quick``: FGSM, PGD (40 steps): minutes on a CPU, a first look, not a robustness claim;
* ``standard``: the strong set, used the way AutoAttack's standard version is (Croce & Hein,
  ICML 2020), cheaper: APGD-CE, APGD-T-DLR over the 9 most likely wrong classes (fewer when the
  model has fewer classes), ACG with the CW margin loss (Linf only) and the black-box Square attack
  as the gradient-masking check (1000 queries, p_init 0.3, where AutoAttack's 5000 at p_init 0.8
  cost five times more), without FAB-T; where a black-box or minimum-norm attack breaks points every
  gradient attack left, the ``gradient-attacks-missed`` flag escalates the row on its survivors
  (:mod:`~robustbench_lite.eval.escalate`: FAB-T and Square with AutoAttack's budget among its steps);
* ``autoattack``: exactly AutoAttack's standard version: APGD-CE (100 iterations, 1 restart),
  APGD-T-DLR on 9 target classes, FAB-T on 9 target classes (100 iterations, 1 restart; a point
  stops once it has an adversarial within eps, which changes no verdict), Square (5000 queries,
  p_init 0.8, the p schedule not rescaled), each on the survivors in that order; at L1 its L1
  settings (APGD-CE with 5 restarts, APGD-T on 5 targets; no L1 Square here, so that member is
  left out);
* ``autoattack-rand``: AutoAttack's version for randomized models: APGD-CE and APGD-DLR, each
  gradient the mean over 20 passes (EOT);
* ``full``: every registered evasion attack that supports the threat's norm (minimum-norm ones
  included), with the ``standard`` settings above where they differ from the defaults.

Attacks that need more classes than the model has (DLR needs 3, targeted DLR 4, FAB-T
``n_targets + 1``) are left out of ``standard`` and ``full``, or get fewer targets; ``autoattack``
and ``autoattack-rand`` refuse such a model, since without them they are not AutoAttack.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

from ..core.attack import EvasionAttack
from ..core.registry import ATTACKS
from ..core.threat import Norm
from .specs import AttackSpec

Members = list[tuple[str, dict[str, Any]]]

#: the ``standard`` set's settings where they differ from an attack's defaults (``full`` too)
_STANDARD_PARAMS: dict[str, dict[str, Any]] = {"square": {"queries": 1000, "p_init": 0.3}, "acg": {"loss": "cw"}}
#: AutoAttack's standard version (pyautoattack 0.2.0 ``version='standard'``), and where its L1 version differs
_AA_SQUARE = {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}
_AUTOATTACK: Members = [
    ("apgd-ce", {"steps": 100, "restarts": 1}), ("apgd-t-dlr", {"steps": 100, "restarts": 1, "n_targets": 9}),
    ("fab-t", {"steps": 100, "restarts": 1, "n_targets": 9, "early_stop": True}), ("square", _AA_SQUARE),
]
_AUTOATTACK_BY_NORM: dict[Norm, Members] = {
    Norm.L1: [("apgd-ce", {"steps": 100, "restarts": 5}), ("apgd-t-dlr", {"steps": 100, "restarts": 1, "n_targets": 5}),
              *_AUTOATTACK[2:]],
}
_AUTOATTACK_RAND: Members = [("apgd-ce", {"eot": 20}), ("apgd-dlr", {"eot": 20})]


def _standard_members(names: list[str]) -> Members:
    return [(n, dict(_STANDARD_PARAMS.get(n, {}))) for n in names]


def _every_evasion_attack() -> list[str]:
    return [a for a in ATTACKS.list() if issubclass(ATTACKS.get(a), EvasionAttack)]


_MEMBERS: dict[str, Callable[[Norm], Members]] = {
    "quick": lambda norm: _standard_members(["fgsm", "pgd"]),
    "standard": lambda norm: _standard_members(["apgd-ce", "apgd-t-dlr", "acg", "square"]),
    "full": lambda norm: _standard_members(_every_evasion_attack()),
    "autoattack": lambda norm: [(n, dict(p)) for n, p in _AUTOATTACK_BY_NORM.get(norm, _AUTOATTACK)],
    "autoattack-rand": lambda norm: [(n, dict(p)) for n, p in _AUTOATTACK_RAND],
}
SETS = tuple(_MEMBERS)
#: sets that are a reference recipe: a model without the classes its targeted members need is refused
_EXACT = {"autoattack": 4, "autoattack-rand": 3}
#: classes an attack needs (DLR: 3, targeted DLR: 4, targeted attacks: a target besides y)
_NEEDS = {"apgd-dlr": 3, "apgd-t-dlr": 4}


def _fit(name: str, params: dict[str, Any], num_classes: int | None) -> AttackSpec | None:
    """The attack with its targets capped at the model's other classes, or ``None`` where the
    model has too few classes for it."""
    params = dict(params)
    if num_classes is not None:
        if num_classes < _NEEDS.get(name, 2):
            return None
        fields = getattr(ATTACKS.get(name), "__dataclass_fields__", {})
        if "n_targets" in fields:
            params["n_targets"] = min(int(params.get("n_targets", fields["n_targets"].default)), num_classes - 1)
    return AttackSpec(name, params)


#: settings that only make sense at one fixed eps (a minimum-norm attack stopping once inside it)
_FIXED_EPS_ONLY = ("early_stop",)


def curve_spec(spec: AttackSpec) -> AttackSpec:
    """``spec`` for a robustness curve, whose minimum-norm attacks must find each point's closest
    example rather than stop at one eps."""
    return AttackSpec(spec.name, {k: v for k, v in spec.params.items() if k not in _FIXED_EPS_ONLY})


def check_classes(set_name: str, num_classes: int) -> None:
    """A reference set on a model with too few classes for its targeted members: ``ValueError``."""
    need = _EXACT.get(set_name, 0)
    if num_classes < need:
        why = ("APGD-T's targeted DLR loss uses the 4 largest logits and FAB-T needs other classes to target"
               if set_name == "autoattack" else "APGD-DLR's loss uses the 3 largest logits")
        raise ValueError(
            f"the {set_name} attack set needs at least {need} classes ({why}; AutoAttack warns the same), the model "
            f"has {num_classes}: use --attacks standard or name the attacks, e.g. apgd-ce,fab,square"
        )


def attack_specs(what: str | Sequence[str], norm: Norm | str, num_classes: int | None = None) -> tuple[AttackSpec, ...]:
    """The attacks of a set name (``quick``, ``standard``, ``autoattack``, ``autoattack-rand``,
    ``full``), or of a list of attack names (sets may appear in it), that support ``norm``.  An
    unknown name raises ``ValueError`` naming the sets and close attack names; a list with no attack
    for ``norm`` raises too, and so does a reference set on a model with too few classes.  An attack
    named twice runs once, with the settings of its first appearance."""
    norm = Norm.parse(norm)
    items = [t.strip() for t in what.split(",")] if isinstance(what, str) else [str(t).strip() for t in what]
    items = [t for t in items if t]
    if not items:
        raise ValueError(f"no attacks given; use a set ({', '.join(SETS)}) or attack names, e.g. fgsm,pgd")
    members: Members = []
    explicit: list[str] = []
    for item in items:
        if item in SETS:
            if num_classes is not None:
                check_classes(item, num_classes)
            members += _MEMBERS[item](norm)
            continue
        if item not in ATTACKS:
            close = difflib.get_close_matches(item, [*SETS, *ATTACKS.list()], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown attack set or attack {item!r}{hint} Sets: {', '.join(SETS)}; "
                             "attacks: robustbench-lite list attacks")
        if ATTACKS.get(item).cell_kind != "evasion":
            raise ValueError(f"{item} is a {ATTACKS.get(item).cell_kind} attack, not a per-point evasion attack; "
                             "run it from a preset or a TOML config")
        members.append((item, dict(_STANDARD_PARAMS.get(item, {}))))
        explicit.append(item)
    out: list[AttackSpec] = []
    seen: set[str] = set()
    for name, params in members:
        if name in seen or norm not in ATTACKS.get(name).norms:
            continue
        seen.add(name)
        spec = _fit(name, params, num_classes)
        if spec is not None:
            out.append(spec)
    if not out:
        supported = {a: [n.value for n in ATTACKS.get(a).norms] for a in dict.fromkeys(explicit)}
        raise ValueError(f"none of the attacks {', '.join(items)} runs under {norm.value} (norms: {supported}); "
                         "pick attacks for this norm (robustbench-lite list attacks shows each one's norms)")
    return tuple(out)
