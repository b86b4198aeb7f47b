"""Bound propagation as pure functions: input sets, interval bounds (IBP), backward linear
bounds (CROWN) and the relaxations of ReLU and max-pooling.

Notation: ``z_i`` is the input of ``net.ops[i]`` (``z_0 = x``); ``bounds[i] = (lo, hi)`` holds
elementwise bounds of ``z_i`` for every nonlinear op ``i``.  A linear bound is a tensor ``a`` of
shape ``[B, S, *shape(z_i)]`` (``S`` specifications per point); :func:`backward` returns a lower
bound of ``a · z_i`` over the input set.  Upper bounds are lower bounds of ``−a``.

Precision: the verifiers call these functions on float64 copies of the input (weights are cast
on use), so relaxations, back-substitution and concretization run in float64; certified
training calls them in float32 with gradients.  Bounds are sound for the exact-arithmetic
network up to float64 rounding (relative ~1e-16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.threat import Norm
from ._layers import MaxPoolOp, Network, ReLUOp

SPEC_BUDGET = 1 << 24  # elements of one linear-bound tensor when intermediate bounds are computed by CROWN
L1 = getattr(Norm, "L1", None)  # Norm.L1 is being added; supported when it exists


@dataclass(frozen=True)
class InputSet:
    """The ball ``{x' : ‖x' − x‖ ≤ eps}`` (per-point ``eps``) intersected with ``[0, 1]``, and
    ``lo``/``hi``: a box that contains it (exactly the set for Linf)."""

    x: Tensor
    norm: Norm
    eps: Tensor
    lo: Tensor
    hi: Tensor

    @classmethod
    def make(cls, x: Tensor, norm: Norm, eps: Tensor) -> InputSet:
        e = eps.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        # one ulp outwards, so rounding of x ± eps never shrinks the box below the ball
        lo = torch.nextafter(x - e, torch.full_like(x, -1.0)).clamp(min=0.0)
        hi = torch.nextafter(x + e, torch.full_like(x, 2.0)).clamp(max=1.0)
        return cls(x, norm, eps.to(x.dtype), lo, hi)

    def take(self, index: Tensor) -> InputSet:
        """The sets of the points ``index`` (repeats allowed)."""
        return InputSet(self.x[index], self.norm, self.eps[index], self.lo[index], self.hi[index])


def box_lower(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``min over lo ≤ z ≤ hi of a · z`` per specification: ``[B, S]``."""
    flat = a.flatten(2)
    return (flat.clamp(min=0) @ lo.flatten(1)[:, :, None] + flat.clamp(max=0) @ hi.flatten(1)[:, :, None])[..., 0]


def concretize(a: Tensor, inset: InputSet) -> Tensor:
    """Lower bound of ``a · x`` over the input set: exact over the Linf box; for L2 (L1)
    ``a·x₀ − eps‖a‖₂`` (``‖a‖∞``), the dual norm over the ball, ignoring the box (sound, looser)."""
    if inset.norm is Norm.LINF:
        return box_lower(a, inset.lo, inset.hi)
    flat = a.flatten(2)
    centre = (flat @ inset.x.flatten(1)[:, :, None])[..., 0]
    dual = flat.norm(dim=-1) if inset.norm is Norm.L2 else flat.abs().amax(dim=-1)
    return centre - inset.eps[:, None] * dual


# ---------------------------------------------------------------------------------------------
# relaxations
# ---------------------------------------------------------------------------------------------


def relu_lower_slope(lo: Tensor, hi: Tensor) -> Tensor:
    """CROWN's adaptive lower slope ("CROWN-Ada", Zhang et al. 2018): 1 where ``u ≥ −l``, else 0."""
    return (hi >= -lo).to(lo.dtype)


def relu_back(
    a: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor | None = None, rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Back-substitute ``a · relu(z)`` to ``a' · z + c`` (a lower bound) given ``lo ≤ z ≤ hi``.

    Unstable neurons (``l < 0 < u``): upper line ``u(z − l)/(u − l)`` where ``a < 0``, lower line
    ``α z`` where ``a ≥ 0`` (``α``: per specification when given, else CROWN's adaptive choice).
    Stable neurons are exact.  ``rows[r]``: the point of row ``r`` of ``a`` when ``a`` holds rows
    of several points (the relaxation is computed per point, then gathered).  Returns ``(a', c)``.
    """
    unstable = (lo < 0) & (hi > 0)
    active = (lo >= 0).to(a.dtype)
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))
    up_slope = torch.where(unstable, hi / width, active)
    up_icpt = torch.where(unstable, -up_slope * lo, torch.zeros_like(lo))
    if alpha is None:
        low = torch.where(unstable, relu_lower_slope(lo, hi), active)[:, None]
    else:
        low = torch.where(unstable[:, None], alpha, active[:, None])
    if rows is not None:
        low, up_slope, up_icpt = low[rows], up_slope[rows], up_icpt[rows]
    neg = a.clamp(max=0)
    const = (neg.flatten(2) @ up_icpt.flatten(1)[:, :, None])[..., 0]
    return a * low + neg * (up_slope[:, None] - low), const  # = a⁺·low + a⁻·up_slope


def maxpool_lower_weights(op: MaxPoolOp, lo: Tensor) -> Tensor:
    """CROWN's lower relaxation of a max: ``y ≥ z_j`` for ``j`` the window entry with the largest
    lower bound, as one-hot weights ``[B, C, L, K]``."""
    lw = op.unfold(lo)
    return torch.nn.functional.one_hot(lw.argmax(-1), lw.shape[-1]).to(lo.dtype)


def maxpool_back(
    a: Tensor, lo: Tensor, hi: Tensor, op: MaxPoolOp, lam: Tensor | None = None, rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Back-substitute ``a · maxpool(z)`` given ``lo ≤ z ≤ hi``; returns ``(a', c)``.

    Lower relaxation (where ``a ≥ 0``): ``y ≥ Σ_k λ_k z_k``, any ``λ`` in the simplex (default:
    one-hot at the largest lower bound; α-CROWN optimizes ``λ``).  Upper relaxation (where
    ``a < 0``): with ``j`` the entry with the largest upper bound and ``m = max_{k≠j} u_k``,
    ``y ≤ max(z_j, m)``, bounded by its chord over ``[l_j, u_j]``:
    ``y ≤ g + s(z_j − l_j)``, ``g = max(l_j, m)``, ``s = (u_j − g)/(u_j − l_j)``.  It is exact
    (``y = z_j``) when ``l_j ≥ m`` (one input dominates the window).
    """
    bsz, s = a.shape[:2]
    c, h, w = op.in_shape
    lw, hw = op.unfold(lo), op.unfold(hi)  # [B, C, L, K]
    kk = lw.shape[-1]
    if lam is None:
        lam = maxpool_lower_weights(op, lo)
    lam = lam[:, None] if lam.dim() == 4 else lam
    top = hw.topk(min(2, kk), dim=-1)
    j, uj = top.indices[..., 0], top.values[..., 0]
    m = top.values[..., 1] if kk > 1 else torch.full_like(uj, float("-inf"))
    lj = lw.gather(-1, j[..., None])[..., 0]
    g = torch.maximum(lj, m)
    wide = uj > lj
    slope = torch.where(wide, (uj - g) / torch.where(wide, uj - lj, torch.ones_like(uj)), torch.zeros_like(uj))
    icpt = g - slope * lj
    if rows is not None:  # rows of several points: relaxations per point, gathered per row
        lam, j, slope, icpt = lam[rows], j[rows], slope[rows], icpt[rows]
    flat = a.reshape(bsz, s, c, -1)  # [B, S, C, L]
    pos, neg = flat.clamp(min=0), flat.clamp(max=0)
    windows = op.windows.to(a.device)
    out = a.new_zeros(bsz, s, c, h * w)
    src = (pos[..., None] * lam).flatten(-2)
    out.scatter_add_(-1, windows.reshape(1, 1, 1, -1).expand(bsz, s, c, -1), src)
    at_j = windows[torch.arange(windows.shape[0], device=a.device), j]  # [B, C, L]
    out.scatter_add_(-1, at_j[:, None].expand(bsz, s, c, -1), neg * slope[:, None])
    const = (neg * icpt[:, None]).flatten(2).sum(-1)
    return out.reshape(bsz, s, c, h, w), const


# ---------------------------------------------------------------------------------------------
# propagation
# ---------------------------------------------------------------------------------------------


def backward(
    net: Network, end: int, a: Tensor, bounds: dict, inset: InputSet, relax: dict | None = None,
    const: Tensor | None = None, rows: Tensor | None = None,
) -> Tensor:
    """Lower bound ``[B, S]`` of ``a · z_end + const`` over the input set (CROWN's backward pass,
    Zhang et al. 2018, Theorem 3.2), using ``bounds`` of every nonlinear op before ``end`` and
    optional per-op relaxation variables ``relax`` (α-CROWN).  With ``rows``, row ``r`` of ``a``
    belongs to point ``rows[r]`` of ``bounds`` and ``inset``."""
    relax = relax or {}
    const = a.new_zeros(a.shape[:2]) if const is None else const
    for i in range(end - 1, -1, -1):
        op = net.ops[i]
        if op.affine:
            const = const + op.bias_term(a)
            a = op.back(a)
        elif isinstance(op, ReLUOp):
            a, c = relu_back(a, *bounds[i], relax.get(i), rows)
            const = const + c
        else:
            a, c = maxpool_back(a, *bounds[i], op, relax.get(i), rows)
            const = const + c
    return const + concretize(a, inset if rows is None else inset.take(rows))


def _needs_crown(net: Network, i: int, inset: InputSet) -> bool:
    """Whether back-substitution can beat the interval at ``z_i``: not when only elementwise
    maps follow the previous nonlinearity, nor for one affine map of the Linf box."""
    j = i - 1
    mixing = 0
    while j >= 0 and net.ops[j].affine:
        mixing += not net.ops[j].exact_interval
        j -= 1
    return mixing >= 2 or (mixing == 1 and (j >= 0 or inset.norm is not Norm.LINF))


def _crown_refine(net: Network, i: int, lo: Tensor, hi: Tensor, mask: Tensor, bounds: dict, inset: InputSet):
    """Tighten ``lo ≤ z_i ≤ hi`` on the neurons in ``mask`` by CROWN.

    Works on the flat list of (point, neuron) pairs, in chunks, so points with few such neurons
    cost little.  The affine ops right before ``z_i`` do not depend on the point, so their
    back-substitution is done once per distinct neuron of a chunk and gathered per pair."""
    shape = lo.shape[1:]
    pts, idx = mask.flatten(1).nonzero(as_tuple=True)
    if pts.numel() == 0:
        return lo, hi
    start = i
    while start > 0 and net.ops[start - 1].affine:
        start -= 1  # ops[start:i] is the point-independent affine chain
    width = max(math.prod(op.in_shape) for op in net.ops[: i + 1])
    chunk = max(1, SPEC_BUDGET // (2 * width))
    lo_f, hi_f = lo.flatten(1), hi.flatten(1)
    for first in range(0, pts.numel(), chunk):
        p, n = pts[first : first + chunk], idx[first : first + chunk]
        uniq, inv = torch.unique(n, return_inverse=True)
        rows = lo.new_zeros(1, uniq.numel(), lo_f.shape[1])
        rows[0, torch.arange(uniq.numel(), device=lo.device), uniq] = 1.0
        rows, const = rows.reshape(1, uniq.numel(), *shape), rows.new_zeros(1, uniq.numel())
        for j in range(i - 1, start - 1, -1):
            const = const + net.ops[j].bias_term(rows)
            rows = net.ops[j].back(rows)
        a, c = rows[0][inv][:, None], const[0][inv][:, None]  # [P, 1, *in], [P, 1]
        bound = backward(net, start, torch.cat([a, -a], 1), bounds, inset, const=torch.cat([c, -c], 1), rows=p)
        lo_f = lo_f.index_put((p, n), torch.maximum(lo_f[p, n], bound[:, 0]))
        hi_f = hi_f.index_put((p, n), torch.minimum(hi_f[p, n], -bound[:, 1]))
    lo_f = torch.minimum(lo_f, hi_f)  # float noise can cross them; the true value lies between
    return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)


def layer_bounds(net: Network, inset: InputSet, method: str = "ibp") -> tuple[dict, tuple[Tensor, Tensor]]:
    """Bounds of the input of every nonlinear op, and the interval at the input of the last op.

    ``method="ibp"``: interval propagation (Gowal et al. 2018).  ``"crown"``: layer by layer, each
    nonlinear op's input is bounded by CROWN back-substitution (only the unstable neurons of a
    ReLU need it; a max-pool needs all) and intersected with the interval, which is also sound.
    """
    lo, hi = inset.lo, inset.hi
    bounds: dict[int, tuple[Tensor, Tensor]] = {}
    for i, op in enumerate(net.ops):
        if not op.affine:
            if method == "crown" and _needs_crown(net, i, inset):
                mask = (lo < 0) & (hi > 0) if isinstance(op, ReLUOp) else torch.ones_like(lo, dtype=torch.bool)
                lo, hi = _crown_refine(net, i, lo, hi, mask, bounds, inset)
            bounds[i] = (lo, hi)
        if i == len(net.ops) - 1:
            break
        lo, hi = op.interval(lo, hi)
    return bounds, (lo, hi)


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``C[b, c] = e_y − e_c``: ``[B, K, K]`` (the row ``c = y`` is zero)."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[None]


def ibp_margins(net: Network, last_in: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    """IBP lower bounds of ``f_y − f_c`` with the margin matrix folded into the last affine op,
    concretized over the interval at its input (tighter than subtracting logit intervals)."""
    spec = margin_spec(y, net.num_classes, last_in[0].dtype)
    last = net.ops[-1]
    if last.affine:
        return last.bias_term(spec) + box_lower(last.back(spec), *last_in)
    lo, hi = last.interval(*last_in)
    return lo.gather(1, y[:, None]) - hi


def crown_margins(net: Network, bounds: dict, inset: InputSet, y: Tensor, relax: dict | None = None) -> Tensor:
    """CROWN lower bounds ``[B, K]`` of ``f_y − f_c`` (0 at ``c = y``): one backward pass started
    from the ``K − 1`` rows ``e_y − e_c``, ``c ≠ y``, of the margin matrix."""
    others = other_classes(y, net.num_classes)
    eye = torch.eye(net.num_classes, dtype=inset.x.dtype, device=y.device)
    lower = backward(net, len(net.ops), eye[y][:, None, :] - eye[others], bounds, inset, relax)
    return lower.new_zeros(y.shape[0], net.num_classes).scatter(1, others, lower)


def other_classes(y: Tensor, num_classes: int) -> Tensor:
    """``[B, K − 1]``: the classes other than ``y``, in increasing order."""
    base = torch.arange(num_classes - 1, device=y.device)[None]
    return base + (base >= y[:, None]).long()


def logit_interval(net: Network, inset: InputSet) -> tuple[Tensor, Tensor]:
    """IBP interval of the logits (what interval libraries such as ART report)."""
    _, last_in = layer_bounds(net, inset, "ibp")
    return net.ops[-1].interval(*last_in)
