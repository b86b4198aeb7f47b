"""Standard training: empirical risk minimization with cross-entropy (the undefended baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from robustbench_lite import Defense, register_defense


@register_defense("standard")
@dataclass(frozen=True, kw_only=True)
class Standard(Defense):
    """Mean cross-entropy on clean inputs."""

    def batch_loss(self, model, x, y, state):
        return F.cross_entropy(model(x), y)
