"""Gaussian noise augmentation, the training of the base classifiers of randomized smoothing
(Cohen, Rosenfeld & Kolter, "Certified adversarial robustness via randomized smoothing", ICML 2019:
their base classifiers are trained with Gaussian data augmentation at the σ that is then certified).

Every training image is replaced by ``x + δ``, ``δ ~ N(0, σ² I)`` drawn afresh each batch, and the
loss is cross-entropy there, so the base classifier ``f`` learns to classify noisy images and the
smoothed classifier ``g(x) = argmax_c P(f(x + δ) = c)`` is accurate at the same ``σ``.  Train at the
``σ`` that will be certified (:class:`robustbench_lite.certify.smoothing.Smoothing`).  As in the
paper, the noisy images are not clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustbench_lite import Defense, register_defense, setting


@register_defense("gaussian-aug")
@dataclass(frozen=True, kw_only=True)
class GaussianAug(Defense):
    """Cross-entropy on ``x + N(0, sigma² I)`` (noise from the run's seeded generator)."""

    sigma: float = setting(0.25, low=0.0, low_open=True)

    def batch_loss(self, model, x, y, state):
        noise = torch.randn(x.shape, generator=self.generator(state), dtype=x.dtype)
        return F.cross_entropy(model(x + self.sigma * noise.to(x.device)), y)
