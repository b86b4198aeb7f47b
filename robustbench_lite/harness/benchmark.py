"""``benchmark()``: RobustBench's one call, on this package's harness.

    clean_acc, robust_acc = benchmark(model, dataset="fashion-mnist", threat_model="Linf", eps=0.1,
                                      n_examples=1000, device="auto", batch_size=500, attacks="standard")

Shaped like ``robustbench.eval.benchmark(model, n_examples, dataset, threat_model, to_disk,
model_name, data_dir, device, batch_size, eps)``, which returns clean and AutoAttack accuracy.
Here the attacks are a named set (``standard``: APGD-CE, APGD-T-DLR, ACG, Square on survivors, as
AutoAttack's standard version runs its attacks) or a list, the robust accuracy is the per-point
worst case over them, and the model runs through the harness like any trained model: with a
``workdir`` every row (flags included) is stored there and a second call with the same weights
resumes instead of recomputing; without one the store is a temporary folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.data import dataset_default_eps
from ..core.progress import Progress
from ..core.registry import DATASETS
from ..core.threat import Norm, ThreatModel
from .kinds.evasion import worst_case_key
from .plan import Plan
from .run import run_plan
from .store import Store
from .user import check_on_data, prepare, resolve_data, user_cells


def benchmark(
    model: nn.Module,
    n_examples: int = 1000,
    dataset: Any = "fashion-mnist",
    threat_model: str | Norm = "Linf",
    *,
    eps: float | None = None,
    attacks: str | Sequence[str] = "standard",
    model_name: str | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    batch_size: int | str = 500,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    workdir: str | Path | None = None,
    autocast: str = "auto",
    progress: bool | Progress = True,
    save_adv: str | Path | None = None,
    access: str = "gradients",
) -> tuple[float, float]:
    """Clean accuracy and worst-case robust accuracy of ``model`` on the first ``n_examples``
    points of ``dataset`` (a registered name, a folder, an ``.npz`` path, a :class:`Data`, or an
    ``(x, y)`` pair of images in [0, 1] or uint8) under ``threat_model`` (``"Linf"``, ``"L2"``)
    at ``eps`` (pixels in [0, 1]; default: the dataset's usual budget).

    ``normalize=(mean, std)`` puts the model's input normalization in front of it; ``model_name``
    names the row (default ``user-weights``); ``workdir`` keeps the rows and resumes; ``save_adv``
    names a folder for each attack's adversarial examples (safetensors with the points' indices,
    the threat and the attack's settings: ``robustbench-lite replay`` re-judges them).  ``progress``
    shows bars on a terminal and INFO lines on the ``robustbench_lite.progress`` logger elsewhere
    (``False``: neither; or a :class:`~robustbench_lite.core.progress.Progress`).  ``access``
    ``"labels"`` (or ``"scores"``) evaluates the model as an API that returns only its predicted
    label (or its scores): give decision-based attacks (``attacks=["hsj"]``); the others are
    skipped with a note in their rows."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be a positive int, got {n_examples!r}")
    if isinstance(threat_model, str) and threat_model.strip().lower() == "corruptions":
        raise ValueError("threat_model 'corruptions' is not supported; use 'Linf' or 'L2'")
    norm = Norm.parse(threat_model)
    spec_data, data = resolve_data(dataset, data_root=data_dir)
    if eps is None:
        eps = dataset_default_eps(spec_data.name, norm) if spec_data.name in DATASETS else None
        if eps is None:
            raise ValueError(f"no default eps for {spec_data.name!r} under {norm.value}; pass eps= (pixels in [0, 1], "
                             "e.g. eps=8/255)")
    threat = ThreatModel(norm, eps)
    model_spec, weights_spec, built = prepare(data, module=model, normalize=normalize, name=model_name, access=access)
    k = check_on_data(built, data)
    n = min(n_examples, len(data.test))
    cells = user_cells(spec_data, model_spec, weights_spec, threats=[threat], attacks=attacks, n=n, num_classes=k)
    with tempfile.TemporaryDirectory(prefix="rbl-benchmark-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        run_plan(Plan("benchmark", tuple(cells)), workdir=root, device=str(device), data_root=data_dir,
                 batch_size=batch_size, progress=progress, autocast=autocast, save_adv=save_adv)
        with Store(root / "store.sqlite") as store:
            hit = store.get(worst_case_key(cells))
            errors = [r.error.splitlines()[0] for c in cells if (r := _row(store, c.key)) is not None and r.error]
    if hit is None:
        raise RuntimeError(f"every attack failed, so there is no robust accuracy: {errors[0] if errors else 'no rows'}")
    row = hit[0]
    return float(row.clean_acc), float(row.robust_acc)


def _row(store: Store, key: str):
    hit = store.get(key)
    return None if hit is None else hit[0]
