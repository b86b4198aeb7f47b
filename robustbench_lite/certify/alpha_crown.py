"""α-CROWN (Xu, Zhang, Wang, Wang, Jana, Lin & Hsieh, "Fast and complete: enabling complete
neural network verification with rapid and massively parallel incomplete verifiers", ICLR 2021):
the lower slopes ``α ∈ [0, 1]`` of unstable ReLUs become variables, one per neuron
and per specification, optimized by projected gradient ascent (Adam directions, projection by
clipping) on the CROWN lower bound of each margin.  Every ``α`` gives a sound bound, so every
iterate is sound; the best bound per (point, class) over all iterates is returned, and the first
iterate is CROWN's adaptive choice, so α-CROWN is never looser than CROWN.  With
``skip_certified`` (default) points whose CROWN margins are all positive keep CROWN's bounds:
certification is already decided there and the optimisation would only tighten them.

Max-pooling: the lower relaxation ``y ≥ Σ λ_k z_k`` is optimized the same way over the simplex
(projection onto the simplex).  Intermediate bounds come from ``crown`` or ``ibp`` (setting) and
stay fixed; the paper also optimizes the slopes used for the intermediate bounds, which is
tighter and costlier (a deviation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.config import setting
from . import BoundVerifier, crown_margins, layer_bounds, register_verifier
from ._bounds import maxpool_lower_weights, relu_lower_slope
from ._layers import ReLUOp


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (last dimension) onto the probability simplex."""
    u = v.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True).clamp(min=1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp(min=0)


@register_verifier("alpha-crown")
@dataclass(frozen=True, kw_only=True)
class AlphaCROWN(BoundVerifier):
    """CROWN with optimized lower relaxations."""

    intermediate: str = setting("crown", choices=("crown", "ibp"))
    steps: int = setting(20, low=0)
    lr: float = setting(0.1, low=0.0, low_open=True)
    skip_certified: bool = setting(True)  # points whose CROWN margins are all positive keep them

    def _net_bounds(self, net, inset, y):
        bounds, _ = layer_bounds(net, inset, self.intermediate)
        best = crown_margins(net, bounds, inset, y)
        todo = torch.ones_like(y, dtype=torch.bool)
        if self.skip_certified:  # certification is decided there; optimizing would only tighten
            todo = ~(best.scatter(1, y[:, None], float("inf")) > 0).all(1)
        if self.steps == 0 or not bool(todo.any()):
            return best
        idx = todo.nonzero()[:, 0]
        sub = {i: (lo[idx], hi[idx]) for i, (lo, hi) in bounds.items()}
        return best.index_put((idx,), self._optimize(net, sub, inset.take(idx), y[idx], best[idx]))

    def _optimize(self, net, bounds, inset, y, best):
        """Projected gradient ascent on the slopes, starting at CROWN's; the best bound per
        (point, class) over all iterates."""
        k = net.num_classes - 1  # one slope per neuron and per margin f_y − f_c, c ≠ y
        relax = {}
        for i, (lo, hi) in bounds.items():
            start = relu_lower_slope(lo, hi) if isinstance(net.nodes[i].op, ReLUOp) else maxpool_lower_weights(net.nodes[i].op, lo)
            relax[i] = start[:, None].expand(-1, k, *start.shape[1:]).clone().requires_grad_(True)
        if not relax:
            return best
        opt = torch.optim.Adam(list(relax.values()), lr=self.lr, maximize=True)
        with torch.enable_grad():
            for _ in range(self.steps):
                bound = crown_margins(net, bounds, inset, y, relax)
                best = torch.maximum(best, bound.detach())
                opt.zero_grad(set_to_none=True)
                grads = torch.autograd.grad(bound.sum(), list(relax.values()), allow_unused=True)
                for var, g in zip(relax.values(), grads, strict=True):
                    var.grad = g
                opt.step()
                with torch.no_grad():
                    for i, var in relax.items():
                        var.copy_(var.clamp(0, 1) if isinstance(net.nodes[i].op, ReLUOp) else project_simplex(var))
        with torch.no_grad():
            return torch.maximum(best, crown_margins(net, bounds, inset, y, relax))
