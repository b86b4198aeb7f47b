"""Adversarial examples as files: what ``--save-adv`` writes and ``replay`` reads back.

An evaluation that keeps its examples hands each attack's finds (the points it broke) to an
:class:`AdvSink`; the harness's sink writes one safetensors file per (model, attack, threat), so a
third party can re-judge a robustness claim without rerunning the attacks
(:mod:`~robustbench_lite.eval.replay`).  A file holds plain tensors and string metadata, never
a pickle:

* ``x_adv`` (float32, ``[k, C, H, W]``): the adversarial images, pixels in [0, 1];
* ``index`` (int64, ``[k]``): each one's position in the test split (the original point);
* ``label`` (int64, ``[k]``): the original point's label;
* ``pred`` (int64, ``[k]``): the class the model gave the adversarial image when it was judged;
* metadata: :data:`FORMAT` and :data:`FORMAT_VERSION`, the dataset and a fingerprint of the
  evaluated points, the threat (``norm``, ``eps``), the attack and its settings (JSON), the model's
  identity (its cache key, weights hash and a hash of its state dict), the cell key and the code
  version (see :func:`example_metadata`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..core.threat import ThreatModel

if TYPE_CHECKING:
    from ..core.attack import EvasionAttack

FORMAT = "robustbench-lite/adversarial-examples"
FORMAT_VERSION = "1"
TENSORS = ("x_adv", "index", "label", "pred")
#: metadata every file carries (more keys may follow)
REQUIRED_META = ("format", "format_version", "dataset", "data_fingerprint", "n", "norm", "eps", "attack", "attack_params",
                 "model", "model_key", "state_fingerprint")


@dataclass(frozen=True)
class AdvExamples:
    """Adversarial images of some evaluated points, on the CPU: ``index`` into the evaluated
    points (the test split's first ``n``), their ``label`` and the ``pred`` the model gave."""

    index: Tensor
    x_adv: Tensor
    label: Tensor
    pred: Tensor

    def __post_init__(self) -> None:
        k = self.index.shape[0]
        if self.x_adv.dim() != 4 or any(t.dim() != 1 or t.shape[0] != k for t in (self.index, self.label, self.pred)) \
                or self.x_adv.shape[0] != k:
            raise ValueError(f"adversarial examples need x_adv [k, C, H, W] and index, label, pred [k]; got "
                             f"{[tuple(t.shape) for t in (self.x_adv, self.index, self.label, self.pred)]}")

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @classmethod
    def empty(cls, like: Tensor) -> AdvExamples:
        """No examples, for images shaped like ``like`` (``[*, C, H, W]``)."""
        long = torch.empty(0, dtype=torch.long)
        return cls(long, torch.empty(0, *like.shape[1:], dtype=torch.float32), long, long)

    @classmethod
    def concat(cls, parts: Sequence[AdvExamples]) -> AdvExamples:
        """All ``parts`` in one, sorted by index; where an index repeats, the later part's example wins."""
        if not parts:
            raise ValueError("AdvExamples.concat needs at least one part")
        index = torch.cat([p.index for p in parts])
        x = torch.cat([p.x_adv for p in parts])
        label, pred = torch.cat([p.label for p in parts]), torch.cat([p.pred for p in parts])
        last: dict[int, int] = {int(i): j for j, i in enumerate(index.tolist())}
        keep = torch.tensor(sorted(last.values(), key=lambda j: int(index[j])), dtype=torch.long)
        return cls(index[keep], x[keep], label[keep], pred[keep])


class AdvSink(Protocol):
    """Where an evaluation puts the adversarial examples it judged adversarial."""

    def attack(self, position: int, attack: EvasionAttack, examples: AdvExamples, *, adaptive: bool) -> None:
        """The finds of the attack at ``position`` (in the evaluated list): its own run, or with
        ``adaptive`` its rerun through wrappers on the points the run left (added to the run's)."""

    def escalation(self, threat: ThreatModel, step: str, attacks: Sequence[EvasionAttack], examples: AdvExamples) -> None:
        """The finds of one escalation-ladder step on ``threat`` (its ``attacks`` in order)."""


@dataclass(frozen=True)
class SavedExamples:
    """One file's examples and metadata."""

    path: Path
    examples: AdvExamples
    meta: dict[str, str]

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.meta["norm"], float(self.meta["eps"]))

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    @property
    def attack(self) -> str:
        return self.meta["attack"]


def write_examples(path: str | Path, examples: AdvExamples, meta: Mapping[str, str]) -> Path:
    """Write ``examples`` with ``meta`` (string values; :data:`FORMAT` and its version are added)
    to ``path`` atomically: a temporary file beside it, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**{str(k): str(v) for k, v in meta.items()}, "format": FORMAT, "format_version": FORMAT_VERSION,
                "count": str(len(examples))}
    tensors = {
        "x_adv": examples.x_adv.detach().to("cpu", torch.float32).contiguous(),
        "index": examples.index.detach().to("cpu", torch.long).contiguous(),
        "label": examples.label.detach().to("cpu", torch.long).contiguous(),
        "pred": examples.pred.detach().to("cpu", torch.long).contiguous(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_examples_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`write_examples`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all
        return False


def read_examples(path: str | Path) -> SavedExamples:
    """The examples and metadata of a file :func:`write_examples` wrote; anything else raises
    ``ValueError`` naming the problem (safetensors only: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adversarial examples file {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in TENSORS if k in names}
    except Exception as exc:
        raise ValueError(f"{path.name} is not a readable safetensors file ({type(exc).__name__}); pass a file that "
                         "--save-adv wrote") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not an adversarial-examples file (its metadata has no format {FORMAT!r}); "
                         "pass a file that --save-adv wrote")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path.name} has format version {meta.get('format_version')!r}; this version reads "
                         f"{FORMAT_VERSION!r}")
    missing = [k for k in TENSORS if k not in tensors] + [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path.name} lacks {', '.join(missing)}; the file is damaged or from another tool")
    if not tensors["x_adv"].is_floating_point() or any(tensors[k].dtype != torch.long for k in TENSORS[1:]):
        raise ValueError(f"{path.name}: x_adv must be float and index, label, pred int64")
    try:
        examples = AdvExamples(tensors["index"], tensors["x_adv"].float(), tensors["label"], tensors["pred"])
        json.loads(meta["attack_params"])
        ThreatModel(meta["norm"], float(meta["eps"]))
        n = int(meta["n"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    if len(examples) and (int(examples.index.min()) < 0 or int(examples.index.max()) >= n):
        raise ValueError(f"{path.name}: indices must lie in [0, {n}), the evaluated points")
    return SavedExamples(path, examples, meta)


def example_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named by ``paths``: each file itself, each folder's adversarial-examples files
    (searched recursively, in sorted order; other files there are skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*.safetensors")) if is_examples_file(f))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no file or folder {str(p)!r}; pass the folder --save-adv wrote or files in it")
    return out
