"""``--save-adv DIR``: each evasion attack's adversarial examples, one file per (model, attack, threat).

The evasion kind hands :func:`~robustbench_lite.eval.evasion.evaluate` an :class:`AdvWriter`;
every attack's finds (its plain run, then its adaptive rerun added) and every escalation step's
finds are written the moment they are judged, before their stage is checkpointed, so a killed
run that resumes has the files of every stage it does not redo.  The files
(:mod:`~robustbench_lite.eval.adversarial`) carry the model's identity, the dataset, the threat
and the attack's settings; ``robustbench-lite replay`` re-judges them.  The tensors never enter
the results store.

File names are ``<dataset>__<model>__<defense>__<attack>__<norm>_<eps>__<key>.safetensors``
(every part sanitized to letters, digits, ``.``, ``_`` and ``-``; ``key`` is the start of the
cell's store key, so two settings of one attack never share a file); an escalation step's file
names the step (``escalation-square``) and the key of its threat's worst case.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..core.attack import EvasionAttack
from ..core.threat import ThreatModel
from ..eval.adversarial import AdvExamples, read_examples, write_examples
from ..training.weights import state_fingerprint

if TYPE_CHECKING:
    from .kinds import Group
    from .plan import Cell

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, limit: int = 48) -> str:
    """``text`` as a file-name part: runs of other characters become ``_``, no leading dot or
    dash (no hidden file, no option), at most ``limit`` characters; never empty."""
    out = _UNSAFE.sub("_", str(text)).lstrip(".-_")[:limit].rstrip(".")
    return out or "x"


def _stem(cell: Cell, what: str, key: str) -> str:
    parts = (cell.data.name, cell.model.name, cell.defense.name, what, cell.threat.label)
    return "__".join(safe_name(p) for p in parts) + f"__{safe_name(key, 12)}"


def attack_file(root: str | Path, cell: Cell) -> Path:
    """Where the examples of an evasion cell go."""
    return Path(root) / f"{_stem(cell, cell.attack.name, cell.key)}.safetensors"


def escalation_file(root: str | Path, cell: Cell, step: str, threat_key: str) -> Path:
    """Where one escalation step's examples on ``cell``'s threat go (``threat_key``: its worst case's key)."""
    return Path(root) / f"{_stem(cell, f'escalation-{step}', threat_key)}.safetensors"


def check_save_dir(path: str | Path) -> Path:
    """``path`` as a folder for the examples, made now so a bad one fails before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(20, "a file is in the way of the --save-adv folder; pick another", str(path))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


class AdvWriter:
    """An :class:`~robustbench_lite.eval.adversarial.AdvSink` for one evaluation of a group.

    ``cells`` are the evaluated cells in the order of the attacks passed to ``evaluate``;
    ``threat_keys`` maps each threat to its worst case's key (names the escalation files)."""

    def __init__(self, root: str | Path, cells: Sequence[Cell], group: Group, n: int,
                 threat_keys: Mapping[ThreatModel, str]) -> None:
        self.root, self.cells, self.group, self.n, self.threat_keys = Path(root), list(cells), group, n, threat_keys
        self.written: set[int] = set()
        self.failed = 0
        self._identity: dict[str, str] | None = None

    def identity(self) -> dict[str, str]:
        """The metadata every file of the group shares (the model's and the data's identity)."""
        if self._identity is None:
            g, first = self.group, self.cells[0]
            self._identity = {
                "dataset": first.data.name, "data": json.dumps(first.data.as_dict(), sort_keys=True, default=str),
                "data_fingerprint": g.data.test.head(self.n).fingerprint(), "n": str(self.n),
                "model": first.model.name, "model_spec": json.dumps(first.model.as_dict(), sort_keys=True, default=str),
                "defense": first.defense.name,
                "defense_spec": json.dumps(first.defense.as_dict(), sort_keys=True, default=str),
                "model_key": g.trained.key, "weights_sha256": str(g.trained.sidecar.get("weights_sha256", "")),
                "state_fingerprint": state_fingerprint(g.trained.model), "code_version": g.version,
            }
        return self._identity

    def attack(self, position: int, attack: EvasionAttack, examples: AdvExamples, *, adaptive: bool) -> None:
        cell = self.cells[position]
        path = attack_file(self.root, cell)
        complete = True
        if adaptive:  # added to the plain run's finds (this run's, or a killed run's file)
            if path.is_file():
                try:
                    saved = read_examples(path)
                    examples = AdvExamples.concat([saved.examples, examples])
                    complete = saved.meta.get("complete", "true") == "true"
                except (OSError, ValueError) as exc:
                    log.warning("cannot read %s to add the adaptive rerun's examples (%s); rewriting it", path, exc)
                    complete = False
            elif position not in self.written:
                complete = False  # the plain run's stage came from a run without --save-adv
        meta = {
            **self.identity(), "attack": attack.name,
            "attack_params": json.dumps(attack.get_params(), sort_keys=True, default=str),
            "norm": cell.threat.norm.value, "eps": repr(float(cell.threat.eps)), "scope": "survivors" if cell.survivors else "all",
            "cell_key": cell.key, "adaptive": str(adaptive).lower(), "complete": str(complete).lower(),
        }
        self._write(path, examples, meta)
        self.written.add(position)

    def escalation(self, threat: ThreatModel, step: str, attacks: Sequence[EvasionAttack], examples: AdvExamples) -> None:
        cell = next(c for c in self.cells if c.threat == threat)
        key = self.threat_keys.get(threat, cell.key)
        meta = {
            **self.identity(), "attack": f"escalation:{step}",
            "attack_params": json.dumps({"step": step, "attacks": [{"name": a.name, **a.get_params()} for a in attacks]},
                                        sort_keys=True, default=str),
            "norm": threat.norm.value, "eps": repr(float(threat.eps)), "scope": "survivors", "cell_key": key,
            "adaptive": "false", "complete": "true",
        }
        self._write(escalation_file(self.root, cell, step, key), examples, meta)

    def _write(self, path: Path, examples: AdvExamples, meta: dict[str, str]) -> None:
        try:
            write_examples(path, examples, meta)
        except OSError as exc:  # the evaluation goes on; the missing file is reported after it
            self.failed += 1
            log.error("cannot write adversarial examples to %s: %s", path, exc.strerror or exc)


def missing_files(root: str | Path, cells: Sequence[Cell]) -> list[Cell]:
    """The evasion cells whose examples file is not in ``root``."""
    return [c for c in cells if not attack_file(root, c).is_file()]


def saved_starts(root: str | Path, cell: Cell, group: Group, like: Tensor) -> Tensor | None:
    """The group's saved adversarial examples on ``cell``'s threat and first ``len(like)`` points,
    as candidate counterexamples for a complete verifier: ``[n, *x]`` float32 with NaN rows where
    no attack broke the point (``None``: no file of this model, data and threat in ``root``).
    A file counts only when its model key, state fingerprint, threat and data fingerprint are the
    group's; the verifier re-checks every start on the model itself."""
    root, n = Path(root), like.shape[0]
    prefix = "__".join(safe_name(p) for p in (cell.data.name, cell.model.name, cell.defense.name)) + "__"
    out, state, prints = None, None, {}
    for path in sorted(root.glob(f"{prefix}*.safetensors")):
        try:
            saved = read_examples(path)
        except (OSError, ValueError) as exc:
            log.warning("skipping %s as starts for %s: %s", path.name, cell.attack.name, exc)
            continue
        meta = saved.meta
        if meta["model_key"] != group.trained.key or saved.threat != cell.threat or saved.n < 1:
            continue
        if meta["data_fingerprint"] != prints.setdefault(saved.n, group.data.test.head(saved.n).fingerprint()):
            continue
        if state is None:
            state = state_fingerprint(group.trained.model)
        if meta["state_fingerprint"] != state:
            continue
        ex = saved.examples
        keep = ex.index < n
        if out is None:
            out = torch.full((n, *like.shape[1:]), float("nan"), dtype=torch.float32)
        out[ex.index[keep]] = ex.x_adv[keep].reshape(-1, *like.shape[1:])
    return out
