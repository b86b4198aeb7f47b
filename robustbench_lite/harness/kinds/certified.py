"""The certified kind: what a verifier proves about each of a row's points, beside the worst case.

A certified cell names a verifier (:mod:`robustbench_lite.certify`) and a threat.  It verifies the
first ``n`` test points of the group's model (:meth:`~robustbench_lite.certify.Verifier.verify`)
and stores each point's status: the row's mask holds the *verified* points, the private metrics
``_falsified`` the *falsified* ones (a complete verifier's; the rest are undecided) and
``_counterexamples`` their adversarial examples (safetensors, zlib, base64; read them with
:func:`counterexamples`; never in a CSV).  Every counterexample is re-checked here by a forward
pass, whatever the verifier did: one outside the ball or the box, or classified correctly, is
rejected (its point undecided) and the row gets ``counterexample-rejected``.  A complete
verifier (``takes_starts``, e.g. ``bab``) starts from the group's adversarial examples on the same
threat where the run saves them (``--save-adv``: the evasion cells run first and write them;
:func:`~robustbench_lite.harness.advsave.saved_starts`); without them it runs its own attacks.  The row also holds
the verifier's seconds, the subdomains it explored, and the per-point certified radius found by
bisection on eps over ``[0, 2 eps]`` to ``eps / 4``
(:meth:`~robustbench_lite.certify.Verifier.radius`, started from the certificate at eps): the
certified-accuracy-vs-eps curve (``curve_eps``, ``curve``) that the report draws on the same axes
as the attacked curve.

Its rows are proofs (:meth:`Certified.proofs`) for the evasion worst case on the same points and
threat: a falsified point is broken there, and the row's ``certified`` column is the per-point
union over all the row's verifiers (see :mod:`~robustbench_lite.harness.kinds.evasion`).
``union_acc`` here is the same union over the group's certified cells on the same points and
threat, set again once the group is stored (:meth:`Certified.refresh`), so neither depends on the
order the verifiers ran in.  When the group has an evasion worst case on the same points and
threat, a certified point that an attack (or another verifier) broke raises ``certified-broken``
(the certificate, or the model, is unsound).  A model the verifier cannot parse (an unsupported
layer) raises a ``ValueError`` naming the layer and the supported ones; the base stores it as an
error row and the run goes on.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ...certify import VERIFIERS, Verification, create_verifier
from ...core.attack import eval_mode
from ...core.threat import ThreatModel
from ...eval.bracket import Proof
from ...eval.flags import CERTIFIED_BROKEN, COUNTEREXAMPLE_REJECTED, join
from ..advsave import saved_starts
from ..identity import distinguish
from ..plan import Cell
from ..rows import WORST_CASE, CellResult, Row
from . import CellKind, Group, register_kind, rows_of_kind, wide_key

if TYPE_CHECKING:
    from ..store import Store

COLUMN = "certified"
CURVE_STEPS = 4  # the radius bisection's resolution: eps / CURVE_STEPS, over [0, 2 eps]
VERIFY_CHUNK = 200  # points per verification call (progress steps) for a verifier without its own batch_size


@dataclass(frozen=True)
class CertifiedRow:
    norm: str
    eps: float
    n: int
    clean_acc: float
    certified_acc: float  # share of the n points proven robust in the whole ball
    worst_case: float | None  # the attacked worst case on the same points (an upper bound)
    seconds: float  # the verifier's time for the certificate at eps
    union_acc: float | None = None  # certified by this or an earlier verifier of the group (same points)
    verifiers: str = ""  # the verifiers of the union, '+'-joined
    curve_seconds: float | None = None  # the radius bisection
    curve_eps: list[float] | None = None
    curve: list[float] | None = None  # share of the n points with certified radius >= each curve_eps
    falsified_acc: float | None = None  # share of the n points proven not robust (a re-checked counterexample)
    subdomains: int = 0  # branch-and-bound subdomains explored over all points (0: an incomplete verifier)
    rejected: int = 0  # points whose claimed counterexample failed the re-check (counted undecided)
    _radii: list[float] | None = None  # per point (private: left out of the CSVs)
    _falsified: list[int] | None = None  # the falsified points' indices
    _counterexamples: str | None = None  # their adversarial examples (see counterexamples())


@register_kind("certified")
class Certified(CellKind):
    """Verified robustness: the share of points a verifier proves robust, beside the attacked worst case."""

    row: ClassVar[type] = CertifiedRow
    order: ClassVar[int] = 2  # after the evasion worst cases it is compared with
    sort: ClassVar[tuple[tuple[str, bool], ...]] = (
        ("norm", True), ("eps", True), ("model", True), ("defense", True), ("certified_acc", False),
    )

    def knows(self, method: str) -> bool:
        return method in VERIFIERS

    def build(self, cell: Cell) -> Any:
        return create_verifier(cell.attack.name, **cell.attack.params)

    def key_fields(self, cell: Cell) -> dict[str, Any]:
        return {"kind": self.name, "threat": cell.threat.label}

    def measure(self, cell: Cell, group: Group) -> Row:
        verifier = cell.build()
        points = group.data.test.head(cell.n)
        x, y = group.policy.batch_to(points.x), group.policy.batch_to(points.y)
        model = group.trained.model
        starts = None
        if verifier.takes_starts and group.save_adv is not None:  # the group's attacks' finds, tried first
            starts = saved_starts(group.save_adv, cell, group, points.x)
            starts = None if starts is None else group.policy.batch_to(starts)
        eps = cell.threat.eps
        seconds, curve_seconds, parts, radii_parts = 0.0, 0.0, [], []
        chunk = max(1, int(getattr(verifier, "batch_size", VERIFY_CHUNK)))
        what = f"verify {verifier.name} {cell.threat.norm.value} {eps:g}"
        with group.progress.task(what, len(points)) as task:
            # chunks of the verifier's own batch: its outcomes are per point, so the numbers are the same
            for i in range(0, max(1, len(points)), chunk):
                xs, ys = x[i : i + chunk], y[i : i + chunk]
                start = time.perf_counter()
                part = verifier.verify(model, xs, ys, cell.threat,
                                       starts=None if starts is None else starts[i : i + chunk])
                seconds += time.perf_counter() - start
                with eval_mode(model), torch.no_grad():  # the harness re-checks every counterexample, whatever the plugin did
                    part = part.recheck(model, xs, ys, cell.threat)
                start = time.perf_counter()
                radii_parts.append(verifier.radius(model, xs, ys, cell.threat.norm, hi=2 * eps, tol=eps / CURVE_STEPS,
                                                   known=(eps, part.verified)).cpu())
                curve_seconds += time.perf_counter() - start
                parts.append(part)
                task.update(len(ys))
            outcome = _joined(parts, points.x)
            radii = torch.cat(radii_parts)
            task.close(f"{int(outcome.verified.sum())} of {len(points)} points verified, {int(outcome.falsified.sum())} "
                       "falsified")
        certified, falsified = outcome.verified, outcome.falsified
        grid = [eps * i / CURVE_STEPS for i in range(2 * CURVE_STEPS + 1)]
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean()) if len(points) else float("nan")
        union, broken, names = certified.clone(), falsified.clone(), [label(verifier.name, verifier.get_params())]
        for row, mask in _certified_before(cell, group):
            union |= mask.cpu().bool()
            broken |= _falsified(row, mask.numel())
            names.append(label(row.attack, json.loads(row.attack_params or "{}")))
        worst = _worst_case(cell, group)
        if worst is not None:
            broken |= ~worst[1].cpu().bool()
        flags = {CERTIFIED_BROKEN} if bool((union & broken).any()) else set()
        if bool(outcome.rejected.any()):
            flags.add(COUNTEREXAMPLE_REJECTED)
        values = CertifiedRow(
            cell.threat.norm.value, eps, cell.n, clean, float(certified.float().mean()),
            None if worst is None else worst[0].robust_acc, seconds,
            union_acc=float(union.float().mean()), verifiers="+".join(sorted(set(names))),
            curve_seconds=curve_seconds, curve_eps=[round(e, 10) for e in grid],
            curve=[clean] + [float((radii >= e - 1e-12).float().mean()) for e in grid[1:]],  # eps 0: clean
            falsified_acc=float(falsified.float().mean()), subdomains=int(outcome.subdomains.sum()),
            rejected=int(outcome.rejected.sum()), _radii=[round(float(r), 8) for r in radii],
            _falsified=falsified.nonzero()[:, 0].tolist(), _counterexamples=_pack(outcome),
        )
        return self.result(cell, group, values, method=verifier, robust_acc=values.certified_acc, flags=join(flags)), certified

    def proofs(self, rows: Iterable[Row]) -> list[Proof]:
        """Each ok certified row with its mask: its verified points robust, its falsified ones broken."""
        out = []
        for row, mask in rows:
            if row.kind == self.name and row.status == "ok" and mask is not None:
                source = label(row.attack, json.loads(row.attack_params or "{}"))
                out.append(Proof(source, ThreatModel(row.norm, row.eps), mask.cpu().bool(), _falsified(row, mask.numel())))
        return out

    def refresh(
        self, cells: Sequence[Cell], store: Store, labels: Callable[[], Tensor], proofs: Sequence[Proof] = ()
    ) -> None:
        """``union_acc`` and ``verifiers`` of the group's certified rows: the per-point union over
        all of them on the same points and threat (a row measured before another verifier ran holds
        only the verifiers before it until now)."""
        stored = [hit for c in cells if (hit := store.get(c.key)) is not None and hit[0].status == "ok" and hit[1] is not None]
        fresh = []
        for row, mask in stored:
            same = [(r, m) for r, m in stored if r.n == row.n and r.norm == row.norm and r.eps == row.eps and m.shape == mask.shape]
            union = torch.zeros_like(mask, dtype=torch.bool)
            for _, m in same:
                union |= m.bool()
            names = sorted({label(r.attack, json.loads(r.attack_params or "{}")) for r, _ in same})
            metrics = json.loads(row.metrics) if row.metrics else {}
            update = {"union_acc": float(union.float().mean()), "verifiers": "+".join(names)}
            if any(metrics.get(k) != v for k, v in update.items()):
                fresh.append((replace(row, metrics=json.dumps({**metrics, **update})), mask))
        if fresh:
            store.put_many(fresh)

    def wide_columns(self, rows: list[CellResult]) -> dict[tuple, dict[str, Any]]:
        """The certified rows' flags, and a ``certified`` column (the largest union) for rows whose
        worst case holds no bracket yet (a store written before brackets existed): the evasion
        tables take ``certified`` from the worst case's bracket where it has one."""
        out: dict[tuple, dict[str, Any]] = {}
        for r in rows_of_kind(distinguish(rows), self.name):
            if r.status != "ok" or r.robust_acc is None:
                continue
            cols = out.setdefault(wide_key(r), {COLUMN: 0.0, "flags": set()})
            union = json.loads(r.metrics).get("union_acc") if r.metrics else None
            cols[COLUMN] = max(cols[COLUMN], r.robust_acc, union if union is not None else 0.0)
            cols["flags"].update(f for f in r.flags.split(";") if f)
        return out


def counterexamples(row: CellResult) -> tuple[Tensor, Tensor]:
    """``(index, x_adv)`` of a certified row: the falsified points' indices among its ``n`` points
    (int64 ``[F]``) and their adversarial examples (``[F, C, H, W]``), re-checked when measured."""
    text = json.loads(row.metrics).get("_counterexamples") if row.metrics else None
    if not text:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    from safetensors.torch import load

    tensors = load(zlib.decompress(base64.b64decode(text)))
    return tensors["index"], tensors["x_adv"]


def _pack(outcome: Verification) -> str | None:
    """The falsified points' adversarial examples as text for the row's metrics (None: none)."""
    index, x_adv = outcome.adversarial()
    if index.numel() == 0:
        return None
    from safetensors.torch import save

    blob = save({"index": index.to(torch.int64).contiguous(), "x_adv": x_adv.contiguous()})
    return base64.b64encode(zlib.compress(blob, 6)).decode("ascii")


def _falsified(row: CellResult, n: int | None = None) -> Tensor:
    """A certified row's falsified points as a bool mask of its points."""
    n = row.n if n is None else n
    mask = torch.zeros(n, dtype=torch.bool)
    index = json.loads(row.metrics).get("_falsified") if row.metrics else None
    if index:
        mask[torch.as_tensor(index, dtype=torch.long)] = True
    return mask


def _joined(parts: list[Verification], like: Tensor) -> Verification:
    """The outcomes of consecutive chunks of points as one (``like``: the points, for the shape of
    the counterexamples)."""
    if len(parts) == 1:
        return parts[0]
    cex = None
    if any(p.counterexamples is not None for p in parts):
        cex = torch.cat([p.counterexamples if p.counterexamples is not None else torch.zeros_like(like[: p.n]).cpu()
                         for p in parts])
    return Verification(
        torch.cat([p.verified for p in parts]), torch.cat([p.falsified for p in parts]), cex,
        torch.cat([p.subdomains for p in parts]), torch.cat([p.seconds for p in parts]),
        torch.cat([p.rejected for p in parts]),
    )


def label(name: str, params: dict[str, Any]) -> str:
    """A verifier's name with its settings that differ from the defaults (batch size aside), e.g.
    ``crown[intermediate=ibp]``."""
    defaults = create_verifier(name).get_params()
    changed = [f"{k}={v}" for k, v in sorted(params.items()) if k != "batch_size" and defaults.get(k) != v]
    return f"{name}[{','.join(changed)}]" if changed else name


def _certified_before(cell: Cell, group: Group) -> list[Row]:
    """The group's other certified rows on the cell's points and threat (ok, with a mask)."""
    out = []
    for row, mask in group.latest().values():
        if row.kind == cell.kind and row.key != cell.key and row.status == "ok" and mask is not None \
                and row.n == cell.n and ThreatModel(row.norm, row.eps) == cell.threat:
            out.append((row, mask))
    return out


def _worst_case(cell: Cell, group: Group) -> Row | None:
    """The group's evasion worst case on the cell's points and threat, if there is one."""
    for row, mask in group.latest().values():
        same_points = row.n == cell.n and ThreatModel(row.norm, row.eps) == cell.threat
        if row.attack == WORST_CASE and row.status == "ok" and mask is not None and same_points:
            return row, mask
    return None
