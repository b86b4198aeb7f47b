"""Bound propagation as pure functions: input sets, interval bounds (IBP), backward linear
bounds (CROWN) and the relaxations of ReLU and max-pooling.

Notation: ``z_k`` is the output of node ``k`` of the graph (``z_0 = x``); ``bounds[k] = (lo, hi)``
holds elementwise bounds of the input of every nonlinear node ``k``.  A linear bound is a tensor
``a`` of shape ``[B, S, *shape(z_k)]`` (``S`` specifications per point); :func:`backward` returns a
lower bound of ``Σ_k a_k · z_k`` over the input set, visiting the nodes in reverse topological
order and summing the coefficients a node receives from its consumers (residual graphs).  Upper
bounds are lower bounds of ``−a``.

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
from ._graph import Network
from ._layers import MaxPoolOp, ReLUOp

SPEC_BUDGET = 1 << 24  # elements of one linear-bound tensor when intermediate bounds are computed by CROWN


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

    def linear_min(self, a: Tensor) -> Tensor:
        """Lower bound ``[B, S]`` of ``a · x`` over the set (the norm's geometry): exact over the
        Linf box; for L2 (L1) ``a·x₀ − eps‖a‖₂`` (``‖a‖∞``), the dual norm over the ball, ignoring
        the box (sound, looser)."""
        return self.norm.geometry.linear_min(a.flatten(2), self.x.flatten(1), self.eps, self.lo.flatten(1),
                                             self.hi.flatten(1))


def box_lower(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``min over lo ≤ z ≤ hi of a · z`` per specification: ``[B, S]``."""
    flat = a.flatten(2)
    return (flat.clamp(min=0) @ lo.flatten(1)[:, :, None] + flat.clamp(max=0) @ hi.flatten(1)[:, :, None])[..., 0]


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
    net: Network, start: dict[int, Tensor], bounds: dict, inset: InputSet, relax: dict | None = None,
    const: Tensor | None = None, rows: Tensor | None = None, extra: dict | None = None,
    record: dict | None = None, linear: bool = False,
):
    """Lower bound ``[B, S]`` of ``Σ_k start[k] · z_k + const`` over the input set (CROWN's
    backward pass, Zhang et al. 2018, Theorem 3.2, over the graph), using ``bounds`` of every
    nonlinear node it meets and optional per-node relaxation variables ``relax`` (α-CROWN).

    ``extra[k]`` is added to the coefficient of ``z_k`` when the pass reaches node ``k`` (β-CROWN's
    split multipliers); ``record[k]`` receives the coefficient of each nonlinear node's output
    (branching scores).  With ``rows``, row ``r`` of the coefficients belongs to point ``rows[r]``
    of ``bounds`` and ``inset``.  ``linear=True`` returns ``(a, const)``, the coefficient of the
    input and the constant, instead of concretizing."""
    relax, extra = relax or {}, extra or {}
    coeffs = dict(start)
    first = next(iter(start.values()))
    const = first.new_zeros(first.shape[:2]) if const is None else const
    for k in range(max(start), 0, -1):
        a = coeffs.pop(k, None)
        if k in extra:
            a = extra[k] if a is None else a + extra[k]
        if a is None:
            continue
        node = net.nodes[k]
        op = node.op
        if op.affine:
            const = const + op.bias_term(a)
            pulled = op.back_all(a)
        else:
            if record is not None:
                record[k] = a
            if isinstance(op, ReLUOp):
                a, c = relu_back(a, *bounds[k], relax.get(k), rows)
            else:
                a, c = maxpool_back(a, *bounds[k], op, relax.get(k), rows)
            const, pulled = const + c, [a]
        for i, ai in zip(node.inputs, pulled, strict=True):
            coeffs[i] = ai if i not in coeffs else coeffs[i] + ai
    a = coeffs.pop(0)
    if linear:
        return a, const
    return const + (inset if rows is None else inset.take(rows)).linear_min(a)


def affine_region(net: Network, k: int) -> tuple[list[int], list[int]]:
    """The affine nodes ``z_k`` is computed from without passing a nonlinear node (``k``
    included when affine), in topological order, and the frontier where they start: nonlinear
    nodes and the input.  They do not depend on the point."""
    region, frontier, stack = set(), set(), [k]
    while stack:
        j = stack.pop()
        if j in region or j in frontier:
            continue
        if j == 0 or not net.nodes[j].op.affine:
            frontier.add(j)
        else:
            region.add(j)
            stack.extend(net.nodes[j].inputs)
    return sorted(region), sorted(frontier)


def back_region(net: Network, region: list[int], start: dict[int, Tensor], const: Tensor) -> tuple[dict, Tensor]:
    """Back-substitute coefficients through the affine ``region`` (no relaxation needed): the
    coefficients of its frontier and the constant."""
    coeffs = dict(start)
    for j in reversed(region):
        a = coeffs.pop(j, None)
        if a is None:
            continue
        node = net.nodes[j]
        const = const + node.op.bias_term(a)
        for i, ai in zip(node.inputs, node.op.back_all(a), strict=True):
            coeffs[i] = ai if i not in coeffs else coeffs[i] + ai
    return coeffs, const


def _needs_crown(net: Network, k: int, inset: InputSet) -> bool:
    """Whether back-substitution can beat the interval at the input of nonlinear node ``k``: not
    when only elementwise maps follow the previous nonlinearity, nor for one affine map of a
    ball that is a box (Linf: the interval is the exact image)."""
    region, frontier = affine_region(net, net.nodes[k].inputs[0])
    if any(net.nodes[j].op.arity > 1 for j in region):
        return True
    mixing = sum(not net.nodes[j].op.exact_interval for j in region)
    after_input = frontier == [0]
    return mixing >= 2 or (mixing == 1 and (not after_input or not inset.norm.geometry.ball_is_box))


def _crown_refine(net: Network, k: int, lo: Tensor, hi: Tensor, mask: Tensor, bounds: dict, inset: InputSet):
    """Tighten ``lo ≤ z ≤ hi`` at the input ``z`` of nonlinear node ``k`` on the neurons in ``mask`` by CROWN.

    Works on the flat list of (point, neuron) pairs, in chunks, so points with few such neurons
    cost little.  The affine nodes right before ``z`` do not depend on the point, so their
    back-substitution is done once per distinct neuron of a chunk and gathered per pair."""
    shape = lo.shape[1:]
    pts, idx = mask.flatten(1).nonzero(as_tuple=True)
    if pts.numel() == 0:
        return lo, hi
    p = net.nodes[k].inputs[0]
    region, _ = affine_region(net, p)
    width = max(math.prod(net.nodes[j].shape) for j in range(k + 1))
    chunk = max(1, SPEC_BUDGET // (2 * width))
    lo_f, hi_f = lo.flatten(1), hi.flatten(1)
    for first in range(0, pts.numel(), chunk):
        pp, n = pts[first : first + chunk], idx[first : first + chunk]
        uniq, inv = torch.unique(n, return_inverse=True)
        rows = lo.new_zeros(1, uniq.numel(), lo_f.shape[1])
        rows[0, torch.arange(uniq.numel(), device=lo.device), uniq] = 1.0
        coeffs, const = back_region(net, region, {p: rows.reshape(1, uniq.numel(), *shape)}, rows.new_zeros(1, uniq.numel()))
        start = {j: torch.cat([a[0][inv][:, None], -a[0][inv][:, None]], 1) for j, a in coeffs.items()}
        c = const[0][inv][:, None]  # [P, 1]
        bound = backward(net, start, bounds, inset, const=torch.cat([c, -c], 1), rows=pp)
        lo_f = lo_f.index_put((pp, n), torch.maximum(lo_f[pp, n], bound[:, 0]))
        hi_f = hi_f.index_put((pp, n), torch.minimum(hi_f[pp, n], -bound[:, 1]))
    lo_f = torch.minimum(lo_f, hi_f)  # float noise can cross them; the true value lies between
    return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)


def layer_bounds(net: Network, inset: InputSet, method: str = "ibp") -> tuple[dict, list[tuple[Tensor, Tensor]]]:
    """Bounds of the input of every nonlinear node, and the intervals of the output node's inputs.

    ``method="ibp"``: interval propagation (Gowal et al. 2018).  ``"crown"``: node by node, each
    nonlinear node's input is bounded by CROWN back-substitution (only the unstable neurons of a
    ReLU need it; a max-pool needs all) and intersected with the interval, which is also sound.
    """
    intervals: dict[int, tuple[Tensor, Tensor]] = {0: (inset.lo, inset.hi)}
    left = [len(c) for c in net.consumers]
    bounds: dict[int, tuple[Tensor, Tensor]] = {}
    for k in range(1, len(net.nodes)):
        node = net.nodes[k]
        op = node.op
        if not op.affine:
            p = node.inputs[0]
            lo, hi = intervals[p]
            if method == "crown" and _needs_crown(net, k, inset):
                mask = (lo < 0) & (hi > 0) if isinstance(op, ReLUOp) else torch.ones_like(lo, dtype=torch.bool)
                lo, hi = _crown_refine(net, k, lo, hi, mask, bounds, inset)
                intervals[p] = (lo, hi)
            bounds[k] = (lo, hi)
        ins = [intervals[i] for i in node.inputs]
        if k == net.output:
            return bounds, ins
        intervals[k] = op.interval_of(ins)
        for i in node.inputs:
            left[i] -= 1
            if left[i] == 0:
                del intervals[i]
    raise AssertionError("unreachable: the output is the last node")


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``C[b, c] = e_y − e_c``: ``[B, K, K]`` (the row ``c = y`` is zero)."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[None]


def ibp_margins(net: Network, last_in: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    """IBP lower bounds of ``f_y − f_c`` with the margin matrix folded into the last affine op,
    concretized over the interval at its input (tighter than subtracting logit intervals)."""
    spec = margin_spec(y, net.num_classes, last_in[0][0].dtype)
    last = net.nodes[-1].op
    if last.affine and last.arity == 1:
        return last.bias_term(spec) + box_lower(last.back(spec), *last_in[0])
    lo, hi = last.interval_of(last_in)
    return lo.gather(1, y[:, None]) - hi


def crown_margins(net: Network, bounds: dict, inset: InputSet, y: Tensor, relax: dict | None = None) -> Tensor:
    """CROWN lower bounds ``[B, K]`` of ``f_y − f_c`` (0 at ``c = y``): one backward pass started
    from the ``K − 1`` rows ``e_y − e_c``, ``c ≠ y``, of the margin matrix."""
    others = other_classes(y, net.num_classes)
    eye = torch.eye(net.num_classes, dtype=inset.x.dtype, device=y.device)
    lower = backward(net, {net.output: eye[y][:, None, :] - eye[others]}, bounds, inset, relax)
    return lower.new_zeros(y.shape[0], net.num_classes).scatter(1, others, lower)


def other_classes(y: Tensor, num_classes: int) -> Tensor:
    """``[B, K − 1]``: the classes other than ``y``, in increasing order."""
    base = torch.arange(num_classes - 1, device=y.device)[None]
    return base + (base >= y[:, None]).long()


def logit_interval(net: Network, inset: InputSet) -> tuple[Tensor, Tensor]:
    """IBP interval of the logits (what interval libraries such as ART report)."""
    _, last_in = layer_bounds(net, inset, "ibp")
    return net.nodes[-1].op.interval_of(last_in)
