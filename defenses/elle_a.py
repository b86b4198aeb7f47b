"""ELLE-A: ELLE with an adaptive regularization weight (Rocamora et al., CVPR 2024, §4.2).

λ starts at ``lam_start`` (0: plain FGSM-RS until a problem shows); at each step, if the batch's
``E_lin`` exceeds ``mean + 2·std`` of the last ``history`` values, ``λ ← lam_max`` (4000), else
``λ ← decay · λ`` (0.99).  The history and λ live in ``TrainState.extra``; the epoch's mean E_lin,
its last and largest λ are recorded in the training curve.  The window length is our choice
(the paper's detector compares with the recent history of E_lin).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from robustbench_lite import register_defense, setting

from .elle import ELLE


@register_defense("elle-a")
@dataclass(frozen=True, kw_only=True)
class ELLEA(ELLE):
    """ELLE whose λ jumps to ``lam_max`` when E_lin spikes and decays otherwise."""

    lam_start: float = setting(0.0, low=0.0)
    lam_max: float = setting(4000.0, low=0.0)
    decay: float = setting(0.99, low=0.0, high=1.0)
    history: int = setting(20, low=2)

    def regularization_weight(self, e_lin: float, state) -> float:
        past = state.extra.setdefault("elle_history", [])
        lam = state.extra.get("elle_lam", self.lam_start)
        if len(past) >= 2 and e_lin > statistics.fmean(past) + 2 * statistics.pstdev(past):
            lam = self.lam_max
        else:
            lam = self.decay * lam
        past.append(e_lin)
        del past[: -self.history]
        state.extra["elle_lam"] = lam
        peak = state.metrics.get("lambda_peak", 0.0) if state.extra.get("elle_peak_epoch") == state.epoch else 0.0
        state.metrics["lambda_peak"], state.extra["elle_peak_epoch"] = max(peak, lam), state.epoch
        state.metrics["lambda"] = lam
        return lam
