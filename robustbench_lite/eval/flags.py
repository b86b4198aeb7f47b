"""Checks that flag unreliable evaluations (Athalye et al. 2018; Carlini et al. 2019).

Each check is a small pure function over numbers the harness already has; it returns a flag
code (a stable string stored in the ``flags`` column) or ``None``.  A flagged cell is kept and
marked, never dropped.  :data:`FLAGS` explains every code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

ZERO_GRAD = "zero-grad"
SINGLE_STEP_WINS = "single-step-beats-iterative"
INCOMPLETE = "incomplete"
PROBABILITY_OUTPUTS = "probability-outputs"
RANDOMIZED = "randomized-outputs"
BLACK_BOX_WINS = "black-box-beats-white-box"
LARGE_EPS = "large-eps-not-zero"
MORE_STEPS_NO_HELP = "more-iterations-no-help"
CERTIFIED_BROKEN = "certified-broken"
COUNTEREXAMPLE_REJECTED = "counterexample-rejected"
WASSERSTEIN_BOUND_BROKEN = "wasserstein-bound-broken"
NON_FINITE = "non-finite-outputs"
CLEAN_MISMATCH = "clean-acc-mismatch"
ADAPTED = "adapted"  # prefix: "adapted:bpda+rescale" says which wrappers an adaptive rerun used

FLAGS: dict[str, str] = {
    ZERO_GRAD: "the loss gradient w.r.t. the input is zero or non-finite on a share of the evaluated points: "
    "gradient attacks are blind there (gradient masking, saturated softmax, non-differentiable layer)",
    SINGLE_STEP_WINS: "a single-step attack left lower robust accuracy than an iterative one at the same threat: "
    "the iterative attack is failing, a classic sign of gradient masking",
    INCOMPLETE: "at least one attack of this threat failed with an error, so the worst case covers fewer attacks",
    PROBABILITY_OUTPUTS: "the model's outputs look like probabilities (non-negative rows summing to 1), so CE-based "
    "attacks apply a second softmax and get tiny or vanishing gradients; attack log-probabilities instead",
    RANDOMIZED: "the same input gave different outputs on two forward passes: the model is randomized, single "
    "gradient samples are noisy and robust accuracy varies run to run; use EOT (average over passes)",
    BLACK_BOX_WINS: "a black-box (gradient-free) attack left lower robust accuracy than a gradient attack at the "
    "same threat: the gradients are misleading the white-box attack (gradient masking)",
    LARGE_EPS: "a PGD probe at a very large eps (any image reachable) did not bring accuracy near 0 on a few "
    "points: the gradient attacks cannot find even trivial adversarial examples (gradient masking)",
    MORE_STEPS_NO_HELP: "a PGD probe with 10x more iterations did not lower robust accuracy below the short run "
    "while the short run left points unbroken that a black-box or unbounded attack can break",
    CERTIFIED_BROKEN: "an attack broke a point that the defense's certificate counts as robust: the certificate "
    "(or the model recovered from the training program) is unsound; do not trust the certified column",
    COUNTEREXAMPLE_REJECTED: "a verifier claimed adversarial examples that failed the forward-pass re-check (outside the "
    "threat ball or [0, 1], non-finite, or classified correctly): those points count as undecided, never as broken, "
    "and the verifier has a bug",
    WASSERSTEIN_BOUND_BROKEN: "a Wasserstein attack reached a larger mean loss within the transport budget than WRM's "
    "certificate allows: the ascent behind the certificate missed the supremum (gamma below the loss's smoothness "
    "constant, a non-smooth network, too few steps), so the bound is not a certificate for this model",
    ADAPTED: "a masking check fired and the gradient attacks were rerun through wrappers (bpda: straight-through "
    "backward for marked non-differentiable layers; eot: mean over forward passes; log-outputs: attack log p; "
    "rescale: logits divided by the gap between their two largest), then the worst case escalated on its survivors "
    "(noise-eot: APGD on the model smoothed by small Gaussian input noise; transfer: PGD on a standard-trained "
    "surrogate; square: Square Attack with 5000 queries); the row keeps the per-point worst of every run",
    NON_FINITE: "the model returned NaN or inf outputs on some evaluated points; they count as misclassified, and the "
    "model (or its weights) needs fixing before its numbers mean anything",
    CLEAN_MISMATCH: "the clean accuracy measured here differs from the one recorded when the model was trained by more "
    "than sampling noise: the cached weights may not be the trained ones (retrain: delete the model's cache files)",
}


def probability_outputs(outputs: Tensor, atol: float = 1e-3) -> str | None:
    """Flag outputs whose rows are non-negative and sum to 1 (a softmax output layer)."""
    if outputs.numel() == 0 or outputs.dim() != 2:
        return None
    sums = outputs.sum(dim=1)
    looks = bool((outputs >= 0).all()) and bool(((sums - 1).abs() <= atol).all())
    return PROBABILITY_OUTPUTS if looks else None


def randomized_outputs(first: Tensor, second: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> str | None:
    """Flag when two forward passes of the same inputs differ (beyond float noise)."""
    if first.shape != second.shape:
        return RANDOMIZED
    return None if torch.allclose(first, second, rtol=rtol, atol=atol, equal_nan=True) else RANDOMIZED


def black_box_beats_white_box(
    robust_acc: Mapping[str, float], needs_grad: Mapping[str, bool], tolerance: float = 0.02
) -> set[str]:
    """When even the best gradient attack leaves more than ``tolerance`` higher robust accuracy
    than the best gradient-free attack (all of one threat model), the gradient attacks that do.
    A weak single-step attack losing to Square on its own is no sign of masking."""
    free = [acc for name, acc in robust_acc.items() if not needs_grad[name]]
    grad = [acc for name, acc in robust_acc.items() if needs_grad[name]]
    if not free or not grad or min(grad) <= min(free) + tolerance:
        return set()
    best_free = min(free)
    return {name for name, acc in robust_acc.items() if needs_grad[name] and acc > best_free + tolerance}


def large_eps_not_zero(robust_acc: float, max_acc: float = 0.1) -> str | None:
    """Flag when accuracy under an attack at a huge eps (e.g. Linf 1) stays above ``max_acc``."""
    return LARGE_EPS if robust_acc > max_acc else None


def more_iterations_no_help(acc_short: float, acc_long: float, acc_reference: float, margin: float = 0.10) -> str | None:
    """Flag when a 10x longer run is no better than the short one although a reference attack
    (black-box or unbounded) shows that ``margin`` more points can be broken."""
    stuck = acc_long >= acc_short - 1e-9
    return MORE_STEPS_NO_HELP if stuck and acc_reference < acc_short - margin else None


def wasserstein_bound_broken(bounds: Iterable[float], attacked: Iterable[float], rtol: float = 1e-6) -> str | None:
    """Flag a WRM certificate below the loss an attack reached within the same budget (pairs of
    ``bounds`` and ``attacked`` mean losses; ``rtol`` absorbs float rounding of the means)."""
    for bound, loss in zip(bounds, attacked, strict=True):
        if loss > bound + rtol * max(1.0, abs(bound)):
            return WASSERSTEIN_BOUND_BROKEN
    return None


def adapted(wrappers: Iterable[str]) -> str | None:
    """The flag recording an adaptive rerun, e.g. ``adapted:bpda+rescale``."""
    names = list(wrappers)
    return f"{ADAPTED}:{'+'.join(names)}" if names else None


def explain(code: str) -> str:
    """The explanation of a flag code (``adapted:...`` and ``error:...`` included)."""
    base = code.split(":", 1)[0]
    if base == "error":
        return "this attack raised an error; see the cell's error column"
    return FLAGS.get(code, FLAGS.get(base, "unknown flag"))


def zero_gradients(grad_norms: Tensor, max_share: float = 0.05) -> str | None:
    """Flag when more than ``max_share`` of points have a zero or non-finite input gradient."""
    if grad_norms.numel() == 0:
        return None
    bad = ~torch.isfinite(grad_norms) | (grad_norms <= 1e-30)
    return ZERO_GRAD if float(bad.float().mean()) > max_share else None


def single_step_beats_iterative(
    robust_acc: Mapping[str, float], iterative: Mapping[str, bool], tolerance: float = 0.01
) -> set[str]:
    """The iterative attacks whose robust accuracy exceeds the best single-step attack's by
    more than ``tolerance`` (all of one threat model).  Returns their names."""
    single = [acc for name, acc in robust_acc.items() if not iterative[name]]
    if not single:
        return set()
    best_single = min(single)
    return {name for name, acc in robust_acc.items() if iterative[name] and acc > best_single + tolerance}


def clean_acc_mismatch(measured: float, recorded: object, n: int, sigmas: float = 4.0, slack: float = 0.02) -> str | None:
    """Flag when ``measured`` (on ``n`` points) differs from the ``recorded`` clean accuracy by
    more than ``sigmas`` binomial standard deviations plus ``slack`` (the points are a sample of
    the set the recorded number was measured on).  A missing or invalid record never flags."""
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)) or not 0.0 <= recorded <= 1.0 or n < 1:
        return None
    sd = (recorded * (1 - recorded) / n) ** 0.5
    return CLEAN_MISMATCH if abs(measured - recorded) > sigmas * sd + slack else None


def join(flags: Iterable[str | None]) -> str:
    """Flags as the ``flags`` column stores them: sorted, unique, ';'-separated."""
    return ";".join(sorted({f for f in flags if f}))
