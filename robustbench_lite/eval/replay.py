"""Re-judge saved adversarial examples on a model, without rerunning any attack.

A robustness claim ("robust accuracy X under Linf eps") rests on the examples the attacks found.
:func:`replay` checks each saved example (:mod:`~robustbench_lite.eval.adversarial`) against its
original test point: it must lie in the threat ball ∩ [0, 1] around it (the same tolerance the
attacks' output check uses), its label must be the point's, and the model must misclassify it.
On the model that made the examples every one must be misclassified; on another model the share
that is is the transfer rate (Papernot et al. 2016; Tramèr et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.data import DataSplit
from ..core.device import DevicePolicy, as_policy, layout_kept
from .adversarial import SavedExamples

RANGE_TOL = 1e-5  # the attacks' output check: pixels in [-tol, 1 + tol]


@dataclass(frozen=True)
class ReplayResult:
    """One file re-judged on one model."""

    file: str
    attack: str
    threat: str
    count: int  # saved examples
    outside_ball: int  # farther than eps from their original point
    outside_range: int  # pixels outside [0, 1]
    wrong_label: int  # the saved label is not the original point's
    misclassified: int  # the model's prediction is not the label
    same_model: bool  # the model that made the examples (its state dict's hash matches)
    bad: tuple[int, ...] = ()  # test-split indices of the examples that failed a check (the first 20)
    clean_correct: int | None = None  # another model: original points it classifies correctly
    fooled_correct: int | None = None  # another model: of those, examples it misclassifies

    @property
    def fooled_rate(self) -> float | None:
        """Another model: the transfer rate among the points it gets right without attack (the
        others count as misclassified in :attr:`rate` whatever the perturbation)."""
        return self.fooled_correct / self.clean_correct if self.clean_correct else None

    @property
    def rate(self) -> float | None:
        """Share misclassified (the transfer rate on another model); None for an empty file."""
        return self.misclassified / self.count if self.count else None

    @property
    def valid(self) -> bool:
        """Every example is a legal perturbation of its point with the point's label."""
        return self.outside_ball == 0 and self.outside_range == 0 and self.wrong_label == 0

    @property
    def ok(self) -> bool:
        """Valid, and on the original model every example is adversarial."""
        return self.valid and (not self.same_model or self.misclassified == self.count)


def data_fingerprint(points: DataSplit, n: int) -> str:
    """The fingerprint of the first ``n`` points (what a saved file records of its points)."""
    return points.head(n).fingerprint()


@torch.no_grad()
def replay(
    saved: SavedExamples, model: nn.Module, points: DataSplit, *, same_model: bool,
    policy: DevicePolicy | None = None, batch_size: int = 500,
) -> ReplayResult:
    """Re-judge ``saved`` on ``model``; ``points`` is the test split the examples came from (its
    first ``saved.n`` points must be the ones evaluated: check :func:`data_fingerprint` first)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    policy = policy if policy is not None else as_policy("cpu")
    ex = saved.examples
    if len(ex) and int(ex.index.max()) >= len(points):
        raise ValueError(f"{saved.path.name} refers to test point {int(ex.index.max())} but the data has {len(points)}; "
                         "pass the data the examples were made from")
    if len(ex) and tuple(ex.x_adv.shape[1:]) != tuple(points.x.shape[1:]):
        raise ValueError(f"{saved.path.name} holds images of shape {tuple(ex.x_adv.shape[1:])} but the data's are "
                         f"{tuple(points.x.shape[1:])}; pass the data the examples were made from")
    with layout_kept(model):  # the caller's model comes back in its layout (still savable)
        return _judge(saved, policy.model_to(model).eval(), points, policy, same_model=same_model, batch_size=batch_size)


def _judge(
    saved: SavedExamples, model: nn.Module, points: DataSplit, policy: DevicePolicy, *, same_model: bool, batch_size: int,
) -> ReplayResult:
    ex, threat = saved.examples, saved.threat
    outside_ball = outside_range = wrong_label = wrong = clean_ok = fooled_ok = 0
    bad: list[Tensor] = []
    for i in range(0, len(ex), batch_size):
        idx = ex.index[i : i + batch_size]
        x_adv, label = ex.x_adv[i : i + batch_size], ex.label[i : i + batch_size]
        x0, y0 = points.x[idx].float(), points.y[idx].long()
        ball = threat.geometry.inside(x_adv - x0, threat.eps)
        in_range = (x_adv.flatten(1).min(1).values >= -RANGE_TOL) & (x_adv.flatten(1).max(1).values <= 1 + RANGE_TOL)
        same_label = label == y0
        pred = model(policy.batch_to(x_adv)).argmax(1).cpu()
        fooled = pred != y0
        if not same_model:
            right = model(policy.batch_to(x0)).argmax(1).cpu() == y0
            clean_ok += int(right.sum())
            fooled_ok += int((right & fooled).sum())
        outside_ball += int((~ball).sum())
        outside_range += int((~in_range).sum())
        wrong_label += int((~same_label).sum())
        wrong += int(fooled.sum())
        failed = ~(ball & in_range & same_label) | (~fooled if same_model else torch.zeros_like(fooled))
        bad.append(idx[failed])
    failed_idx = torch.cat(bad)[:20].tolist() if bad else []
    return ReplayResult(
        str(saved.path), saved.attack, f"{threat.norm.value} {threat.eps:g}", len(ex), outside_ball, outside_range,
        wrong_label, wrong, same_model, tuple(int(i) for i in failed_idx),
        None if same_model else clean_ok, None if same_model else fooled_ok,
    )
