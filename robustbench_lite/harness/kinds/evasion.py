"""The evasion kind: per-point attacks inside a threat ball, evaluated together per trained model.

All evasion cells of a group that share ``survivors`` go through one
:func:`~robustbench_lite.eval.evasion.evaluate` call (clean predictions once, attacks cheapest
first, flags, the adaptive rerun).  Each attack row is stored the moment it is measured, then
again with its flags; then one ``worst_case`` row per threat holds the per-point AND of the
attacks' robust masks.  Tables: the wide leaderboard per dataset and threat, one row per
model/defense, one column per attack, sorted by the worst case.  With ``--save-adv`` each attack's
adversarial examples go to files (:mod:`~robustbench_lite.harness.advsave`).

Where other kinds proved something about the same points (:meth:`CellKind.proofs`: a verifier's
certified and falsified points), the worst case is a *bracket* (:mod:`~robustbench_lite.eval.bracket`):
a point a verifier broke (its counterexample re-checked) is broken, the certified share is the
per-point union of the verifiers, and the row's metrics and wide-table columns say ``certified``
(the lower bound), ``undecided`` (the points between the bounds), ``exact`` (nothing undecided) and
``falsified_by`` (each verifier that broke points the attacks had left robust, with their count).
The bracket is recomputed by :meth:`Evasion.refresh` once the whole group is stored, so it does
not depend on the order the kinds or the verifier cells ran in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
from torch import Tensor, nn

from ...core.config import config_hash
from ...core.threat import ThreatModel
from ...eval import bracket
from ...eval.bracket import Proof
from ...eval.escalate import SURROGATE_MIN_PER_CLASS, Escalated, Escalation, surrogate_schedule
from ...eval.evasion import AttackRecord, evaluate, worst_class
from ...eval.flags import INCOMPLETE, NON_FINITE, clean_acc_mismatch, join
from ...training.cache import train_or_load
from ...training.defense import Defense
from ..advsave import AdvWriter, missing_files
from ..autotune import BatchTuner, attack_pass
from ..identity import distinguish
from ..plan import Cell
from ..rows import SKIPPED, WORST_CASE, CellResult, Row, error_row, long_table, model_identity
from ..store import Store
from . import KINDS, CellKind, Group, kind, proofs_of, register_kind, rows_of_kind

log = logging.getLogger(__name__)

ID_COLUMNS = ["dataset", "model", "defense", "norm", "eps", "n"]
WORST_CLASS = "worst_class"  # the lowest per-class robust accuracy of the worst case
ACC_DECIMALS = 3  # the wide tables' accuracies are shares of n <= 1000 points: 3 decimals are exact
# the escalation ladder the harness runs when a masking check fires (read at each evaluation, so a
# plugin file can swap it, e.g. for a cheaper one in tests; None turns it off)
ESCALATION: Escalation | None = Escalation()


@dataclass(frozen=True)
class EvasionRow:
    """An attack cell's own numbers (the wide table has one robust-accuracy column per attack)."""

    robust_acc: float | None
    attacked: int
    scope: str
    target_hit_rate: float | None
    success_rate: float | None
    median_l2: float | None


@register_kind("evasion")
class Evasion(CellKind):
    """Per-point evasion attacks and the per-point worst case of each threat."""

    row: ClassVar[type] = EvasionRow
    order: ClassVar[int] = 1
    hidden_in_terminal: ClassVar[tuple[str, ...]] = ("dataset", "norm", "eps")

    def run(self, cells: Sequence[Cell], group: Group) -> list[Row]:
        rows: list[Row] = []
        by_survivors: dict[bool, list[Cell]] = {}
        for c in cells:
            by_survivors.setdefault(c.survivors, []).append(c)
        for survivors, part in by_survivors.items():
            rows.extend(self._run_part(part, survivors, group))
        return rows

    def _run_part(self, cells: list[Cell], survivors: bool, group: Group) -> list[Row]:
        """One :func:`evaluate` call over cells that share ``survivors``: a unit that resumes
        from its stored stages and whose rows (flags, adaptive reruns and worst case included)
        are stored together at the end."""
        n = cells[0].n
        rows: list[Row] = []
        latest: dict[str, Row] = {c.key: group.done[c.key] for c in cells if c.key in group.done}
        attacks, precomputed = [], {}
        for i, c in enumerate(cells):
            try:
                attacks.append(c.build())
            except Exception as exc:
                row = error_row(c, f"bad attack config: {type(exc).__name__}: {exc}", group.version)
                rows.append((row, None))
                latest[c.key] = (row, None)
                attacks.append(None)
                continue
            hit = group.done.get(c.key)
            if hit is not None and hit[1] is not None:
                r = hit[0]
                precomputed[i] = AttackRecord(
                    attacks[-1], hit[1], r.seconds, r.grad_evals, r.forward_evals, r.attacked, r.scope, r.target_hit_rate,
                    success_rate=r.success_rate, median_l2=r.median_l2,
                )
        live = [i for i, a in enumerate(attacks) if a is not None]
        part = "evasion:" + config_hash(sorted(c.key for c in cells))
        if not live:
            group.commit(rows, part)
            return rows

        def on_record(j: int, rec: AttackRecord, clean_acc: float) -> None:
            group.finished(cells[live[j]].key)
            if rec.error:
                log.warning("attack %s failed: %s", cells[live[j]].attack.name, rec.error.splitlines()[0])

        trained, data = group.trained, group.data
        evaluated = [cells[i] for i in live]
        writer = None
        if group.save_adv is not None:
            threats = {c.threat for c in evaluated}
            keys = {t: worst_case_key([c for c in cells if c.threat == t]) for t in threats}
            writer = AdvWriter(group.save_adv, evaluated, group, min(n, len(data.test)), keys)
        ev = evaluate(
            trained.model, [attacks[i] for i in live], data.test, n=n, policy=group.policy,
            batch_size=_batch_rule(group, n), survivors_only=survivors,
            precomputed={j: precomputed[i] for j, i in enumerate(live) if i in precomputed}, on_record=on_record,
            checkpoint=group.checkpoint(part), escalation=ESCALATION, num_classes=data.num_classes, progress=group.progress,
            surrogate=lambda: surrogate_model(
                cells[0], group, ESCALATION.surrogate_limit(min(n, len(data.test))) if ESCALATION else None
            ),
            adv_sink=writer,
        )
        if writer is not None:
            _warn_unsaved([cells[live[j]] for j, r in enumerate(ev.records) if r.robust is not None], group.save_adv)
        if NON_FINITE in ev.model_flags:
            log.warning(
                "%s/%s returns NaN or inf outputs on some of the %d points: they count as misclassified (flag %s)",
                cells[0].model.name, cells[0].defense.name, ev.n, NON_FINITE,
            )
        mismatch = clean_acc_mismatch(ev.clean_acc, trained.sidecar.get("clean_acc"), ev.n)
        if mismatch:
            log.warning(
                "%s/%s: clean accuracy %.3f on %d points, but %.3f when it was trained: the cached weights may not be the "
                "trained ones (delete %s.* in the model cache to retrain)", cells[0].model.name, cells[0].defense.name,
                ev.clean_acc, ev.n, trained.sidecar.get("clean_acc"), trained.key,
            )
        # the attack rows, with their flags (flags need every attack of the threat)
        for j, rec in enumerate(ev.records):
            cell = cells[live[j]]
            found = set(ev.flags.get(f"{cell.attack.name}@{cell.threat.label}", set()))
            if mismatch:
                found.add(mismatch)
            if live[j] in precomputed:  # keep what its own evaluation found (e.g. its adaptive rerun)
                found.update(f for f in group.done[cell.key][0].flags.split(";") if f)
            row = (self.attack_row(cell, group, rec, ev.clean_acc, join(found), ev.n), rec.robust)
            rows.append(row)
            latest[cell.key] = row
        wc_flags = {k: set(v) | ({mismatch} if mismatch and k.startswith(WORST_CASE) else set()) for k, v in ev.flags.items()}
        labels = data.test.head(ev.n).y
        proofs = proofs_of(group.latest().values())  # stored by an earlier run (refresh adds this run's)
        rows.extend(worst_case_rows(cells, latest, wc_flags, group.version, ev.escalated, labels=labels, proofs=proofs))
        group.commit(rows, part)
        return rows

    def check_saved(self, cells: Sequence[Cell], save_dir: str) -> None:
        _warn_unsaved(list(cells), save_dir)

    def summary_line(self, row: CellResult) -> str | None:
        if row.attack != WORST_CASE:
            return None
        flags = f"  [{row.flags}]" if row.flags else ""
        m = _metrics(row.metrics)
        proven = "" if "certified" not in m else (
            f", certified {m['certified']:.3f}" + (" (exact)" if m.get("exact") else f" (undecided {m['undecided']:.3f})"))
        return f"{row.norm} eps {row.eps:g}: clean {row.clean_acc:.3f}, robust (worst case) {row.robust_acc:.3f}{proven}{flags}"

    def attack_row(
        self, cell: Cell, group: Group, rec: AttackRecord, clean_acc: float, flags: str, n: int | None = None
    ) -> CellResult:
        values = EvasionRow(rec.robust_acc, rec.attacked, rec.scope, rec.target_hit_rate, rec.success_rate, rec.median_l2)
        return self.result(
            cell, group, values, method=rec.attack, clean_acc=clean_acc, seconds=rec.seconds, n=cell.n if n is None else n,
            grad_evals=rec.grad_evals, forward_evals=rec.forward_evals, flags=flags,
            status="error" if rec.error else SKIPPED if rec.skipped else "ok", error=rec.error or rec.skipped, metrics="",
        )

    def refresh(
        self, cells: Sequence[Cell], store: Store, labels: Callable[[], Tensor], proofs: Sequence[Proof] = ()
    ) -> None:
        """The worst-case rows of a finished group, from the masks the store holds, bracketed by
        ``proofs`` (every kind's, over the group's stored rows).  The attacks' part of a stored
        worst case is only ever lowered: its own mask (the escalation ladder's finds) and flags are
        folded in; the proofs then remove the points they broke and set the bracket.  Its worst
        class comes from the test labels when the mask changed or the row lacks it."""
        latest = {c.key: hit for c in cells if (hit := store.get(c.key)) is not None}
        fresh = []
        for row, mask in worst_case_rows(cells, latest, version=_version()):  # the attack cells alone
            old = store.get(row.key)
            usable = old is not None and old[1] is not None and old[1].shape == mask.shape and old[0].status == "ok"
            base, metrics, flags = row, _metrics(row.metrics), _split(row.flags)
            if usable:
                old_metrics = _metrics(old[0].metrics)
                mask = mask & bracket.attacked_part(old[1], old_metrics)
                base, flags = old[0], flags | _split(old[0].flags)
                metrics = {k: v for k, v in old_metrics.items() if k not in bracket.KEYS}
            robust, extra, found = bracket.on_row(mask, ThreatModel(row.norm, row.eps), proofs)
            metrics.update(extra)
            flags |= found
            same_mask = usable and torch.equal(robust, old[1])
            if not (same_mask and WORST_CLASS in metrics):
                metrics = _metrics(_with_worst_class(json.dumps(metrics), robust, labels()[: row.n]))
            if same_mask and join(flags) == old[0].flags and metrics == _metrics(old[0].metrics) \
                    and old[0].model_id == row.model_id:
                continue  # nothing to change: the stored row already holds it
            new = replace(base, robust_acc=float(robust.float().mean()), flags=join(flags), metrics=json.dumps(metrics),
                          code_version=row.code_version, model_id=row.model_id, identity=row.identity)
            fresh.append((new, robust))
        if fresh:
            store.put_many(fresh)

    # -- tables ---------------------------------------------------------------------------------
    def tables(self, rows: Sequence[CellResult]) -> dict[str, pd.DataFrame]:
        """One wide table per ``<dataset>_<norm>_<eps>``: a row per model (its ``model_id``: models
        sharing display names are separate rows with distinguishing labels, see
        :mod:`~robustbench_lite.harness.identity`) and ``n``, with ``clean_acc``, one robust-accuracy
        column per attack (in name order, the same in every table), ``worst_case``, its
        ``worst_class`` (3 decimals, like every accuracy), columns other kinds add (e.g.
        ``certified``, right after the worst class), ``seconds`` of all attacks, ``train_seconds``
        and ``flags``; sorted by the worst case."""

        rows = distinguish(rows)
        df = long_table(rows_of_kind(rows, self.name))
        out: dict[str, pd.DataFrame] = {}
        if df.empty:
            return out
        extra = _extra_columns(rows)
        for (dataset, norm, eps), part in df.groupby(["dataset", "norm", "eps"], sort=True):
            attacks = sorted(a for a in set(part["attack"]) if a != WORST_CASE)
            added: list[str] = []
            table_rows = []
            models = part.groupby(["model_id", "n"], sort=False)
            for (model_id, n), g in sorted(models, key=lambda m: (m[1]["model"].iloc[0], m[1]["defense"].iloc[0], m[0][1])):
                by_attack = {r.attack: r for r in g.itertuples()}
                first = g.iloc[0]
                ok = g[g["status"] == "ok"]
                row = {k: first[k] for k in ID_COLUMNS}
                row["clean_acc"] = ok["clean_acc"].iloc[0] if len(ok) else float("nan")
                for a in attacks:
                    r = by_attack.get(a)
                    row[a] = r.robust_acc if r is not None and r.status == "ok" else float("nan")
                wc = by_attack.get(WORST_CASE)
                row[WORST_CASE] = wc.robust_acc if wc is not None else float("nan")
                wc_metrics = json.loads(wc.metrics) if wc is not None and wc.metrics else {}
                worst = wc_metrics.get(WORST_CLASS)
                row[WORST_CLASS] = round(worst, ACC_DECIMALS) if isinstance(worst, (int, float)) else float("nan")
                flags: set[str] = set()
                for col, value in extra.get((dataset, model_id, n, norm, eps), {}).items():
                    if col == "flags":
                        flags.update(value)
                    else:
                        row[col] = value
                        added.append(col)
                if wc is not None and wc.status == "ok" and "certified" in wc_metrics:  # the row's bracket
                    for col, value in bracket.columns(wc_metrics).items():
                        row[col] = value
                        added.append(col)
                row["seconds"] = float(g.loc[g["attack"] != WORST_CASE, "seconds"].sum())
                row["train_seconds"] = first["train_seconds"]
                for r in g.itertuples():
                    flags.update(f for f in str(r.flags).split(";") if f)
                    if r.status == "error":
                        flags.add(f"error:{r.attack}")
                row["flags"] = ";".join(sorted(flags))
                table_rows.append(row)
            table = pd.DataFrame(table_rows).sort_values(WORST_CASE, ascending=False, kind="stable").reset_index(drop=True)
            added = list(dict.fromkeys(added))
            if added:  # right after the worst case (and its worst class) they bound or explain
                cols = [c for c in table.columns if c not in added]
                at = cols.index(WORST_CLASS) + 1
                table = table[cols[:at] + added + cols[at:]]
            out[f"{dataset}_{norm}_{eps:g}"] = table
        return out


def _extra_columns(rows: Sequence[CellResult]) -> dict[tuple, dict]:
    """The columns the other kinds add to the wide tables, by :func:`~robustbench_lite.harness.kinds.wide_key`."""
    merged: dict[tuple, dict] = {}
    for name in KINDS.list():
        for key, cols in kind(name).wide_columns(rows).items():
            merged.setdefault(key, {}).update(cols)
    return merged


def _warn_unsaved(cells: list[Cell], save_dir: str) -> None:
    """Warn when evasion cells have no examples file under ``save_dir`` (computed before --save-adv)."""
    missing = missing_files(save_dir, cells)
    if missing:
        names = ", ".join(sorted({f"{c.attack.name}@{c.threat.label}" for c in missing}))
        log.warning(
            "%s/%s: %d attack cell(s) (%s) have no adversarial examples in %s: they were computed by a run without "
            "--save-adv (or writing failed), and finished cells are not recomputed; run them in a fresh --workdir to "
            "save their examples", missing[0].model.name, missing[0].defense.name, len(missing), names, save_dir,
        )


SURROGATE_RECIPE = "standard"
_BASE_SETTINGS = frozenset(f.name for f in dataclasses.fields(Defense)) - {"monitor_eps", "monitor_points", "monitor_steps"}


def surrogate_model(cell: Cell, group: Group, limit: int | None = None) -> nn.Module | None:
    """The escalation ladder's transfer surrogate: the cell's architecture trained by the plain
    ``standard`` recipe with the group's training settings (epochs, batch size, optimizer,
    schedule, seed; the defense's own settings dropped), through the model cache, so a preset
    that also has a ``standard`` defense with those settings trains it once.  ``None`` when that
    is the model under test (a surrogate identical to the model transfers nothing new).

    ``limit`` (:meth:`~robustbench_lite.eval.escalate.Escalation.surrogate_limit`) bounds the
    training images seen, summed over epochs: the recipe gets fewer epochs, then fewer images
    (:func:`~robustbench_lite.eval.escalate.surrogate_schedule`); too few images for a useful
    surrogate raise a ``ValueError`` that the transfer step records.  The training is announced
    on the group's progress, with its size and why."""
    from ...core.registry import create_defense

    params = {k: v for k, v in cell.defense.params.items() if k in _BASE_SETTINGS}
    defense = create_defense(SURROGATE_RECIPE, **params)
    if cell.defense.name == SURROGATE_RECIPE and defense.get_params() == cell.defense.build().get_params():
        return None
    data = group.data
    available = len(data.train)
    if available == 0:
        raise ValueError(f"{data.name} holds evaluation points only: no training images for a transfer surrogate")
    epochs, images = defense.epochs, available
    if limit is not None:
        epochs, images = surrogate_schedule(defense.epochs, available, limit)
        least = SURROGATE_MIN_PER_CLASS * data.num_classes
        if images < least:
            raise ValueError(
                f"the surrogate may see {limit} training images in all (its share of the ladder's budget for these "
                f"points), fewer than the {least} a useful one needs ({SURROGATE_MIN_PER_CLASS} per class); evaluate more "
                "points or raise Escalation.surrogate_share"
            )
        if (epochs, images) != (defense.epochs, available):
            defense = create_defense(SURROGATE_RECIPE, **{**params, "epochs": epochs})
            data = dataclasses.replace(data, train=data.train.head(images))
    bound = "" if limit is None else f", within {limit} images seen (the surrogate's share of the ladder's budget)"
    group.progress.note(
        f"escalation transfer: training a surrogate ({cell.model.name}, {SURROGATE_RECIPE} recipe, {epochs} epoch(s) on "
        f"{images} of {available} training images{bound}); cached for later runs"
    )
    log.info("training the transfer surrogate: %s with the %s recipe %s", cell.model.name, SURROGATE_RECIPE, params)
    trained = train_or_load(cell.model, defense, data, group.cache, policy=group.policy, progress=group.progress)
    if trained.key == group.trained.key:
        return None
    return trained.model


def _batch_rule(group: Group, n: int):
    """A fixed batch size, or (``auto``) a function of the attack: the tuned batch of its pass."""
    if group.batch_size != "auto":
        return group.batch_size
    tuner = BatchTuner(Path(group.workdir) / "autotune.json")
    test = group.data.test.head(n)
    chosen: dict[str, int] = {}

    def rule(attack) -> int:
        step = attack_pass(attack)
        if step not in chosen:
            chosen[step] = tuner.batch_for(group.trained.model, group.trained.key, step, test.x, test.y, group.policy)
        return chosen[step]

    return rule


def worst_case_rows(
    cells: Iterable[Cell], latest: Mapping[str, Row], flags: Mapping[str, set[str]] | None = None, version: str = "",
    escalated: Mapping[ThreatModel, Escalated] | None = None, labels: Tensor | None = None,
    proofs: Sequence[Proof] = (),
) -> list[Row]:
    """One ``worst_case`` row per threat: the per-point AND of its cells' robust masks, bracketed
    by the ``proofs`` on its points (their broken points removed; :func:`~robustbench_lite.eval.bracket.on_row`).

    ``latest`` maps cell keys to their newest rows (cells absent or not ``ok`` make the worst
    case ``incomplete``, except those skipped on purpose: their attack needs more of the model
    than it gives); ``flags`` are an evaluation's flags (``worst_case@<threat>`` keys);
    ``escalated`` the escalation ladder's outcome per threat (its mask is ANDed in, its costs
    added, and its steps go into the row's ``metrics`` as ``escalation``); with the points'
    ``labels`` the metrics hold the worst class too."""
    escalated = escalated or {}
    flags = flags or {}
    by_threat: dict[ThreatModel, list[Cell]] = {}
    for c in cells:
        by_threat.setdefault(c.threat, []).append(c)
    out: list[Row] = []
    for threat, tcells in by_threat.items():
        stored = [latest.get(c.key) for c in tcells]
        ok = [(r, m) for r, m in (s for s in stored if s is not None) if r.status == "ok" and m is not None]
        if not ok:
            continue
        mask = ok[0][1].clone()
        found: set[str] = set()
        for r, m in ok:
            mask &= m
            found.update(f for f in r.flags.split(";") if f)
        skipped = sum(1 for s in stored if s is not None and s[0].status == SKIPPED)
        if len(ok) + skipped < len(tcells):
            found.add(INCOMPLETE)
        found.update(flags.get(f"{WORST_CASE}@{threat.label}", set()))
        ref = ok[0][0]
        esc = escalated.get(threat)
        steps = esc.steps if esc is not None and esc.robust.shape == mask.shape else []
        if steps:
            mask &= esc.robust
        mask, bracketed, proven = bracket.on_row(mask, threat, proofs)
        found |= proven
        payload = {**({"escalation": [s.as_payload() for s in steps]} if steps else {}), **bracketed}
        metrics = json.dumps(payload) if payload else ""
        row = CellResult(
            dataset=ref.dataset, model=ref.model, defense=ref.defense, attack=WORST_CASE, norm=ref.norm, eps=ref.eps,
            kind=ref.kind, n=ref.n, clean_acc=ref.clean_acc, robust_acc=float(mask.float().mean()),
            seconds=sum(r.seconds for r, _ in ok) + sum(s.seconds for s in steps),
            grad_evals=sum(r.grad_evals for r, _ in ok) + sum(s.grad_evals for s in steps),
            forward_evals=sum(r.forward_evals for r, _ in ok) + sum(s.forward_evals for s in steps),
            attacked=max(r.attacked for r, _ in ok),
            scope="all", target_hit_rate=None, success_rate=None, median_l2=None, flags=join(found), status="ok", error="",
            train_seconds=ref.train_seconds, attack_params=json.dumps(sorted(r.attack for r, _ in ok)),
            key=worst_case_key(tcells), model_key=ref.model_key, code_version=version,
            **model_identity(tcells[0]),
            metrics=_with_worst_class(metrics, mask, labels) if labels is not None else metrics,
        )
        out.append((row, mask))
    return out


def _split(flags: str) -> set[str]:
    return {f for f in flags.split(";") if f}


def _metrics(text: str) -> dict:
    """A row's ``metrics`` JSON as a dict (empty when there are none)."""
    return json.loads(text) if text else {}


def _with_worst_class(metrics: str, mask: Tensor, labels: Tensor) -> str:
    """``metrics`` plus the worst case's lowest per-class robust accuracy and its class."""
    acc, cls = worst_class(mask, labels)
    return json.dumps({**_metrics(metrics), WORST_CLASS: acc, "worst_class_label": cls})


def worst_case_key(cells: Iterable[Cell]) -> str:
    """The store key of the worst case over ``cells`` (one threat's attack cells)."""
    return config_hash({"worst_case": sorted(c.key for c in cells)})


def _version() -> str:
    from ..run import code_version

    return code_version()

