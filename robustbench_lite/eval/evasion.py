"""Evaluate attacks on one model: clean predictions, then each attack on the points that are
still classified correctly, cheapest attack first, and the per-point worst case per threat.

Each attack's record holds a per-point ``robust`` mask over the evaluated points (correct and
not broken), so worst cases can be recomputed from stored masks after a resumed run.  With an
``adv_sink`` (:class:`~robustbench_lite.eval.adversarial.AdvSink`) the adversarial examples each
attack found go there as they are judged; without one nothing is kept.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.access import Access, access_note, model_access
from ..core.attack import EvasionAttack
from ..core.data import DataSplit
from ..core.device import DevicePolicy, as_policy, halving_on_oom, keeps_layout
from ..core.models import check_logits
from ..core.ops import ce
from ..core.progress import Progress, Task
from ..core.registry import ATTACKS, create_attack
from ..core.threat import Norm, ThreatModel
from . import adaptive as wrappers
from . import flags as checks
from .adversarial import AdvExamples, AdvSink
from .checkpoint import Checkpoint, MemoryCheckpoint, attack_id
from .escalate import Escalated, Escalation, StepRecord, run_step
from .records import AttackRecord, Evaluation, record_from, record_payload

# model-level checks whose firing makes an adaptive evaluation rerun the gradient attacks
MASKING = (
    checks.ZERO_GRAD, checks.PROBABILITY_OUTPUTS, checks.RANDOMIZED, checks.LARGE_EPS, checks.BLACK_BOX_WINS,
    checks.MORE_STEPS_NO_HELP, checks.GRADIENT_ATTACKS_MISSED,
)
_STUCK = {  # -> bpda + rescale
    checks.ZERO_GRAD, checks.LARGE_EPS, checks.BLACK_BOX_WINS, checks.MORE_STEPS_NO_HELP, checks.GRADIENT_ATTACKS_MISSED,
}
DEFAULT_ESCALATION = Escalation()


def input_grad_norms(model: nn.Module, split: DataSplit, device: torch.device, batch_size: int = 500) -> Tensor:
    """L2 norm of the CE gradient w.r.t. each input (for the zero-gradient check); empty for an
    empty split (a model with no correct point) and for a model that gives no gradients
    (:func:`~robustbench_lite.core.access.model_access`)."""
    out = []
    if model_access(model) is not Access.GRADIENTS:
        return torch.empty(0)
    model.eval()
    for i in range(0, len(split), batch_size):
        x = split.x[i : i + batch_size].to(device).requires_grad_(True)
        y = split.y[i : i + batch_size].to(device)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(ce(model(x), y).sum(), x)
        out.append(g.flatten(1).norm(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def clean_predictions(
    model: nn.Module, split: DataSplit, policy: DevicePolicy, *, num_classes: int | None = None, batch_size: int = 1000,
) -> tuple[Tensor, Tensor, int]:
    """``(correct, finite, classes)``: per point, the prediction is right and every output is
    finite; and the number of logits the model returns.

    The outputs are checked first: a model must return logits of shape ``(batch, classes)`` with
    a logit for every label (and ``num_classes`` of them when given); a point whose outputs are
    NaN or inf counts as misclassified (its argmax means nothing)."""
    correct, finite, classes = [], [], 0
    for i in range(0, len(split), batch_size):
        x, y = policy.batch_to(split.x[i : i + batch_size]), policy.batch_to(split.y[i : i + batch_size])
        with policy.autocast("eval"):
            out = model(x)
        if i == 0:
            check_logits(out, x.shape[0], int(split.y.max()) + 1 if len(split) else 0, num_classes)
            classes = int(out.shape[1])
        ok = torch.isfinite(out).all(dim=1)
        correct.append(((out.argmax(1) == y) & ok).cpu())
        finite.append(ok.cpu())
    return torch.cat(correct), torch.cat(finite), classes


@torch.no_grad()
def model_checks(
    model: nn.Module, split: DataSplit, device: torch.device, *, points: int = 32, probe_steps: int = 20
) -> set[str]:
    """Model-level checks on (up to ``points``) clean-correct points: probability-like outputs,
    randomized outputs (two passes of the same inputs), and a PGD-CE probe at Linf eps 1 with no
    random start (every image is reachable, so an honest gradient gets accuracy near 0).  A model
    that gives less than gradients (:func:`~robustbench_lite.core.access.model_access`) gets only
    the checks its outputs allow: no probe, and no probability check on a label-only model (its
    one-hot outputs are not scores)."""
    if len(split) == 0:
        return set()
    probe = split.head(points)
    x, y = probe.x.to(device), probe.y.to(device)
    first, second = model(x), model(x)
    access = model_access(model)
    found = {checks.randomized_outputs(first, second)}
    if access is not Access.LABELS:
        found.add(checks.probability_outputs(first))
    if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
        found.add(checks.NON_FINITE)
    if access is not Access.GRADIENTS:
        return {f for f in found if f}
    # a randomized model is probed in expectation (EOT), so that luck does not fire this check
    probed = wrappers.EOT(model, 8) if checks.RANDOMIZED in found else model
    pgd = create_attack("pgd", norm=Norm.LINF, eps=1.0, steps=probe_steps, random_start=False)
    x_adv = pgd.run(probed, x, y).x_adv
    found.add(checks.large_eps_not_zero(float((probed(x_adv).argmax(1) == y).float().mean())))
    return {f for f in found if f}


#: the attacks the more-iterations probe may run, in order of preference: the first whose ``norms``
#: include the threat's (PGD-CE for Linf and L2; APGD-CE where PGD leaves a norm out, as L1, whose
#: one-coordinate steepest step makes plain PGD a weak attack)
PROBE_ATTACKS = ("pgd", "apgd-ce")


def probe_attack(threat: ThreatModel, steps: int) -> EvasionAttack | None:
    """The more-iterations probe's attack at ``threat`` with ``steps`` steps: the first of
    :data:`PROBE_ATTACKS` whose ``norms`` include the threat's, or ``None``."""
    name = next((a for a in PROBE_ATTACKS if threat.norm in ATTACKS.get(a).norms), None)
    return None if name is None else create_attack(name, norm=threat.norm, eps=threat.eps, steps=steps)


def iterations_probe(
    model: nn.Module, split: DataSplit, threat: ThreatModel, reference: Tensor, device: torch.device,
    *, points: int = 64, short: int = 10, factor: int = 10,
) -> str | None:
    """The more-iterations check on (up to) ``points`` clean-correct points of ``split``: PGD-CE
    (or the first of ``PROBE_ATTACKS`` that supports the threat's norm; none: no check) with
    ``short`` and ``factor x short`` steps, against ``reference`` (the per-point robust mask of
    every attack of the threat, e.g. Square included) on the same points.  The long run is skipped
    where the check cannot fire whatever it finds: when the reference is within the check's margin
    of the short run (on a model the set breaks almost entirely it would cost more than the set)."""
    k = min(points, len(split))
    if k == 0 or probe_attack(threat, short) is None:
        return None
    probe = split.head(k)
    x, y = probe.x.to(device), probe.y.to(device)
    ref = float(reference[:k].float().mean())
    accs = []
    for steps in (short, short * factor):
        attack = probe_attack(threat, steps)
        with torch.no_grad():
            accs.append(float((model(attack.run(model, x, y).x_adv).argmax(1) == y).float().mean()))
        if checks.more_iterations_no_help(accs[0], accs[0], ref) is None:
            return None  # the reference leaves too few points beyond the short run for any long run to fire it
    return checks.more_iterations_no_help(accs[0], accs[1], ref)


def _beyond_gradients(attack: EvasionAttack) -> bool:
    """A black-box or minimum-norm attack: what AutoAttack's checks hold the gradient attacks to."""
    return not attack.needs_grad or attack.min_norm


def run_order(attack: EvasionAttack) -> tuple[bool, float]:
    """Where an attack runs in an evaluation: the fixed-eps gradient attacks first, cheapest first,
    then the black-box and minimum-norm ones, cheapest first (AutoAttack runs FAB-T and Square
    last), so that on survivors the latter see exactly the points every gradient attack left."""
    return _beyond_gradients(attack), attack.grad_budget


def missed_by_gradients(records: Sequence[AttackRecord], n: int) -> dict[ThreatModel, str]:
    """Per threat with both kinds of attack, the ``gradient-attacks-missed`` flag when the black-box
    and minimum-norm attacks broke more than a share of the ``n`` points that every fixed-eps
    gradient attack left robust (:func:`checks.gradient_attacks_missed`).  Works on survivors as on
    all points: a record's mask is False wherever its point is not robust after it."""
    out: dict[ThreatModel, str] = {}
    by_threat: dict[ThreatModel, list[AttackRecord]] = {}
    for r in records:
        if r.robust is not None:
            by_threat.setdefault(r.attack.threat, []).append(r)
    for threat, recs in by_threat.items():
        grad = [r.robust for r in recs if not _beyond_gradients(r.attack)]
        other = [r.robust for r in recs if _beyond_gradients(r.attack)]
        if not grad or not other:
            continue
        left = torch.stack(grad).all(0)
        code = checks.gradient_attacks_missed(int((left & ~torch.stack(other).all(0)).sum()), n)
        if code:
            out[threat] = code
    return out


def run_attack(
    model: nn.Module,
    attack: EvasionAttack,
    split: DataSplit,
    attack_mask: Tensor,
    *,
    device: torch.device,
    batch_size: int = 500,
    scope: str = "all",
    attack_model: nn.Module | None = None,
    policy: DevicePolicy | None = None,
    keep_adv: bool = False,
    task: Task | None = None,
) -> AttackRecord:
    """Run ``attack`` on the points where ``attack_mask`` is set; others count as not robust.

    ``attack_model`` (e.g. a BPDA/EOT wrapper of ``model``) is what the attack sees; the
    adversarial points are always judged on ``model``.  ``policy`` (default: float32 on
    ``device``) moves the batches, sets the attack's and the judging's autocast, and says whether
    both see the model in chunked passes (:class:`~robustbench_lite.core.device.Chunked`).
    With ``keep_adv`` the record's ``examples`` hold the adversarial images of the attacked
    points the judge misclassified (on the CPU).  ``task`` (a
    :class:`~robustbench_lite.core.progress.Task`) counts the points as each batch is done."""
    policy = policy if policy is not None else as_policy(device)
    judge = policy.chunked(model)
    seen = judge if attack_model is None else policy.chunked(attack_model)
    robust = torch.zeros(len(split), dtype=torch.bool)
    idx = attack_mask.nonzero().flatten()
    gen = torch.Generator(device=device).manual_seed(attack.seed)
    seconds, grads, fwds, hits = 0.0, 0, 0, 0
    dists: list[Tensor] = []
    kept: list[AdvExamples] = []
    if task is not None:
        task.restart(len(idx))
    for i in range(0, len(idx), batch_size):
        sel = idx[i : i + batch_size]
        x, y = policy.batch_to(split.x[sel]), policy.batch_to(split.y[sel])
        with policy.autocast("attack"):
            out = attack.run(seen, x, y, gen)
        t0 = time.perf_counter()
        with torch.no_grad(), policy.autocast("eval"):
            pred = judge(out.x_adv).argmax(1)
        seconds += out.seconds + (time.perf_counter() - t0)
        grads += out.grad_evals
        fwds += out.forward_evals + len(sel)
        robust[sel] = (pred == y).cpu()
        if keep_adv:
            broke = (pred != y).cpu()
            kept.append(AdvExamples(sel[broke], out.x_adv[broke.to(out.x_adv.device)].float().cpu().contiguous(),
                                    y.cpu()[broke], pred.cpu()[broke]))
        if out.target is not None:
            hits += int((pred == out.target).sum())
        if out.distances is not None:
            dists.append(out.distances.cpu())
        if task is not None:
            task.update(len(sel))
    target_rate = hits / len(idx) if attack.targeted and len(idx) else None
    success, median = min_norm_summary(torch.cat(dists)) if attack.min_norm and dists else (None, None)
    examples = (AdvExamples.concat(kept) if kept else AdvExamples.empty(split.x)) if keep_adv else None
    return AttackRecord(attack, robust, seconds, grads, fwds, len(idx), scope, target_rate, "", success, median, examples)


def worst_class(robust: Tensor, labels: Tensor) -> tuple[float, int]:
    """The lowest per-class robust accuracy over the points of ``labels`` and its class (the
    smallest class index on a tie): what reweighting defenses claim to improve."""
    if robust.numel() != labels.numel() or robust.numel() == 0:
        raise ValueError(f"worst_class needs one robust flag per labelled point, got {robust.numel()} and {labels.numel()}")
    labels = labels.cpu().long()
    classes = labels.unique()
    accs = torch.stack([robust.cpu()[labels == c].float().mean() for c in classes])
    i = int(torch.argmin(accs))  # argmin returns the first (smallest class) of equal minima
    return float(accs[i]), int(classes[i])


def min_norm_summary(distances: Tensor) -> tuple[float | None, float | None]:
    """Success rate (finite distance) and median distance of the successes, per attacked point."""
    if distances.numel() == 0:
        return None, None
    found = distances[torch.isfinite(distances)]
    return float(found.numel() / distances.numel()), (float(found.median()) if found.numel() else None)


@keeps_layout
def evaluate(
    model: nn.Module,
    attacks: Sequence[EvasionAttack],
    split: DataSplit,
    *,
    n: int = 1000,
    device: torch.device | str = "cpu",
    batch_size: int | Callable[[EvasionAttack], int] = 500,
    survivors_only: bool = False,
    precomputed: Mapping[int, AttackRecord] | None = None,
    on_record: Callable[[int, AttackRecord, float], None] | None = None,
    adaptive: bool = True,
    eot_samples: int = 8,
    probe_iterations: bool = True,
    policy: DevicePolicy | None = None,
    checkpoint: Checkpoint | None = None,
    escalation: Escalation | None = DEFAULT_ESCALATION,
    surrogate: Callable[[], nn.Module | None] | None = None,
    num_classes: int | None = None,
    adv_sink: AdvSink | None = None,
    progress: Progress | bool | None = None,
) -> Evaluation:
    """Evaluate ``attacks`` on the first ``n`` points of ``split``.

    Attacks run cheapest first (by gradient budget).  With ``survivors_only`` each attack runs
    only on the points no cheaper attack of its threat broke (its row then reports the robust
    accuracy after it, cumulatively); otherwise on every clean-correct point, so each row is the
    attack's own robust accuracy.  An attack that raises is recorded with its error.

    ``precomputed`` maps positions in ``attacks`` to final records of an earlier evaluation (not
    rerun, not adapted again); ``on_record(position, record, clean_acc)`` is called as each new
    plain record is done.  ``checkpoint`` keeps every stage as it finishes and hands back the
    ones a killed evaluation already did (:mod:`~robustbench_lite.eval.checkpoint`).
    ``Evaluation.records`` follows the order of ``attacks``.

    The model's outputs are checked on the first batch (logits of shape ``(batch, classes)``,
    ``num_classes`` of them when given); points with NaN or inf outputs count as misclassified
    and raise ``non-finite-outputs``.  Images that are float16 or float64 are evaluated as float32.

    Every cell gets the checks of :mod:`~robustbench_lite.eval.flags` (flags per attack and per worst case).  With
    ``adaptive`` (default), when a masking check fires (zero gradients, probability outputs,
    randomized outputs, large eps not reaching 0, black-box beating white-box, more iterations
    not helping) each gradient attack is rerun through :func:`~robustbench_lite.eval.adaptive.adapt` (BPDA for marked
    layers, EOT with ``eot_samples`` passes, log-probabilities, logit rescaling) on the points it
    left unbroken; its record becomes the per-point worst of both runs and carries an
    ``adapted:...`` flag.  Then each threat's worst case escalates through ``escalation``'s ladder
    (:mod:`~robustbench_lite.eval.escalate`: noise-smoothed EOT, a transfer attack from
    ``surrogate()`` when given, Square with AutoAttack's budget) on its survivors while the budget
    lasts (a threat escalates when a model-level masking check or one of its own fired);
    ``Evaluation.escalated`` holds each step's per-point outcome, and the worst case
    (``worst_case`` and its ``adapted:...`` flag) includes them.  With ``probe_iterations``
    (default) each threat with an iterative gradient attack also gets the more-iterations check
    (:func:`~robustbench_lite.eval.evasion.iterations_probe`, 110 PGD steps on 64 points).

    ``adv_sink`` gets the adversarial examples of every point an attack (its plain run, its
    adaptive rerun) or an escalation step broke, as soon as it is judged and before its stage is
    checkpointed; stages and records taken from ``checkpoint`` or ``precomputed`` hand it nothing.

    A model that gives less than its gradients (a
    :class:`~robustbench_lite.core.access.LabelOnly` or
    :class:`~robustbench_lite.core.access.ScoresOnly` wrapper) is evaluated only by the attacks
    it allows: an attack that needs more (``Attack.access``) is not run, and its record says why
    (``AttackRecord.skipped``); the gradient probes, the adaptive rerun and the escalation ladder
    (which attack through gradients or scores) are left out.

    ``batch_size`` is a number or a function of the attack (an autotuned choice per attack kind);
    an attack that runs out of CUDA memory is rerun with half the batch (see
    :func:`~robustbench_lite.core.device.halving_on_oom`).  ``policy`` (default: float32 on ``device``) says where and
    in which precision the model runs (:class:`~robustbench_lite.DevicePolicy`).

    ``progress`` (a :class:`~robustbench_lite.core.progress.Progress`, or ``True`` for the automatic
    one) shows each attack's points as its batches finish, and says when and why the adaptive
    rerun and the ladder start.
    """
    reporter = Progress.of(progress)
    policy = policy if policy is not None else as_policy(device)
    device = policy.device
    ck: Checkpoint = checkpoint if checkpoint is not None else MemoryCheckpoint()

    def attack_batch(attack: EvasionAttack) -> int:
        return batch_size(attack) if callable(batch_size) else batch_size

    for a in attacks:
        if not isinstance(a, EvasionAttack):
            raise TypeError(f"evaluate takes evasion attacks, got {type(a).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(split, DataSplit):
        raise TypeError(f"split must be a DataSplit (images in [0, 1] and labels), got {type(split).__name__}")
    split = _as_float32(split.head(n))
    model = policy.model_to(model).eval()
    given = model_access(model)
    if given is not Access.GRADIENTS:  # the rerun and the ladder attack through gradients or scores
        adaptive, escalation, probe_iterations = False, None, False

    def run(
        attack: EvasionAttack, mask: Tensor, scope: str, attack_model: nn.Module | None = None, label: str = ""
    ) -> AttackRecord:
        with reporter.task(label or f"{attack.name} {threat_text(attack.threat)}", int(mask.sum())) as task:
            rec, _ = halving_on_oom(
                lambda b: run_attack(
                    model, attack, split, mask, device=device, batch_size=b, scope=scope, attack_model=attack_model,
                    policy=policy, keep_adv=adv_sink is not None, task=task,
                ),
                attack_batch(attack),
            )
            task.close(f"{rec.attacked} points attacked, {int(rec.robust.sum())} still robust")
        return rec

    # -- clean predictions and the model-level checks ------------------------------------------
    hit = ck.get("checks")
    if hit is not None and hit[1] is not None:
        correct, found, classes = hit[1], set(hit[0]["flags"]), int(hit[0]["classes"])
    else:
        with reporter.task("clean accuracy and model checks", len(split)) as task:
            correct, finite, classes = clean_predictions(model, split, policy, num_classes=num_classes)
            correct_split = split.subset(correct.nonzero().flatten())
            found = model_checks(model, correct_split, device)
            grad_flag = checks.zero_gradients(input_grad_norms(model, correct_split, device))
            if grad_flag:
                found.add(grad_flag)
            if not finite.all():
                found.add(checks.NON_FINITE)
            ck.put("checks", {"flags": sorted(found), "classes": classes}, correct)
            task.update(len(split))
            task.close(f"clean accuracy {float(correct.float().mean()):.3f}, flags: {', '.join(sorted(found)) or 'none'}")
    correct_split = split.subset(correct.nonzero().flatten())
    clean_acc = float(correct.float().mean())

    # -- the attacks, cheapest first -------------------------------------------------------------
    records: list[AttackRecord | None] = [None] * len(attacks)
    worst: dict[ThreatModel, Tensor] = {}
    precomputed = precomputed or {}
    order = sorted(range(len(attacks)), key=lambda i: run_order(attacks[i]))
    for i in order:
        attack = attacks[i]
        alive = worst.setdefault(attack.threat, correct.clone())
        mask = alive if survivors_only else correct
        scope = "survivors" if survivors_only else "all"
        stage = f"attack:{attack_id(attack)}"
        if i in precomputed:
            rec = precomputed[i]
        elif not given.covers(attack.access()):
            rec = AttackRecord(attack, None, 0.0, 0, 0, int(mask.sum()), scope,
                               skipped=access_note(attack.name, attack.access(), given))
        elif (hit := ck.get(stage)) is not None:
            rec = record_from(attack, hit[0], hit[1])
        else:
            try:
                rec = run(attack, mask, scope)
            except Exception as exc:  # one failing attack must not lose the others
                rec = AttackRecord(attack, None, 0.0, 0, 0, int(mask.sum()), scope, error=_describe(exc))
            if rec.examples is not None:
                if adv_sink is not None:
                    adv_sink.attack(i, attack, rec.examples, adaptive=False)
                rec = dataclasses.replace(rec, examples=None)
            ck.put(stage, record_payload(rec), rec.robust)
            if on_record is not None:
                on_record(i, rec, clean_acc)
        records[i] = rec
        if rec.robust is not None:
            worst[attack.threat] = alive & rec.robust
    done = [r for r in records if r is not None]
    flags = cell_flags(done, found)
    for threat, code in missed_by_gradients(done, len(split)).items():
        flags.setdefault(f"worst_case@{threat.label}", set()).add(code)
        for r in done:
            if r.attack.threat == threat and _beyond_gradients(r.attack):
                flags.setdefault(f"{r.attack.name}@{threat.label}", set()).add(code)
    if probe_iterations:
        _probe_iterations(model, done, correct, correct_split, worst, flags, device, ck, reporter)
    fired = set(found) | {f for fs in flags.values() for f in fs}
    if not adaptive or not fired & set(MASKING):
        return Evaluation(len(split), correct, done, worst, flags, model_flags=frozenset(found))
    masking = sorted(fired & set(MASKING))

    # -- the adaptive rerun of each gradient attack through wrappers ------------------------------
    wrapped, names = wrappers.adapt(
        model,
        bpda=bool(fired & _STUCK),
        eot_samples=eot_samples if checks.RANDOMIZED in fired else 0,
        log_outputs=checks.PROBABILITY_OUTPUTS in fired,
        rescale=bool(fired & _STUCK),
    )
    merged = list(done)
    tag = checks.adapted(names)
    rerun: set[ThreatModel] = set()
    if names:
        reporter.note(f"checks fired ({', '.join(masking)}): the gradients may be masked, so the gradient attacks run "
                      f"again through {', '.join(names)} on the points they left")
    for i in order if names else ():
        rec = merged[i]
        if i in precomputed or rec.robust is None or not rec.attack.needs_grad or not rec.robust.any():
            continue
        key = f"{rec.attack.name}@{rec.attack.threat.label}"
        stage = f"adaptive:{attack_id(rec.attack)}"
        hit = ck.get(stage)
        if hit is None:
            try:
                again = run(rec.attack, rec.robust, rec.scope, wrapped,
                            f"adaptive rerun: {rec.attack.name} {threat_text(rec.attack.threat)}")
                if adv_sink is not None and again.examples is not None:
                    adv_sink.attack(i, rec.attack, again.examples, adaptive=True)
                hit = ({"error": "", "seconds": again.seconds, "grad_evals": again.grad_evals,
                        "forward_evals": again.forward_evals}, rec.robust & again.robust)
            except Exception as exc:  # keep the plain record; say the rerun failed
                hit = ({"error": type(exc).__name__}, None)
            ck.put(stage, *hit)
        payload, robust = hit
        if payload["error"] or robust is None:
            flags.setdefault(key, set()).add(f"error:adaptive:{payload['error']}")
            continue
        merged[i] = dataclasses.replace(
            rec, robust=robust, seconds=rec.seconds + payload["seconds"],
            grad_evals=rec.grad_evals + payload["grad_evals"], forward_evals=rec.forward_evals + payload["forward_evals"],
        )
        flags.setdefault(key, set()).add(tag)
        worst[rec.attack.threat] = worst[rec.attack.threat] & robust
        rerun.add(rec.attack.threat)

    # -- the escalation ladder on each threat's survivors ------------------------------------------
    escalated: dict[ThreatModel, Escalated] = {}
    if escalation is not None:
        lazy = _Lazy(surrogate, policy)
        inner, _ = wrappers.adapt(  # the noise samples of step 1 are the EOT: no EOT inside them
            model, bpda=bool(fired & _STUCK), log_outputs=checks.PROBABILITY_OUTPUTS in fired, rescale=bool(fired & _STUCK)
        )
        for threat in list(worst):
            own = set(found) | {f for key, fs in flags.items() if key.endswith(f"@{threat.label}") for f in fs}
            if not own & set(MASKING):
                continue  # this threat's own checks are quiet (the rerun was for another threat's flags)
            why = ", ".join(sorted(own & set(MASKING)))
            esc = _escalate(threat, worst[threat], escalation, ck, run, inner, model, lazy, split, classes, adv_sink,
                            reporter, why)
            escalated[threat] = esc
            worst[threat] = worst[threat] & esc.robust
    for threat in worst:
        used = [*(names if threat in rerun else []), *(escalated[threat].names if threat in escalated else [])]
        if used:
            flags.setdefault(f"worst_case@{threat.label}", set()).add(checks.adapted(used))
    return Evaluation(
        len(split), correct, merged, worst, flags, plain_records=done, model_flags=frozenset(found), escalated=escalated,
    )


class _Lazy:
    """The surrogate, built on first use (training it can take a while) and moved to the device;
    a failure to build it is kept and raised again at each use (each threat's transfer step
    records it)."""

    def __init__(self, make: Callable[[], nn.Module | None] | None, policy: DevicePolicy) -> None:
        self.make, self.policy, self.built, self.model = make, policy, False, None
        self.error: Exception | None = None

    def get(self) -> nn.Module | None:
        if not self.built:
            self.built = True
            try:
                made = self.make() if self.make is not None else None
            except Exception as exc:
                self.error = exc
                raise
            self.model = self.policy.model_to(made).eval() if made is not None else None
        if self.error is not None:
            raise self.error
        return self.model


def threat_text(threat: ThreatModel) -> str:
    """A threat as progress lines show it: ``linf 0.1``."""
    return f"{threat.norm.value} {threat.eps:g}"


def _escalate(
    threat: ThreatModel, alive: Tensor, cfg: Escalation, ck: Checkpoint, run: Callable[..., AttackRecord],
    wrapped: nn.Module, model: nn.Module, surrogate: _Lazy, split: DataSplit, num_classes: int,
    adv_sink: AdvSink | None = None, reporter: Progress | None = None, why: str = "",
) -> Escalated:
    """The ladder on one threat: each step on the points still unbroken, while budget lasts; a
    step's finds go to ``adv_sink`` (when given) before its stage is checkpointed; ``reporter``
    hears what it does and why (``why``: the masking checks that fired)."""
    reporter = reporter if reporter is not None else Progress.off()
    where = threat_text(threat)
    steps: list[StepRecord] = []
    robust, spent = alive.clone(), 0.0
    if robust.any():
        reporter.note(
            f"{where}: checks fired ({why}), so the worst case may overstate robustness: escalating on the "
            f"{int(robust.sum())} unbroken points ({', '.join(cfg.steps)}, up to {cfg.budget:g} gradient evaluations "
            "per point)"
        )
    for step in cfg.steps:
        if not robust.any():
            reporter.note(f"{where}: escalation stops: no unbroken point left")
            break
        if spent + cfg.cost(step) > cfg.budget:
            reporter.note(f"{where}: escalation stops before {step}: its {cfg.cost(step):g} gradient evaluations per "
                          f"point would pass the budget of {cfg.budget:g} ({spent:g} spent)")
            break
        spent += cfg.cost(step)
        stage = f"escalate:{threat.label}:{step}"
        hit = ck.get(stage)
        if hit is not None and hit[1] is not None:
            rec = StepRecord.from_payload(hit[0], hit[1])
        else:
            found: list[AttackRecord] = []

            def run_one(a: EvasionAttack, m: Tensor, am: nn.Module | None, found: list = found,
                        step: str = step) -> AttackRecord:
                one = run(a, m, "survivors", am, f"escalation {step}: {a.name} {where}")
                found.append(one)
                return one

            try:
                rec = run_step(
                    step, threat, robust, cfg, run_one=run_one, wrapped=wrapped,
                    judge=model, surrogate=surrogate.get() if step == "transfer" else None, like=split.x, num_classes=num_classes,
                )
            except Exception as exc:  # a failed step keeps what the others found
                rec = StepRecord(step, robust.clone(), int(robust.sum()), 0, 0.0, 0, 0, error=f"{type(exc).__name__}: {exc}"[:300])
            kept = [r.examples for r in found if r.examples is not None]
            if adv_sink is not None and kept and not rec.error:
                adv_sink.escalation(threat, step, [r.attack for r in found], AdvExamples.concat(kept))
            ck.put(stage, rec.as_payload(), rec.robust)
        outcome = f"skipped ({rec.error.splitlines()[0]})" if rec.error else f"broke {rec.broke} of {rec.attacked} points"
        reporter.note(f"{where}: escalation {step}: {outcome}")
        steps.append(rec)
        robust = robust & rec.robust
    return Escalated(robust, steps)


def _as_float32(split: DataSplit) -> DataSplit:
    """Float16/float64 images as float32 (the models' precision); other dtypes are left for the
    attacks' input checks to name."""
    if split.x.is_floating_point() and split.x.dtype != torch.float32:
        return DataSplit(split.x.float(), split.y)
    return split


def _probe_iterations(
    model: nn.Module, records: Sequence[AttackRecord], correct: Tensor, correct_split: DataSplit,
    worst: Mapping[ThreatModel, Tensor], flags: dict[str, set[str]], device: torch.device, ck: Checkpoint,
    reporter: Progress | None = None,
) -> None:
    """Run :func:`iterations_probe` per threat (its outcome is a stage); a flag goes on the
    threat's iterative gradient attacks and its worst case."""
    for threat, mask in worst.items():
        stuck = [r for r in records if r.attack.threat == threat and r.attack.needs_grad and r.attack.iterative
                 and r.robust is not None]
        if not stuck:
            continue
        stage = f"probe:{threat.label}"
        hit = ck.get(stage)
        if hit is None:
            points = min(64, len(correct_split))
            with (reporter or Progress.off()).task(f"more-iterations probe {threat_text(threat)}", points) as task:
                hit = ({"code": iterations_probe(model, correct_split, threat, mask[correct], device)}, None)
                task.update(points)
            ck.put(stage, *hit)
        code = hit[0]["code"]
        if code is None:
            continue
        flags.setdefault(f"worst_case@{threat.label}", set()).add(code)
        for r in stuck:
            flags.setdefault(f"{r.attack.name}@{threat.label}", set()).add(code)


def cell_flags(records: Sequence[AttackRecord], model_flags: set[str] | str | None) -> dict[str, set[str]]:
    """Flags per attack (keyed ``name@threat``) and per worst case (keyed ``worst_case@threat``).

    ``model_flags`` are the model-level codes (zero-grad, probability-outputs, large-eps-not-zero
    go on gradient attacks; randomized-outputs on every attack); both go on the worst case."""
    if isinstance(model_flags, str):
        model_flags = {model_flags}
    model_flags = set(model_flags or ())
    flags: dict[str, set[str]] = {}
    by_threat: dict[ThreatModel, list[AttackRecord]] = {}
    for r in records:
        by_threat.setdefault(r.attack.threat, []).append(r)
    for threat, recs in by_threat.items():
        wc = flags.setdefault(f"worst_case@{threat.label}", set())
        ok = [r for r in recs if r.robust is not None]
        if len(ok) < len([r for r in recs if not r.skipped]):  # a skipped attack was left out on purpose
            wc.add(checks.INCOMPLETE)
        # cumulative (survivor) numbers are not comparable, and a targeted attack is weaker by design
        own = [r for r in ok if r.scope == "all" and not r.attack.targeted]
        losers = checks.single_step_beats_iterative(
            {r.attack.name: r.robust_acc for r in own if r.attack.needs_grad},
            {r.attack.name: r.attack.iterative for r in own if r.attack.needs_grad},
        )
        blind = checks.black_box_beats_white_box(
            {r.attack.name: r.robust_acc for r in own}, {r.attack.name: r.attack.needs_grad for r in own}
        )
        for r in recs:
            f = flags.setdefault(f"{r.attack.name}@{threat.label}", set())
            for code in model_flags:
                if r.attack.needs_grad or code == checks.RANDOMIZED:
                    f.add(code)
                    wc.add(code)
            if r.attack.name in losers:
                f.add(checks.SINGLE_STEP_WINS)
                wc.add(checks.SINGLE_STEP_WINS)
            if r.attack.name in blind:
                f.add(checks.BLACK_BOX_WINS)
                wc.add(checks.BLACK_BOX_WINS)
    return flags


def _describe(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n{''.join(tb[-3:])}"[:4000]
