"""The curve kind: each attack's robust accuracy over a grid of eps, in one run per attack, the
worst case over the attacks at every eps, and each attack's AttackBench optimality score.

A curve cell is a :class:`CurveCell`: an attack, a norm, the grid (its largest eps is the cell's
threat), ``n`` points and the order the grid is walked in (``up``, or AttackBench's ``down``
search).  The kind runs :func:`~robustbench_lite.eval.curve.attack_curve` for
each attack (a point an attack broke at eps is not attacked again at larger eps), stores each
attack's row the moment it is measured (its per-point distances go into the row's private
``_distances`` metric, so a resumed run reuses them), then one ``worst_case`` row per grid (the
per-point best distance over the attacks) and every attack's optimality against it.

Table ``<dataset>_curve.csv``: one row per model, defense, attack and eps of the grid (eps 0 is
the clean accuracy), with the attack's optimality and normalised area beside its curve.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import Tensor

from ...core.access import access_note, model_access
from ...core.config import config_hash
from ...core.models import predict
from ...eval import flags as checks
from ...eval.bracket import Proof
from ...eval.curve import (
    ORDERS,
    area,
    attack_curve,
    best_distances,
    decode,
    encode,
    optimality,
    robust_at,
    robust_curve,
)
from ..identity import distinguish
from ..plan import Cell
from ..rows import SKIPPED, WORST_CASE, CellResult, Row, cell_row, error_row, model_identity
from ..store import Store
from . import CellKind, Group, register_kind, rows_of_kind

log = logging.getLogger(__name__)

MAX_POINTS = 200  # eps values per curve


@dataclass(frozen=True)
class CurveCell(Cell):
    """A curve: ``attack`` at every eps of ``grid`` (positive, ascending; the threat's eps is the
    largest).  The grid is part of the key."""

    grid: tuple[float, ...] = ()
    order: str = "up"  # "down": AttackBench's search (see eval.curve.attack_curve)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"a curve's order is one of {ORDERS}, got {self.order!r}")
        grid = tuple(sorted({float(e) for e in self.grid}))
        if not grid or grid[0] <= 0:
            raise ValueError(f"a curve grid needs eps > 0 (eps 0 is the clean accuracy), got {list(self.grid)}")
        if len(grid) > MAX_POINTS:
            raise ValueError(f"a curve has at most {MAX_POINTS} eps values, got {len(grid)}")
        if abs(grid[-1] - self.threat.eps) > 1e-12:
            raise ValueError(f"a curve cell's threat eps must be its grid's largest, {grid[-1]}, got {self.threat.eps}")
        object.__setattr__(self, "grid", grid)


@dataclass(frozen=True)
class CurveRow:
    """One attack's curve (or the worst case over a grid's attacks)."""

    norm: str
    eps: float  # the grid's largest eps
    points: int  # eps values of the grid (eps 0 not counted)
    n: int
    clean_acc: float
    robust_acc: float | None  # at the largest eps
    area: float | None  # area under the curve on [0, eps] divided by eps: the mean of min(d, eps) / eps
    optimality: float | None  # AttackBench optimality against the per-point best of the grid's attacks
    attacked: int  # points attacked, summed over the grid
    seconds: float


@register_kind("curve")
class Curve(CellKind):
    """Robust accuracy vs eps per attack, the worst case, and each attack's optimality."""

    row: ClassVar[type] = CurveRow
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (("attack", True), ("eps", True))
    order: ClassVar[int] = 2
    hidden_in_terminal: ClassVar[tuple[str, ...]] = ("dataset", "status", "error")
    own_section: ClassVar[str] = '[[curves]] with curve = "linf:0:0.2:11"'

    def key_fields(self, cell: Cell) -> dict[str, Any]:
        return {"grid": list(getattr(cell, "grid", ())), "order": getattr(cell, "order", "up")}

    def run(self, cells: Sequence[Cell], group: Group) -> list[Row]:
        rows: list[Row] = []
        bundles: dict[tuple, list[CurveCell]] = {}
        for c in cells:
            bundles.setdefault(_bundle(c), []).append(c)  # type: ignore[arg-type]
        model_flags: set[str] | None = None
        for part in bundles.values():
            if all(c.key in group.done for c in part):
                continue
            if model_flags is None:
                model_flags = _model_flags(group, max(c.n for c in cells))
            rows.extend(self._run_bundle(part, group, model_flags))
        return rows

    def _run_bundle(self, cells: list[CurveCell], group: Group, model_flags: set[str]) -> list[Row]:
        from .evasion import _batch_rule  # the evasion kind's batch-size rule (fixed, or autotuned)

        first = cells[0]
        split = group.data.test.head(first.n)
        model = group.policy.model_to(group.trained.model).eval()
        with group.policy.autocast("eval"):
            correct = predict(model, split.x, group.policy.device) == split.y
        clean = float(correct.float().mean())
        batch = _batch_rule(group, first.n)
        given = model_access(model)
        out: list[Row] = []
        for cell in cells:
            if cell.key in group.done:
                continue
            try:
                needed = cell.build().access()
                if not given.covers(needed):  # e.g. a gradient attack on a label-only model: not run, said why
                    note = access_note(cell.attack.name, needed, given)
                    out.append(group.add(cell_row(cell, status=SKIPPED, error=note, clean_acc=clean, n=first.n,
                                                  model_key=group.trained.key, code_version=group.version), None))
                    continue
                rec = attack_curve(
                    model, lambda eps, cell=cell: _attack_at(cell, eps), cell.grid, split, correct,
                    policy=group.policy, batch_size=batch(cell.build()) if callable(batch) else batch,
                    order=cell.order, progress=group.progress,
                    label=f"curve {cell.attack.name} {cell.threat.norm.value} ({len(cell.grid)} eps, order {cell.order})",
                )
            except Exception as exc:
                log.warning("curve of %s failed: %s", cell.attack.name, exc)
                row = error_row(cell, f"{type(exc).__name__}: {exc}", group.version, model_key=group.trained.key)
                out.append(group.add(row, None))
                continue
            values = CurveRow(cell.threat.norm.value, cell.threat.eps, len(cell.grid), cell.n, clean,
                              rec.robust_acc(cell.threat.eps), area(rec.distances, cell.threat.eps) / cell.threat.eps,
                              None, rec.attacked, rec.seconds)
            row = self.result(cell, group, values, method=cell.build(), grad_evals=rec.grad_evals,
                              forward_evals=rec.forward_evals)
            row = _with_curve(row, cell.grid, rec.distances)
            group.add(row, rec.distances > cell.threat.eps)  # stored now; returned below with its optimality
        known = group.latest()
        latest = {c.key: known[c.key] for c in cells if c.key in known}
        for row, mask in finish(cells, latest, model_flags, group.version):
            out.append(group.add(row, mask, emit=False))
        return out

    def summary_line(self, row: CellResult) -> str | None:
        if row.status != "ok":
            return None
        m = json.loads(row.metrics or "{}")
        curve = ", ".join(f"{e:g}:{a:.2f}" for e, a in zip(m.get("grid", []), m.get("curve", []), strict=False))
        score = m.get("optimality")
        if row.attack == WORST_CASE:
            tag = "worst case"
        else:
            tag = row.attack if score is None else f"{row.attack} (optimality {score:.3f})"
        return f"curve {row.norm} {tag}: {curve}"

    def refresh(
        self, cells: Sequence[Cell], store: Store, labels: Callable[[], Tensor], proofs: Sequence[Proof] = ()
    ) -> None:
        """Optimality and the worst case of finished curves, from the stored distances."""
        from ..run import code_version

        bundles: dict[tuple, list[Cell]] = {}
        for c in cells:
            bundles.setdefault(_bundle(c), []).append(c)
        for part in bundles.values():
            latest = {c.key: hit for c in part if (hit := store.get(c.key)) is not None}
            for row, mask in finish(part, latest, None, code_version()):
                store.put(row, mask)

    # -- tables ---------------------------------------------------------------------------------
    def tables(self, rows: Sequence[CellResult]) -> dict[str, pd.DataFrame]:
        """``<dataset>_curve``: one row per model, defense, attack and eps (0 = clean)."""
        by_dataset: dict[str, list[dict[str, Any]]] = {}
        for r in rows_of_kind(distinguish(rows), self.name):
            m = json.loads(r.metrics) if r.metrics else {}
            base = {"dataset": r.dataset, "model": r.model, "defense": r.defense, "attack": r.attack, "norm": r.norm}
            tail = {"n": r.n, "optimality": m.get("optimality"), "area": m.get("area"), "flags": r.flags,
                    "status": r.status, "error": r.error.splitlines()[0][:200] if r.error else ""}
            grid, curve = m.get("grid"), m.get("curve")
            if r.status != "ok" or not grid or not curve:
                by_dataset.setdefault(r.dataset, []).append({**base, "eps": r.eps, "robust_acc": float("nan"), **tail})
                continue
            for eps, acc in zip([0.0, *grid], [r.clean_acc, *curve], strict=True):
                by_dataset.setdefault(r.dataset, []).append({**base, "eps": eps, "robust_acc": acc, **tail})
        out = {}
        for dataset, table_rows in sorted(by_dataset.items()):
            t = pd.DataFrame(table_rows)
            t["_wc"] = t["attack"] == WORST_CASE
            t = t.sort_values(["model", "defense", "norm", "_wc", "attack", "eps"], kind="stable").drop(columns="_wc")
            out[f"{dataset}_{self.name}"] = t.reset_index(drop=True)
        return out


def _bundle(cell: Cell) -> tuple:
    return (cell.threat.norm, getattr(cell, "grid", ()), cell.n, getattr(cell, "order", "up"))


def _attack_at(cell: Cell, eps: float):
    from ...core.registry import create_attack

    return create_attack(cell.attack.name, norm=cell.threat.norm, eps=eps, **cell.attack.params)


def _model_flags(group: Group, n: int) -> set[str]:
    """The evasion kind's model-level checks (zero gradients, probability outputs, randomized
    outputs, a huge-eps probe) on the clean-correct points."""
    from ...eval.evasion import input_grad_norms, model_checks

    split = group.data.test.head(n)
    model, device = group.trained.model, group.policy.device
    correct = predict(model, split.x, device) == split.y
    ok = split.subset(correct.nonzero().flatten())
    found = set(model_checks(model, ok, device))
    flag = checks.zero_gradients(input_grad_norms(model, ok, device))
    return found | ({flag} if flag else set())


def _with_curve(row: CellResult, grid: Sequence[float], distances: torch.Tensor, **extra: Any) -> CellResult:
    """``row`` with the curve, the grid and the per-point distances in its metrics."""
    metrics = json.loads(row.metrics) if row.metrics else {}
    metrics.update({"grid": list(grid), "curve": robust_curve(distances, grid), "_distances": encode(distances), **extra})
    return CellResult(**{**row.as_row(), "metrics": json.dumps(metrics)})


def finish(cells: Sequence[Cell], latest: Mapping[str, Row], model_flags: set[str] | None, version: str) -> list[Row]:
    """Every attack row of one grid again, with its optimality and flags, and the grid's
    ``worst_case`` row (the per-point best distance over the attacks that finished)."""
    ok = [(c, latest[c.key]) for c in cells if c.key in latest and latest[c.key][0].status == "ok"]
    ok = [(c, hit) for c, hit in ok if "_distances" in json.loads(hit[0].metrics or "{}")]
    if not ok:
        return []
    eps_max = cells[0].threat.eps
    grid = cells[0].grid  # type: ignore[attr-defined]
    dist = {c.key: decode(json.loads(hit[0].metrics)["_distances"]) for c, hit in ok}
    best = best_distances(list(dist.values()))
    flags = _curve_flags([(c, dist[c.key]) for c, _ in ok], grid, model_flags)
    out: list[Row] = []
    for c, (row, _) in ok:
        metrics = json.loads(row.metrics)
        metrics["optimality"] = optimality(dist[c.key], best, eps_max)
        mine = set(flags.get(c.attack.name, set())) | set(f for f in row.flags.split(";") if f)
        new = CellResult(**{**row.as_row(), "metrics": json.dumps(metrics), "flags": checks.join(mine)})
        out.append((new, dist[c.key] > eps_max))
    ref = ok[0][1][0]
    found = set(flags.get(WORST_CASE, set()))
    skipped = sum(1 for c in cells if c.key in latest and latest[c.key][0].status == SKIPPED)
    if len(ok) + skipped < len(cells):  # a skipped attack (needs more of the model than it gives) is no gap
        found.add(checks.INCOMPLETE)
    wc = CellResult(
        dataset=ref.dataset, model=ref.model, defense=ref.defense, attack=WORST_CASE, norm=ref.norm, eps=eps_max,
        kind=ref.kind, n=ref.n, clean_acc=ref.clean_acc, robust_acc=robust_at(best, eps_max),
        seconds=sum(r.seconds for _, (r, _) in ok), grad_evals=sum(r.grad_evals for _, (r, _) in ok),
        forward_evals=sum(r.forward_evals for _, (r, _) in ok), attacked=max(r.attacked for _, (r, _) in ok),
        scope="all", target_hit_rate=None, success_rate=None, median_l2=None, flags=checks.join(found), status="ok",
        error="", train_seconds=ref.train_seconds, attack_params=json.dumps(sorted(c.attack.name for c, _ in ok)),
        key=config_hash({"curve_worst_case": sorted(c.key for c in cells)}), model_key=ref.model_key,
        **model_identity(cells[0]),
        code_version=version,
        metrics=json.dumps({"points": len(grid), "area": area(best, eps_max) / eps_max, "optimality": None}),
    )
    out.append((_with_curve(wc, grid, best), best > eps_max))
    return out


def _curve_flags(curves: Sequence[tuple[Cell, torch.Tensor]], grid: Sequence[float],
                 model_flags: set[str] | None) -> dict[str, set[str]]:
    """Model-level flags on the gradient attacks (and the worst case), and single-step beats
    iterative at any eps of the grid."""
    from ...core.registry import ATTACKS

    out: dict[str, set[str]] = {WORST_CASE: set()}
    info = {c.attack.name: ATTACKS.get(c.attack.name) for c, _ in curves}
    for c, _ in curves:
        cls = info[c.attack.name]
        mine = out.setdefault(c.attack.name, set())
        for code in model_flags or ():
            if cls.needs_grad or code == checks.RANDOMIZED:
                mine.add(code)
                out[WORST_CASE].add(code)
    own = [(c, d) for c, d in curves if info[c.attack.name].needs_grad and not info[c.attack.name].targeted]
    for eps in grid:
        losers = checks.single_step_beats_iterative(
            {c.attack.name: robust_at(d, eps) for c, d in own},
            {c.attack.name: info[c.attack.name].iterative for c, _ in own},
        )
        for name in losers:
            out[name].add(checks.SINGLE_STEP_WINS)
            out[WORST_CASE].add(checks.SINGLE_STEP_WINS)
    return out
