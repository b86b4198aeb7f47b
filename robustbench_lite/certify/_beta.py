"""β-CROWN bounds of a batch of subdomains of one point, and the branching heuristics (BaBSR
scores, relaxation-gap scores, FSB).

A subdomain fixes some of the point's unstable ReLUs (unstable under the root's intermediate
bounds) active (``z ≥ 0``) or inactive (``z ≤ 0``).  Its bound (Wang et al., "Beta-CROWN:
efficient bound propagation with per-neuron split constraints for neural network robustness
verification", NeurIPS 2021, Theorem 3.1) is CROWN's backward bound with

* the split neurons' intermediate bounds clamped to the split (``l ← max(l, 0)`` or
  ``u ← min(u, 0)``), which makes their relaxation exact;
* the split constraints ``g_j(x) ≤ 0`` (``g = −z`` active, ``g = z`` inactive) added to the
  objective with Lagrange multipliers ``β_j ≥ 0``: at the pre-activation ``z`` the backward
  coefficient gains ``β_j s_j`` (``s_j = −1`` active, ``+1`` inactive).  On the subdomain
  ``g ≤ 0``, so ``f ≥ f + Σ β_j g_j`` ≥ the relaxed linear bound, for every ``β ≥ 0``;
* the lower ReLU slopes ``α ∈ [0, 1]`` of the still unstable neurons as variables (α-CROWN).

``α`` and ``β`` are per subdomain (the subdomain's one specification), optimised together by
projected gradient ascent (Adam, clipping to ``[0, 1]`` and ``[0, ∞)``); every iterate is sound
and the best bound per subdomain is kept.  All subdomains of a batch are tensors with a leading
subdomain dimension: one backward pass bounds them all.  The intermediate bounds stay those of
the root (the split neurons clamped), which keeps a subdomain's bound a single backward pass.

Storage is compact: a subdomain holds one value per unstable neuron of the point (its split
sign, α, β), scattered into dense per-layer tensors for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._bounds import InputSet, affine_region, backward, relu_lower_slope
from ._graph import Network
from ._layers import ReLUOp


@dataclass
class Layout:
    """One point's root: the intermediate bounds of every nonlinear node (``[1, *shape]``) and,
    per ReLU with unstable neurons, their flat positions and their slice of the compact vector."""

    net: Network
    inset: InputSet  # the point's input set (batch 1)
    bounds: dict[int, tuple[Tensor, Tensor]]
    relus: list[int]  # ReLU nodes with unstable neurons
    index: list[Tensor]  # their flat positions
    offsets: list[int]  # start of each in the compact vector; offsets[-1] = size

    @classmethod
    def make(cls, net: Network, inset: InputSet, bounds: dict) -> Layout:
        relus, index, offsets = [], [], [0]
        for k, (lo, hi) in bounds.items():
            if isinstance(net.nodes[k].op, ReLUOp):
                idx = ((lo < 0) & (hi > 0)).flatten().nonzero()[:, 0]
                if idx.numel():
                    relus.append(k)
                    index.append(idx)
                    offsets.append(offsets[-1] + idx.numel())
        return cls(net, inset, bounds, relus, index, offsets)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def cast(self, dtype: torch.dtype) -> Layout:
        """The same root with its bounds and input set in ``dtype`` (cached): the optimisation
        may iterate in float32, the bounds returned are computed in float64."""
        if dtype == self.inset.x.dtype:
            return self
        cache = self.__dict__.setdefault("_casts", {})
        if dtype not in cache:
            i = self.inset
            inset = InputSet(i.x.to(dtype), i.norm, i.eps.to(dtype), i.lo.to(dtype), i.hi.to(dtype))
            bounds = {k: (lo.to(dtype), hi.to(dtype)) for k, (lo, hi) in self.bounds.items()}
            cache[dtype] = Layout(self.net, inset, bounds, self.relus, self.index, self.offsets)
        return cache[dtype]

    def compact(self, dense: dict[int, Tensor]) -> Tensor:
        """``[N, U]``: the unstable neurons' entries of per-ReLU tensors ``[N, *shape]``."""
        parts = [dense[k].flatten(1)[:, idx] for k, idx in zip(self.relus, self.index, strict=True)]
        return torch.cat(parts, 1) if parts else self.inset.x.new_zeros(1, 0)

    def root_alpha(self) -> Tensor:
        """``[1, U]``: CROWN's adaptive lower slopes, the start of α."""
        return self.compact({k: relu_lower_slope(*self.bounds[k]) for k in self.relus})

    def root_interval(self) -> tuple[Tensor, Tensor]:
        """``([U], [U])``: the root bounds of the unstable neurons' inputs."""
        lo = self.compact({k: self.bounds[k][0] for k in self.relus})[0]
        hi = self.compact({k: self.bounds[k][1] for k in self.relus})[0]
        return lo, hi

    def preact_bias(self) -> Tensor:
        """``[U]``: each unstable neuron's input with every earlier nonlinear output and the
        input set to 0, the "bias" BaBSR scores with (for a Linear/Conv before it: its bias)."""
        dense = {}
        for k in self.relus:
            p = self.net.nodes[k].inputs[0]
            region, frontier = affine_region(self.net, p)
            values = {j: self.inset.x.new_zeros(1, *self.net.nodes[j].shape) for j in frontier}
            for j in region:
                node = self.net.nodes[j]
                values[j] = node.op.forward(*[values[i] for i in node.inputs])
            dense[k] = values[p]
        return self.compact(dense)[0]


def split_bounds(layout: Layout, signs: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Per-subdomain intermediate bounds ``[N, *shape]``: the root's with each split neuron clamped."""
    n = signs.shape[0]
    out = {k: (lo.expand(n, *lo.shape[1:]), hi.expand(n, *hi.shape[1:])) for k, (lo, hi) in layout.bounds.items()}
    for i, (k, idx) in enumerate(zip(layout.relus, layout.index, strict=True)):
        lo, hi = layout.bounds[k]
        s = signs[:, layout.offsets[i] : layout.offsets[i + 1]]
        lo_f, hi_f = lo.flatten(1).expand(n, -1).clone(), hi.flatten(1).expand(n, -1).clone()
        lo_f[:, idx] = torch.where(s > 0, lo_f[:, idx].clamp(min=0), lo_f[:, idx])
        hi_f[:, idx] = torch.where(s < 0, hi_f[:, idx].clamp(max=0), hi_f[:, idx])
        out[k] = (lo_f.reshape(n, *lo.shape[1:]), hi_f.reshape(n, *hi.shape[1:]))
    return out


def _scatter(layout: Layout, i: int, values: Tensor) -> Tensor:
    """Compact values of ReLU ``i`` (``[N, U_i]``) into a dense ``[N, 1, *shape]`` (zeros elsewhere)."""
    k, idx = layout.relus[i], layout.index[i]
    shape = layout.bounds[k][0].shape[1:]
    n = values.shape[0]
    dense = values.new_zeros(n, shape.numel()).scatter(1, idx.expand(n, -1), values)
    return dense.reshape(n, 1, *shape)


def domain_bounds(
    layout: Layout, spec: Tensor, signs: Tensor, alpha: Tensor, beta: Tensor | None, record: dict | None = None,
    node: int | None = None,
) -> tuple[Tensor, Tensor]:
    """β-CROWN lower bounds ``[N]`` of ``spec[n] · logits`` over each subdomain (``spec``:
    ``[N, K]``; ``signs``, ``alpha``, ``beta``: ``[N, U]``), and the input coefficients ``[N, *x]``
    (whose box minimiser is the bound's worst input).  ``record`` receives the coefficient of each
    nonlinear node's output (for branching).  ``node``: bound ``spec[n] · z_node`` instead of the
    logits (``spec``: ``[N, *shape(z_node)]``; intermediate bounds)."""
    net, n = layout.net, signs.shape[0]
    bounds = split_bounds(layout, signs)
    relax, extra = {}, {}
    for i, k in enumerate(layout.relus):
        sl = slice(layout.offsets[i], layout.offsets[i + 1])
        relax[k] = _scatter(layout, i, alpha[:, sl])
        if beta is not None:
            p = net.nodes[k].inputs[0]
            term = _scatter(layout, i, beta[:, sl] * -signs[:, sl].to(beta.dtype))
            extra[p] = term if p not in extra else extra[p] + term
    inset = layout.inset.take(torch.zeros(n, dtype=torch.long, device=signs.device))
    start = net.output if node is None else node
    a, const = backward(net, {start: spec[:, None]}, bounds, inset, relax, extra=extra, record=record, linear=True)
    return (const + inset.linear_min(a))[:, 0], a[:, 0]


def optimize(
    layout: Layout, spec: Tensor, signs: Tensor, alpha: Tensor, beta: Tensor, steps: int,
    lr_alpha: float, lr_beta: float, use_beta: bool = True, dtype: torch.dtype = torch.float64,
    node: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
    """Projected gradient ascent on ``α`` and ``β`` of a batch of subdomains (Adam directions,
    Kingma & Ba 2015, with their default moments), iterating in ``dtype``; the iterate with the
    best bound per subdomain is then bounded once more in float64 (what is returned, so the
    bound is sound whatever ``dtype``): ``(bound [N], α, β, input coefficients [N, *x] and the
    nonlinear-output coefficients of that pass)``."""
    work = layout.cast(dtype)
    alpha, beta = alpha.detach().to(dtype).clone(), beta.detach().to(dtype).clone()
    best_a, best_b = alpha.clone(), beta.clone()
    params = [(alpha, lr_alpha, 1.0)] + ([(beta, lr_beta, float("inf"))] if use_beta else [])
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p, _, _ in params]
    best = None
    spec_w = spec.to(dtype)
    for it in range(steps):
        with torch.enable_grad():
            for p, _, _ in params:
                p.requires_grad_(True)
            bound, _ = domain_bounds(work, spec_w, signs, alpha, beta if use_beta else None, node=node)
            grads = torch.autograd.grad(bound.sum(), [p for p, _, _ in params])
        with torch.no_grad():
            bound = bound.detach()
            better = bound > best if best is not None else torch.ones_like(bound, dtype=torch.bool)
            best = bound if best is None else torch.maximum(best, bound)
            best_a[better], best_b[better] = alpha[better], beta[better]
            for (p, lr, top), (m, v), g in zip(params, moments, grads, strict=True):
                p.requires_grad_(False)
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                step = lr * (m / (1 - 0.9 ** (it + 1))) / ((v / (1 - 0.999 ** (it + 1))).sqrt() + 1e-8)
                p.add_(step).clamp_(0.0, top)  # ascent, then the projection onto [0, 1] or [0, inf)
    if steps:  # the last step's result was not bounded yet
        with torch.no_grad():
            bound, _ = domain_bounds(work, spec_w, signs, alpha, beta if use_beta else None, node=node)
            better = bound > best
            best_a[better], best_b[better] = alpha[better], beta[better]
    best_a, best_b = best_a.to(layout.inset.x.dtype), best_b.to(layout.inset.x.dtype)
    if not use_beta:
        best_b = torch.zeros_like(best_a)
    record: dict = {}
    with torch.no_grad():
        bound, a_in = domain_bounds(layout, spec, signs, best_a, best_b if use_beta else None, record, node)
    return bound, best_a, best_b, a_in, record


def gap_scores(layout: Layout, record: dict, signs: Tensor, alpha: Tensor, worst: Tensor) -> Tensor:
    """``[N, U]``: how much each unsplit unstable neuron's relaxation costs the bound at the
    bound's own optimum.  A backward bound with fixed relaxations equals the network with each
    unstable ReLU replaced by its chosen line (the lower line ``αz`` where the output's
    coefficient ``λ ≥ 0``, the upper line ``u(z − l)/(u − l)`` where ``λ < 0``), evaluated at the
    input that minimises it (``worst``).  A forward pass of that relaxed network gives each
    neuron's input ``ẑ``; the neuron costs ``−λ·(line(ẑ) − relu(ẑ)) ≥ 0`` there, and splitting it
    removes that slack (the primal view of the relaxation gap that BaBSR estimates from the
    bias alone)."""
    net, n = layout.net, signs.shape[0]
    bounds = split_bounds(layout, signs)
    pos = {k: i for i, k in enumerate(layout.relus)}
    gaps: dict[int, Tensor] = {}

    def relaxed(k: int, z: Tensor) -> Tensor:
        out = torch.relu(z)
        if k not in pos:
            return out
        i = pos[k]
        lo, hi = bounds[k]
        lam = record[k][:, 0]
        a = _scatter(layout, i, alpha[:, layout.offsets[i] : layout.offsets[i + 1]].to(z.dtype))[:, 0]
        unstable = (lo < 0) & (hi > 0)
        width = torch.where(unstable, hi - lo, torch.ones_like(hi))
        line = torch.where(lam >= 0, a * z, hi * (z - lo) / width)
        line = torch.where(unstable, line, out)
        gaps[k] = -lam * (line - out)
        return line

    values: dict[int, Tensor] = {0: worst.to(layout.inset.x.dtype)}
    for k in range(1, len(net.nodes)):
        node = net.nodes[k]
        args = [values[i] for i in node.inputs]
        values[k] = relaxed(k, args[0]) if isinstance(node.op, ReLUOp) else node.op.forward(*args)
    score = layout.compact(gaps) if gaps else signs.new_zeros(n, 0, dtype=worst.dtype)
    return torch.where(signs == 0, score, torch.full_like(score, float("-inf")))


def fsb(layout: Layout, spec: Tensor, signs: Tensor, alpha: Tensor, beta: Tensor, scores: list[Tensor], k: int,
        use_beta: bool = True, dtype: torch.dtype = torch.float64) -> Tensor:
    """Filtered smart branching (De Palma, Bunel, Desmaison, Dvijotham, Kohli, Torr & Kumar,
    "Improved branch and bound for neural network verification via Lagrangian decomposition",
    2021): the ``k`` best neurons of each subdomain by each of the filter ``scores`` (``[N, U]``,
    ``-inf`` where split), then the one whose two children have the best worse bound, each child
    bounded by one pass with the parent's α and β (no optimisation).  Returns ``[N]`` (``-1``:
    nothing left to split)."""
    n = signs.shape[0]
    free = signs == 0
    k = min(k, signs.shape[1])
    if k == 0:
        return torch.full((n,), -1, dtype=torch.long, device=signs.device)
    cand = torch.cat([s.masked_fill(~free, float("-inf")).topk(k, dim=1).indices for s in scores], 1)  # [N, k·F]
    m = cand.shape[1]
    valid = free.gather(1, cand)
    rows = torch.arange(n, device=signs.device).repeat_interleave(2 * m)
    pick = cand.repeat_interleave(2, dim=1).reshape(-1)
    child = signs[rows].clone()
    phase = torch.tensor([1, -1], dtype=signs.dtype, device=signs.device).repeat(n * m)
    child[torch.arange(rows.numel(), device=signs.device), pick] = phase
    work = layout.cast(dtype)
    with torch.no_grad():
        bound, _ = domain_bounds(work, spec[rows].to(dtype), child, alpha[rows].to(dtype),
                                 beta[rows].to(dtype) if use_beta else None)
    worse = bound.reshape(n, m, 2).amin(2).masked_fill(~valid, float("-inf"))
    choice = cand.gather(1, worse.argmax(1, keepdim=True))[:, 0]
    return torch.where(free.any(1), choice, torch.full_like(choice, -1))


def babsr(layout: Layout, record: dict, signs: Tensor, bias: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``[N, U]``: each unstable neuron's branching score (``-inf`` once split), by BaBSR
    (Bunel, Lu, Turkaslan, Torr, Kohli & Kumar, "Branch and bound for piecewise linear neural
    network verification", JMLR 2020, Sec. 5.1): with ``λ`` the bound's coefficient of the ReLU's
    output, ``s = u/(u − l)``, ``t = −s·l`` the upper relaxation and ``b`` the pre-activation's
    bias, the estimated change of the bound from splitting is
    ``|max(bλ(s − 1), bλs) + min(λ, 0)·t|`` (the bias term and the intercept the split removes)."""
    lam = layout.compact({k: record[k][:, 0] for k in layout.relus})  # [N, U]
    s = hi / (hi - lo)
    t = -s * lo
    score = (torch.maximum(bias * lam * (s - 1), bias * lam * s) + lam.clamp(max=0) * t).abs()
    return torch.where(signs == 0, score, torch.full_like(score, float("-inf"))).expand(signs.shape[0], -1)

