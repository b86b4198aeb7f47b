"""One-pixel attack (Su, Vargas, Sakurai, "One pixel attack for fooling deep neural networks",
IEEE TEVC 2019), batched across images.

Threat: L0 with ``eps = k`` pixels (k in {1, 3, 5} in the paper).  A candidate is ``k`` tuples
``(row, col, value per channel)``.  Differential evolution DE/rand/1 (paper §III-B, eq. 2):
``child_i = p_r1 + F (p_r2 − p_r3)`` with distinct random ``r1, r2, r3``, ``F = 0.5``, no
crossover; a child replaces its parent if it is fitter.  Fitness: the true-class probability
(untargeted, minimized).  Population 400, up to 100 generations, early stop per image as soon as
one candidate is misclassified.  Initialization as in the paper: coordinates uniform, values
``N(0.5, 0.5)`` on the [0, 1] scale (the paper's ``N(128, 127)`` on 0-255), clipped.

Batched design: the population is one tensor ``[B, NP, D]``; candidates are rendered by an index
scatter and the whole batch is evaluated in one forward pass per generation (chunked by
``chunk`` images); images that succeeded drop out (done mask).  For k = 1 on a convolutional
``nn.Sequential`` (e.g. small-cnn), ``incremental=True`` evaluates each candidate exactly but
recomputes only the boxes of the feature maps its pixel can change (:mod:`robustbench_lite.attacks._incremental`,
``window_chunk`` candidates at a time); each image's winning candidate is confirmed by a full
forward pass before the image stops.  ``forward_evals`` counts one evaluation per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustbench_lite import EvasionAttack, Norm, register_attack, setting
from robustbench_lite.core.attack import count_forwards, network_of

from ._incremental import BoxScorer, window_scorer


def render(x: Tensor, cand: Tensor) -> Tensor:
    """Images ``x`` [B, C, H, W] with candidates ``cand`` [B, P, k·(2 + C)] stamped: [B·P, C, H, W]."""
    b, c, h, w = x.shape
    p = cand.shape[1]
    pix = cand.view(b, p, -1, 2 + c)
    rows = pix[..., 0].long().clamp_(0, h - 1)
    cols = pix[..., 1].long().clamp_(0, w - 1)
    pos = (rows * w + cols).view(b * p, 1, -1).expand(-1, c, -1)  # [BP, C, k]
    vals = pix[..., 2:].reshape(b * p, -1, c).transpose(1, 2)  # [BP, C, k]
    imgs = x.unsqueeze(1).expand(b, p, c, h, w).reshape(b * p, c, h * w).clone()
    imgs.scatter_(2, pos, vals)
    return imgs.view(b * p, c, h, w)


def distinct_triplets(b: int, n: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """For every member of ``b`` populations of size ``n``: three distinct member indices [b, n, 3]
    (uniform over ordered distinct triplets: draw from n, n - 1, n - 2 values and skip the ones taken)."""
    u = torch.rand(3, b, n, generator=gen, device=gen.device).to(device)
    r1 = (u[0] * n).long().clamp_(max=n - 1)
    r2 = (u[1] * (n - 1)).long().clamp_(max=n - 2)
    r2 += r2 >= r1
    r3 = (u[2] * (n - 2)).long().clamp_(max=n - 3)
    lo, hi = torch.minimum(r1, r2), torch.maximum(r1, r2)
    r3 += r3 >= lo
    r3 += r3 >= hi
    return torch.stack([r1, r2, r3], 2)


@register_attack("one-pixel")
@dataclass(frozen=True, kw_only=True)
class OnePixel(EvasionAttack):
    """Untargeted k-pixel attack by differential evolution; ``eps`` is ``k``."""

    norm: Norm = Norm.L0
    eps: float = 1.0
    population: int = setting(400, low=4)
    generations: int = setting(100, low=0)
    mutation: float = setting(0.5, low=0.0, low_open=True)
    chunk: int = setting(128, low=1)
    incremental: bool = setting(True)
    window_chunk: int = setting(1024, low=1)

    norms = (Norm.L0,)
    cell_kind = "sparse"  # reported by success rate and queries
    needs_grad = False
    randomized = True

    @property
    def grad_budget(self) -> float:
        return 0.0

    def _fitness(self, model, x: Tensor, y: Tensor, cand: Tensor, scorer: BoxScorer | None = None,
                 index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """True-class probability and misclassification flag per candidate, both [B, P]."""
        b, p = cand.shape[:2]
        if scorer is None:
            imgs = render(x, cand)
            logits = torch.cat([model(imgs[i : i + self.chunk]) for i in range(0, len(imgs), self.chunk)])
        else:  # k = 1: evaluate the pixel's window only; x, y are the whole batch, index the images
            c, h, w = x.shape[1:]
            flat = cand.reshape(b * p, 2 + c)
            img = index.view(b, 1).expand(b, p).reshape(-1)
            rows, cols = flat[:, 0].long().clamp(0, h - 1), flat[:, 1].long().clamp(0, w - 1)
            step = self.window_chunk
            logits = torch.cat([scorer.logits(img[i : i + step], rows[i : i + step], cols[i : i + step], flat[i : i + step, 2:])
                                for i in range(0, b * p, step)])
            count_forwards(model, b * p)
            y = y[index]
        prob = logits.softmax(1).view(b, p, -1)
        labels = y.view(b, 1, 1).expand(b, p, 1)
        return prob.gather(2, labels).squeeze(2), logits.argmax(1).view(b, p) != y.view(b, 1)

    def _perturb(self, model, x, y, target, gen):
        b, c, h, w = x.shape
        k, n = int(self.eps), self.population
        dev = x.device
        lows = torch.zeros(2 + c, device=dev)
        highs = torch.tensor([h - 1e-3, w - 1e-3] + [1.0] * c, device=dev)
        scorer = window_scorer(network_of(model), x) if self.incremental and k == 1 else None

        def rand(shape):
            return torch.rand(shape, generator=gen, device=gen.device).to(dev)

        def randn(shape):
            return torch.randn(shape, generator=gen, device=gen.device).to(dev)

        def fitness(active, cand):
            if scorer is None:
                return self._fitness(model, x[active], y[active], cand)
            return self._fitness(model, x, y, cand, scorer, active)

        pop = torch.cat([rand((b, n, k, 1)) * h, rand((b, n, k, 1)) * w, (0.5 + 0.5 * randn((b, n, k, c))).clamp(0, 1)], 3)
        pop = pop.view(b, n, -1)
        out = x.clone()
        active = torch.arange(b, device=dev)
        fit, won = fitness(active, pop)
        for g in range(self.generations + 1):
            done = won.any(1)
            if done.any():  # early stop: keep the first successful candidate of each image
                first = won[done].float().argmax(1)
                win = pop[done].gather(1, first.view(-1, 1, 1).expand(-1, 1, pop.shape[2]))
                adv = render(x[active[done]], win)
                if scorer is not None:  # confirm with a full forward pass (float rounding at the boundary)
                    ok = model(adv).argmax(1) != y[active[done]]
                    won[done.nonzero().flatten()[~ok]] = False
                    adv, done = adv[ok], won.any(1)
                out[active[done]] = adv
                keep = ~done
                active, pop, fit = active[keep], pop[keep], fit[keep]
            if active.numel() == 0 or g == self.generations:
                break
            tri = distinct_triplets(len(active), n, gen, dev)
            pick = [pop.gather(1, tri[..., j : j + 1].expand(-1, -1, pop.shape[2])) for j in range(3)]
            child = pick[0] + self.mutation * (pick[1] - pick[2])
            child = torch.max(torch.min(child.view(len(active), n, k, 2 + c), highs), lows).view_as(pop)
            cfit, won = fitness(active, child)
            better = (cfit < fit) | won  # a misclassified child always replaces its parent
            pop = torch.where(better.unsqueeze(2), child, pop)
            fit = torch.where(better, cfit, fit)
        return out
