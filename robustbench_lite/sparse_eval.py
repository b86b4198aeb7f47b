"""Exact incremental evaluation of one-pixel candidates on convolutional ``nn.Sequential`` models.

Changing one input pixel changes a conv net's feature maps only inside that pixel's receptive
field: with "same"-padded stride-1 convolutions, element-wise layers and non-overlapping pooling,
the changed region of each map is a small box around the pixel (for the small-cnn on 28x28
images: at most 3x3 of the final 7x7 map).  :class:`WindowScorer` therefore computes, per
candidate, only a fixed-size window of the spatial part of the network (the box, aligned to the
pooling grid, plus the receptive-field margin), pastes it into the clean image's final feature
map and runs the remaining (dense) layers in full.  The logits equal ``model(x')`` up to float
rounding (the window holds every input the changed outputs depend on; positions outside the
image are zeroed at each stage, exactly as the layers' zero padding sees them).

Supported prefix: ``Conv2d`` (stride 1, dilation 1, odd kernel, padding ``k // 2``, zero padding),
``MaxPool2d``/``AvgPool2d`` with kernel = stride and no padding, and element-wise modules
(activations, eval-mode ``BatchNorm2d``, ``Dropout``, per-channel ``Normalize``).  The prefix ends at
the first other module (e.g. ``Flatten``); :func:`window_scorer` returns ``None`` when a model has
no such prefix, and callers then run the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import Normalize

_ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
    nn.BatchNorm2d, Normalize,
)


# non-decreasing element-wise maps: max(f(a), f(b)) = f(max(a, b))
_MONOTONE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class _Layer:
    module: nn.Module
    kind: str  # "conv" | "pool" | "elem"
    k: int = 1  # kernel (conv) or kernel = stride (pool)


def _as_int(v: object) -> int | None:
    if isinstance(v, int):
        return v
    if isinstance(v, tuple) and len(set(v)) == 1 and isinstance(v[0], int):
        return v[0]
    return None


def _classify(m: nn.Module) -> _Layer | None:
    if isinstance(m, nn.Conv2d):
        k = _as_int(m.kernel_size)
        ok = (k is not None and k % 2 == 1 and _as_int(m.stride) == 1 and _as_int(m.dilation) == 1
              and _as_int(m.padding) == k // 2 and m.padding_mode == "zeros")
        return _Layer(m, "conv", k) if ok else None
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k = _as_int(m.kernel_size)
        stride = _as_int(m.stride) if m.stride is not None else k
        ok = (k is not None and stride == k and _as_int(m.padding) == 0 and not m.ceil_mode
              and (not isinstance(m, nn.MaxPool2d) or _as_int(m.dilation) == 1))
        return _Layer(m, "pool", k) if ok else None
    if isinstance(m, _ELEMENTWISE):
        return _Layer(m, "elem")
    return None


def _affected(pos: int, size: int, layers: list[_Layer]) -> tuple[int, int, int]:
    """First and last index, along one axis, of the final map that a change at ``pos`` can reach
    (and the final map's size)."""
    lo = hi = pos
    for layer in layers:
        if layer.kind == "conv":
            lo, hi = max(lo - layer.k // 2, 0), min(hi + layer.k // 2, size - 1)
        elif layer.kind == "pool":
            lo, hi, size = lo // layer.k, hi // layer.k, size // layer.k
    return lo, hi, size


class WindowScorer:
    """Logits of one-pixel variants of a batch of images, computed window by window."""

    def __init__(self, model: nn.Sequential, layers: list[_Layer], x: Tensor) -> None:
        _, _, h, w = x.shape
        self.layers = layers
        self.rest = model[len(layers):]
        self.x = x
        with torch.no_grad():
            feats = x
            for layer in layers:
                feats = layer.module(feats)
        self.base = feats  # [B, C_L, H_L, W_L]
        self.axes = [self._plan(h), self._plan(w)]
        # a monotone activation right before a max pool commutes with it: pool first (4x less work)
        self.order = list(enumerate(layers))
        for j in range(len(self.order) - 1):
            (_, a), (_, b) = self.order[j], self.order[j + 1]
            if isinstance(a.module, _MONOTONE) and isinstance(b.module, nn.MaxPool2d) and b.kind == "pool":
                self.order[j], self.order[j + 1] = self.order[j + 1], self.order[j]
        # Flatten then Linear after the prefix: keep the clean pre-activation and the weight as a map
        self.head: tuple[nn.Linear, nn.Module] | None = None
        if len(self.rest) >= 2 and isinstance(self.rest[0], nn.Flatten) and isinstance(self.rest[1], nn.Linear):
            linear = self.rest[1]
            with torch.no_grad():
                self.base_pre = linear(feats.flatten(1))
            self.weight4 = linear.weight.view(linear.out_features, *feats.shape[1:])
            self.head = (linear, self.rest[2:])
            self._weights: dict[int, Tensor] = {}

    def _plan(self, size: int) -> dict[str, object]:
        """Per axis: the final window length, its start for every input position, and per stage
        the window's (multiplier, offset, length, map size) relative to that start."""
        spans = [_affected(p, size, self.layers) for p in range(size)]
        final = spans[0][2]
        length = min(max(hi - lo + 1 for lo, hi, _ in spans), final)
        start = torch.tensor([min(lo, final - length) for lo, _, _ in spans])
        sizes = [size]  # the map size after each layer
        for layer in self.layers:
            sizes.append(sizes[-1] // layer.k if layer.kind == "pool" else sizes[-1])
        stages = [(1, 0, length, sizes[-1])]  # stage L, then backwards to the input
        mult, off, n = 1, 0, length
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if layer.kind == "pool":
                mult, off, n = mult * layer.k, off * layer.k, n * layer.k
            elif layer.kind == "conv":
                off, n = off - layer.k // 2, n + layer.k - 1
            stages.append((mult, off, n, sizes[i]))
        return {"start": start, "stages": stages[::-1]}  # stages[0]: the input, stages[l + 1]: after layer l

    def logits(self, img: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
        """Logits of ``x[img]`` with pixel ``(rows, cols)`` set to ``values`` [N, C]; all [N]."""
        dev = self.x.device
        ar, ac = self.axes
        a_r, a_c = ar["start"].to(dev)[rows], ac["start"].to(dev)[cols]

        def window(stage: int) -> tuple[Tensor, Tensor, int, int]:
            (mr, orr, nr, hs), (mc, oc, nc, ws) = ar["stages"][stage], ac["stages"][stage]
            r_idx = (mr * a_r + orr).view(-1, 1) + torch.arange(nr, device=dev)  # [N, nr] map rows
            c_idx = (mc * a_c + oc).view(-1, 1) + torch.arange(nc, device=dev)
            return r_idx, c_idx, hs, ws

        r_idx, c_idx, h, w = window(0)
        win = self.x[img.view(-1, 1, 1), :, r_idx.clamp(0, h - 1)[:, :, None], c_idx.clamp(0, w - 1)[:, None, :]]
        win = win.permute(0, 3, 1, 2).contiguous()  # [N, C, nr, nc]
        n = torch.arange(len(img), device=dev)
        win[n, :, rows - r_idx[:, 0], cols - c_idx[:, 0]] = values
        for i, layer in self.order:
            if layer.kind == "conv":  # zero where the window sticks out of the map: the conv's padding
                r_idx, c_idx, hs, ws = window(i)
                win = win * self._mask(r_idx, c_idx, hs, ws)
                conv = layer.module
                win = F.conv2d(win, conv.weight, conv.bias, groups=conv.groups)
            elif layer.kind == "pool" and isinstance(layer.module, nn.MaxPool2d):
                win = _max_pool(win, layer.k)
            elif isinstance(layer.module, nn.ReLU):
                win = win.clamp_(min=0)  # our own tensor: in place
            else:
                win = layer.module(win)
        r_idx, c_idx, _, _ = window(len(self.layers))
        if self.head is not None:  # Flatten + Linear: add the window's change to the clean pre-activation
            return self._head_logits(img, win, a_r, a_c)
        feats = self.base[img].clone()
        feats[n.view(-1, 1, 1), :, r_idx[:, :, None], c_idx[:, None, :]] = win.permute(0, 2, 3, 1)
        return self.rest(feats)

    def _head_logits(self, img: Tensor, win: Tensor, a_r: Tensor, a_c: Tensor) -> Tensor:
        linear, after = self.head
        nr, nc = win.shape[2:]
        pre = self.base_pre[img].clone()
        key = a_r * self.base.shape[3] + a_c
        for k in torch.unique(key).tolist():  # one small matmul per window position
            sel = (key == k).nonzero().flatten()
            r0, c0 = divmod(k, self.base.shape[3])
            if k not in self._weights:  # the head's weight rows of this window, [window features, out]
                w4 = self.weight4[:, :, r0 : r0 + nr, c0 : c0 + nc]
                self._weights[k] = w4.reshape(w4.shape[0], -1).t().contiguous()
            base_win = self.base[img[sel], :, r0 : r0 + nr, c0 : c0 + nc]
            pre[sel] += (win[sel] - base_win).flatten(1) @ self._weights[k]
        return after(pre)

    @staticmethod
    def _mask(r_idx: Tensor, c_idx: Tensor, h: int, w: int) -> Tensor:
        """1 inside the map, 0 where the window sticks out (the layers' zero padding)."""
        mr = (r_idx >= 0) & (r_idx < h)
        mc = (c_idx >= 0) & (c_idx < w)
        return (mr[:, :, None] & mc[:, None, :]).unsqueeze(1).to(torch.float32)


def _max_pool(x: Tensor, k: int) -> Tensor:
    """Max pooling with kernel = stride ``k`` (floor mode) as a max of k² strided views: the same
    values as ``F.max_pool2d`` and much faster on CPU (no argmax indices)."""
    h, w = (x.shape[2] // k) * k, (x.shape[3] // k) * k
    out = x[:, :, 0:h:k, 0:w:k].clone()
    for i in range(k):
        for j in range(k):
            if i or j:
                torch.maximum(out, x[:, :, i:h:k, j:w:k], out=out)
    return out


def window_scorer(model: nn.Module, x: Tensor) -> WindowScorer | None:
    """A :class:`WindowScorer` for ``model`` on images ``x`` [B, C, H, W], or ``None`` when the
    model is not an ``nn.Sequential`` starting with a supported spatial prefix that has a conv or
    pooling layer (then evaluate candidates with the whole model)."""
    if not isinstance(model, nn.Sequential) or x.dim() != 4:
        return None
    layers: list[_Layer] = []
    for m in model:
        layer = _classify(m)
        if layer is None:
            break
        layers.append(layer)
    if not any(layer.kind in ("conv", "pool") for layer in layers) or len(layers) == len(model):
        return None
    if any(isinstance(layer.module, nn.BatchNorm2d) and layer.module.training for layer in layers):
        return None
    return WindowScorer(model, layers, x)
