"""Square Attack: score-based black-box random search (Andriushchenko, Croce, Flammarion, Hein,
ECCV 2020, "Square Attack: a query-efficient black-box adversarial attack via random search").

Random search on the margin loss ``L(x) = Z_y(x) − max_{k≠y} Z_k(x)`` (the paper's untargeted
loss, eq. 2; minimized, success when it is negative).  Each iteration changes one random square
window of side ``s = round(sqrt(p · h · w))`` and keeps the change only if the loss went down.
No gradient is ever taken: the model is only queried for scores.

* Linf (Algorithm 2): init with vertical stripes ``x + eps · (±1 per channel and column)``; a
  candidate sets every pixel of the window to ``x ± eps`` (one random sign per channel).
* L2 (Algorithm 3): init with a grid of "meta-patterns" (nested squares of weight
  ``Σ 1/(k+1)²``, eq. 5) with random signs, scaled to norm eps; a candidate moves the mass of a
  second window ``W2`` into ``W1`` (``W2`` zeroed, ``W1`` = old direction + a two-halves
  pattern ``±η``, rescaled per channel so the total norm becomes eps), then clips to [0, 1].
* ``p`` schedule (§3 / appendix): start at ``p_init`` and halve it at iterations
  10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10,000-query budget, rescaled to
  ``queries`` (iteration ``i`` is read as ``10000 · i / queries``); ``rescale_schedule=False``
  reads the halving points as they are, whatever the budget (AutoAttack's standard version:
  5000 queries, so ``p`` is halved at 10, 50, ..., 4000).

As in the paper, a Linf proposal that would leave the image unchanged (the window already
holds those values) is redrawn before it is queried (up to 10 times).  Points already
misclassified are not queried again (as in the authors' code).  ``queries`` counts model
queries per point, the initial one included.

Scoring a Linf proposal: a proposal changes one window, and most of the search runs with windows
of 1-4 pixels (the ``p`` schedule), so on a convolutional ``nn.Sequential`` (e.g. small-cnn) each
query recomputes only the boxes of the feature maps its window can change
(:class:`~robustbench_lite.attacks._incremental.BoxScorer`) while that is cheaper than a full pass;
the logits are the full pass's up to float rounding.  An accepted proposal moves the scorer's
base image on with a full pass, so the loss a point keeps is always the full pass's.  Other
models, and L2 (two windows per step), are queried with full passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from robustbench_lite import EvasionAttack, Norm, ops, register_attack, setting
from robustbench_lite.core.attack import count_forwards, network_of

from ._incremental import window_scorer

HALVING_AT = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # iterations of a 10,000 budget
SCHEDULE_BUDGET = 10000


def p_schedule(p_init: float, it: int, queries: int) -> float:
    """The fraction of pixels changed at iteration ``it``: ``p_init / 2^k``, ``k`` the number
    of the paper's halving points passed, the 10,000-query schedule rescaled to ``queries``."""
    scaled = int(it / queries * SCHEDULE_BUDGET)
    return p_init / 2 ** sum(scaled > t for t in HALVING_AT)


def square_side(p: float, h: int, w: int, minimum: int = 1) -> int:
    """Window side ``round(sqrt(p · h · w))``, at least ``minimum`` and at most ``min(h, w) − 1``."""
    return max(minimum, min(round(math.sqrt(p * h * w)), min(h, w) - 1))


def nested_squares(a: int, b: int, device=None, dtype=torch.float32) -> Tensor:
    """``a × b`` pattern of concentric rectangles (paper eq. 5): a pixel at Chebyshev ring
    ``d`` from the centre weighs ``Σ_{j=d+1}^{n+1} 1/j²`` (``n`` the outermost ring)."""
    r = (torch.arange(a, device=device) - a // 2).abs()
    c = (torch.arange(b, device=device) - b // 2).abs()
    ring = torch.maximum(r[:, None], c[None, :])
    n = int(ring.max())
    inv_sq = 1.0 / torch.arange(1, n + 2, device=device, dtype=dtype) ** 2
    tail = inv_sq.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{j=d+1}^{n+1} 1/j²
    return tail[ring]


def two_halves(s: int, device=None, dtype=torch.float32, transpose: bool = False) -> Tensor:
    """The L2 update pattern: ``+η`` on the top half and ``−η`` on the bottom half of an
    ``s × s`` window, unit L2 norm (optionally transposed)."""
    top = nested_squares(s // 2, s, device, dtype)
    bottom = -nested_squares(s - s // 2, s, device, dtype)
    pat = torch.cat([top, bottom], dim=0)
    pat = pat / pat.norm()
    return pat.t() if transpose else pat


def window_mask(corner_r: Tensor, corner_c: Tensor, s: int, h: int, w: int) -> Tensor:
    """Bool ``[B, 1, h, w]``: the ``s × s`` window at each point's corner."""
    rows = torch.arange(h, device=corner_r.device)
    cols = torch.arange(w, device=corner_c.device)
    in_r = (rows[None, :] >= corner_r[:, None]) & (rows[None, :] < corner_r[:, None] + s)
    in_c = (cols[None, :] >= corner_c[:, None]) & (cols[None, :] < corner_c[:, None] + s)
    return (in_r[:, :, None] & in_c[:, None, :])[:, None]


def _randint(high: int, n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, high, (n,), generator=gen, device=gen.device)


def _signs(shape: tuple[int, ...], gen: torch.Generator, dtype) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=gen.device).to(dtype) * 2 - 1


# per norm: the methods that start the search and propose one candidate per point
_SEARCH = {Norm.LINF: ("_linf_init", "_linf_proposal"), Norm.L2: ("_l2_init", "_l2_step")}
# score a window incrementally while it can change at most this share of the last feature map
# (beyond it, a full pass costs about as much)
INCREMENTAL_SHARE = 0.6


@dataclass(frozen=True)
class Window:
    """A Linf proposal: per point, the ``side x side`` window at ``(rows, cols)`` gets ``values``
    ``[n, C, side, side]``; the rest of the image stays."""

    rows: Tensor
    cols: Tensor
    side: int
    values: Tensor

    def paste(self, x_best: Tensor) -> Tensor:
        """The candidate images: ``x_best`` [n, C, H, W] with the windows written in."""
        return _paste(x_best, self.values, self.rows, self.cols, self.side)

    def subset(self, keep: Tensor) -> Window:
        return Window(self.rows[keep], self.cols[keep], self.side, self.values[keep])


@register_attack("square")
@dataclass(frozen=True, kw_only=True)
class Square(EvasionAttack):
    """Black-box random search over square windows (Linf and L2); uses only model scores."""

    needs_grad: ClassVar[bool] = False
    randomized: ClassVar[bool] = True
    queries: int = setting(1000, low=2)
    p_init: float = setting(0.05, low=0.0, high=1.0, low_open=True)
    rescale_schedule: bool = setting(True, keep_keys=True)
    incremental: ClassVar[bool] = True  # score Linf windows incrementally where the network allows

    @property
    def grad_budget(self) -> float:
        # no gradients; a query is about a third of a forward+backward pass, and the harness
        # orders attacks by this number (cheapest first)
        return self.queries / 3.0

    def _perturb(self, model, x, y, target, gen):
        init, propose = (getattr(self, name) for name in _SEARCH[self.norm])
        x_best = init(x, gen)
        scorer = window_scorer(network_of(model), x_best) if self.incremental and self.norm is Norm.LINF else None
        loss = ops.margin(model(x_best), y)
        _, c, h, w = x.shape
        for it in range(1, self.queries):
            todo = (loss > 0).nonzero().flatten()
            if todo.numel() == 0:
                break
            xs, xb = x[todo], x_best[todo]
            p = p_schedule(self.p_init, it, self.queries if self.rescale_schedule else SCHEDULE_BUDGET)
            cand = propose(xs, xb, p, gen)
            if isinstance(cand, Window) and scorer is not None and scorer.final_box_share(cand.side) <= INCREMENTAL_SHARE:
                logits = scorer.window_logits(todo, cand.rows, cand.cols, cand.values.permute(0, 2, 3, 1))
                count_forwards(model, todo.numel())
            else:
                cand = cand.paste(xb) if isinstance(cand, Window) else cand
                logits = model(cand)
            new = ops.margin(logits, y[todo])
            better = new < loss[todo]
            keep = todo[better]
            x_best[keep] = cand.subset(better).paste(xb[better]) if isinstance(cand, Window) else cand[better]
            if scorer is None:
                loss[keep] = new[better]
            elif keep.numel():  # the scorer's bases move on; the loss kept is the full pass's
                loss[keep] = ops.margin(scorer.rebase(keep, x_best[keep]), y[keep])
        return x_best

    # -- initialisation --------------------------------------------------------------------------
    def _linf_init(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Vertical stripes: ``x + ε·(±1 per channel and column)``."""
        b, c, h, w = x.shape
        stripes = _signs((b, c, 1, w), gen, x.dtype).to(x.device)
        return (x + self.eps * stripes).clamp(0.0, 1.0)

    def _l2_init(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """A grid of nested-square meta-patterns with random signs, scaled to norm ``ε``."""
        b, c, h, w = x.shape
        tile = max(3, min(h, w) // 5)
        delta = torch.zeros_like(x)
        for r in range(0, h, tile):
            for q in range(0, w, tile):
                th, tw = min(tile, h - r), min(tile, w - q)
                pat = nested_squares(th, tw, x.device, x.dtype)
                sign = _signs((b, c, 1, 1), gen, x.dtype).to(x.device)
                delta[:, :, r : r + th, q : q + tw] = sign * pat
        delta = delta * (self.eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
        return (x + delta).clamp(0.0, 1.0)

    # -- one candidate per point -----------------------------------------------------------------
    def _linf_proposal(self, x: Tensor, x_best: Tensor, p: float, gen: torch.Generator) -> Window:
        """A Linf step, redrawn (up to 10 times) where it would change nothing and waste a query.

        The draws are made in rounds of several per point at once, on the windows only; each
        point takes its first draw that changes the image, so the proposal has the distribution
        of drawing one at a time until one does."""
        b, c, h, w = x.shape
        s = square_side(p, h, w)
        dev = x.device
        rows_out = torch.zeros(b, dtype=torch.long, device=dev)
        cols_out = torch.zeros(b, dtype=torch.long, device=dev)
        values_out = torch.empty(b, c, s, s, dtype=x.dtype, device=dev)
        todo = torch.arange(b, device=dev)
        for draws in (4, 6):  # 10 draws at most, as in the paper's code
            n = todo.numel()
            rows = _randint(h - s + 1, n * draws, gen).to(dev)
            cols = _randint(w - s + 1, n * draws, gen).to(dev)
            signs = _signs((draws, n, c, 1, 1), gen, x.dtype).to(dev)
            point = todo.repeat(draws)  # draw-major, as rows and cols
            values = (_crop(x[point], rows, cols, s).view(draws, n, c, s, s) + self.eps * signs).clamp(0.0, 1.0)
            old = _crop(x_best[point], rows, cols, s).view(draws, n, c, s, s)
            moved = (values - old).flatten(2).abs().amax(dim=2) >= 1e-7  # [draws, n]
            found = moved.any(0)
            first = torch.where(found, moved.float().argmax(0), draws - 1)
            pick = first * n + torch.arange(n, device=dev)
            rows_out[todo], cols_out[todo] = rows[pick], cols[pick]
            values_out[todo] = values.view(draws * n, c, s, s)[pick]
            todo = todo[~found]
            if todo.numel() == 0:
                break
        return Window(rows_out, cols_out, s, values_out)

    def _l2_step(self, x: Tensor, x_best: Tensor, p: float, gen: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        s = square_side(p, h, w, minimum=3)
        if s % 2 == 0:  # odd sides keep the nested pattern centred (as in the paper's code)
            s = s - 1 if s + 1 > min(h, w) - 1 else s + 1
        dev = x.device
        r1, c1 = _randint(h - s + 1, b, gen).to(dev), _randint(w - s + 1, b, gen).to(dev)
        r2, c2 = _randint(h - s + 1, b, gen).to(dev), _randint(w - s + 1, b, gen).to(dev)
        w1, w2 = window_mask(r1, c1, s, h, w), window_mask(r2, c2, s, h, w)
        delta = x_best - x
        both = (w1 | w2).to(x.dtype)
        mass = (delta * both).flatten(2).norm(dim=2)  # [b, c]: norm moved per channel
        total = delta.flatten(1).norm(dim=1)  # [b]
        slack = (self.eps**2 - total**2).clamp_min(0.0) / c  # spare budget per channel
        target_norm = (mass**2 + slack[:, None]).sqrt()  # [b, c]
        # new content of W1: old direction there (normalized) + a random ±η two-halves pattern
        transpose = bool(torch.randint(0, 2, (1,), generator=gen, device=gen.device))
        pat = two_halves(s, dev, x.dtype, transpose)
        old = _crop(delta, r1, c1, s)  # [b, c, s, s]
        old = old / old.flatten(2).norm(dim=2).clamp_min(1e-12)[:, :, None, None]
        new = old + _signs((b, c, 1, 1), gen, x.dtype).to(dev) * pat
        new = new * (target_norm / new.flatten(2).norm(dim=2).clamp_min(1e-12))[:, :, None, None]
        delta = delta * (1 - both)  # W1 and W2 emptied
        delta = _paste(delta, new, r1, c1, s)
        return self.geometry.project(x + delta, x, self.eps)


def _crop(t: Tensor, r: Tensor, c: Tensor, s: int) -> Tensor:
    """Per point, the ``s × s`` window of ``t`` at ``(r, c)``: ``[B, C, s, s]``."""
    b = t.shape[0]
    ar = torch.arange(s, device=t.device)
    rows = (r[:, None] + ar)[:, None, :, None].expand(b, t.shape[1], s, t.shape[3])
    band = t.gather(2, rows)  # [B, C, s, W]
    cols = (c[:, None] + ar)[:, None, None, :].expand(b, t.shape[1], s, s)
    return band.gather(3, cols)


def _paste(t: Tensor, win: Tensor, r: Tensor, c: Tensor, s: int) -> Tensor:
    """``t`` with each point's ``s × s`` window at ``(r, c)`` replaced by ``win``."""
    out = t.clone()
    b, ch = t.shape[:2]
    ar = torch.arange(s, device=t.device)
    rows = (r[:, None] + ar)[:, None, :, None].expand(b, ch, s, s)
    cols = (c[:, None] + ar)[:, None, None, :].expand(b, ch, s, s)
    bi = torch.arange(b, device=t.device)[:, None, None, None].expand(b, ch, s, s)
    ci = torch.arange(ch, device=t.device)[None, :, None, None].expand(b, ch, s, s)
    out[bi, ci, rows, cols] = win
    return out
