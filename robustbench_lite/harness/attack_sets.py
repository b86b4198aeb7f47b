"""Named attack sets, run on survivors (each attack only on the points the cheaper ones left):

* ``quick``: FGSM, PGD (40 steps): minutes on a CPU, a first look, not a robustness claim;
* ``standard``: the strong set, used the way AutoAttack's standard version is (Croce & Hein,
  ICML 2020): APGD-CE, APGD-T-DLR over the 9 most likely wrong classes (fewer when the model has
  fewer classes), ACG with the CW margin loss (Linf only) and the black-box Square attack as the
  gradient-masking check (1000 queries, p_init 0.3: AutoAttack's 5000 queries at p_init 0.8 cost
  five times more; a TOML config sets any attack's settings);
* ``full``: every registered evasion attack that supports the threat's norm (minimum-norm ones
  included), with the settings above where they differ from the defaults.

Attacks that need more classes than the model has (DLR needs 3, targeted DLR 4) are left out.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from ..core.attack import EvasionAttack
from ..core.registry import ATTACKS
from ..core.threat import Norm
from .specs import AttackSpec

_SQUARE = {"queries": 1000, "p_init": 0.3}
_TWEAKS = {"square": _SQUARE, "acg": {"loss": "cw"}}


def _spec(name: str, num_classes: int | None) -> AttackSpec | None:
    params = dict(_TWEAKS.get(name, {}))
    if num_classes is not None:
        if name in ("apgd-dlr",) and num_classes < 3:
            return None
        if name in ("apgd-t-dlr",):
            if num_classes < 4:
                return None
            params["n_targets"] = min(9, num_classes - 1)
    return AttackSpec(name, params)


def _every_evasion_attack() -> list[str]:
    return [a for a in ATTACKS.list() if issubclass(ATTACKS.get(a), EvasionAttack)]


_MEMBERS = {"quick": lambda: ["fgsm", "pgd"], "standard": lambda: ["apgd-ce", "apgd-t-dlr", "acg", "square"],
            "full": _every_evasion_attack}
SETS = tuple(_MEMBERS)


def _set(name: str, norm: Norm) -> list[str]:
    return _MEMBERS[name]()


def attack_specs(what: str | Sequence[str], norm: Norm | str, num_classes: int | None = None) -> tuple[AttackSpec, ...]:
    """The attacks of a set name (``quick``, ``standard``, ``full``), or of a list of attack names
    (sets may appear in it), that support ``norm``.  An unknown name raises ``ValueError``
    naming the sets and close attack names; a list with no attack for ``norm`` raises too."""
    norm = Norm.parse(norm)
    items = [t.strip() for t in what.split(",")] if isinstance(what, str) else [str(t).strip() for t in what]
    items = [t for t in items if t]
    if not items:
        raise ValueError(f"no attacks given; use a set ({', '.join(SETS)}) or attack names, e.g. fgsm,pgd")
    names: list[str] = []
    explicit: list[str] = []
    for item in items:
        if item in SETS:
            names += _set(item, norm)
            continue
        if item not in ATTACKS:
            close = difflib.get_close_matches(item, [*SETS, *ATTACKS.list()], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown attack set or attack {item!r}{hint} Sets: {', '.join(SETS)}; "
                             "attacks: robustbench-lite list attacks")
        if ATTACKS.get(item).cell_kind != "evasion":
            raise ValueError(f"{item} is a {ATTACKS.get(item).cell_kind} attack, not a per-point evasion attack; "
                             "run it from a preset or a TOML config")
        names.append(item)
        explicit.append(item)
    out: list[AttackSpec] = []
    for name in dict.fromkeys(names):
        if norm not in ATTACKS.get(name).norms:
            continue
        spec = _spec(name, num_classes)
        if spec is not None:
            out.append(spec)
    if not out:
        supported = {a: [n.value for n in ATTACKS.get(a).norms] for a in dict.fromkeys(explicit)}
        raise ValueError(f"none of the attacks {', '.join(items)} runs under {norm.value} (norms: {supported}); "
                         "pick attacks for this norm (robustbench-lite list attacks shows each one's norms)")
    return tuple(out)
