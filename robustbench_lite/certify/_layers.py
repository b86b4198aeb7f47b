"""The operations the bound propagators understand, each with its forward map, interval image
and (for affine maps) transpose.

Every affine operation offers its forward map, its interval image (centre/radius form, exact
for one affine map over a box) and its transpose (``back``) with the bias term, which is what
backward linear bound propagation (CROWN) needs.  Weights are cast to the dtype of the tensors
they meet, so one parsed network serves float32 training and float64 verification, and
gradients reach the parameters.  :mod:`._parse` maps ``nn.Module`` layers to these operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.models import Normalize


class Op:
    """One operation of the flattened network; ``in_shape``/``out_shape`` exclude the batch."""

    affine = False
    exact_interval = False  # an interval through it is the exact image (elementwise maps)

    def __init__(self, module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        self.module, self.in_shape, self.out_shape = module, in_shape, out_shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_shape} -> {self.out_shape})"

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


class Affine(Op):
    """``z ↦ L z + b``; subclasses give ``L``, its transpose and ``b``."""

    affine = True

    def interval(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        c, r = self.forward(mid), self.abs_linear(rad)
        return c - r, c + r

    def abs_linear(self, r: Tensor) -> Tensor:  # |L| r
        raise NotImplementedError

    def back(self, a: Tensor) -> Tensor:  # [B, S, *out] -> [B, S, *in]: rows of A times L
        raise NotImplementedError

    def bias_term(self, a: Tensor) -> Tensor:  # [B, S]: A b
        raise NotImplementedError


class LinearOp(Affine):
    def _w(self, t: Tensor) -> Tensor:
        return self.module.weight.to(t.dtype)

    def forward(self, x: Tensor) -> Tensor:
        b = self.module.bias
        return F.linear(x, self._w(x), None if b is None else b.to(x.dtype))

    def abs_linear(self, r: Tensor) -> Tensor:
        return F.linear(r, self._w(r).abs())

    def back(self, a: Tensor) -> Tensor:
        return a @ self._w(a)

    def bias_term(self, a: Tensor) -> Tensor:
        b = self.module.bias
        return a.new_zeros(a.shape[:2]) if b is None else a @ b.to(a.dtype)


class ConvOp(Affine):
    """``Conv2d`` with zero padding, or ``AvgPool2d`` as a depthwise convolution (``weight`` given)."""

    def __init__(self, module, in_shape, out_shape, weight: Tensor | None = None, conv: dict | None = None):
        super().__init__(module, in_shape, out_shape)
        self._fixed = weight
        if conv is None:
            pad = (0, 0) if module.padding == "valid" else _pair(module.padding)
            conv = {"stride": _pair(module.stride), "padding": pad, "dilation": _pair(module.dilation),
                    "groups": module.groups}
        self.conv = conv
        k = (weight if weight is not None else module.weight).shape[-2:]
        d, s, p = _pair(conv["dilation"]), _pair(conv["stride"]), _pair(conv["padding"])
        self.out_pad = tuple(
            in_shape[1 + i] - ((out_shape[1 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1) for i in range(2)
        )

    def _w(self, t: Tensor) -> Tensor:
        return (self._fixed if self._fixed is not None else self.module.weight).to(device=t.device, dtype=t.dtype)

    def _b(self, t: Tensor) -> Tensor | None:
        b = None if self._fixed is not None else self.module.bias
        return None if b is None else b.to(t.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self._w(x), self._b(x), **self.conv)

    def abs_linear(self, r: Tensor) -> Tensor:
        return F.conv2d(r, self._w(r).abs(), None, **self.conv)

    def back(self, a: Tensor) -> Tensor:
        b, s = a.shape[:2]
        flat, cv = a.reshape(b * s, *self.out_shape), self.conv
        if a.dtype == torch.float64:  # the input-gradient kernel: about twice as fast as float64 conv_transpose2d on CPU
            shape = a.new_empty(1).expand(b * s, *self.in_shape)  # only its shape is read
            out = torch.ops.aten.convolution_backward(
                flat, shape, self._w(a), None, cv["stride"], cv["padding"], cv["dilation"], False, (0, 0),
                cv["groups"], (True, False, False),
            )[0]
        else:
            out = F.conv_transpose2d(flat, self._w(a), None, stride=cv["stride"], padding=cv["padding"],
                                     output_padding=self.out_pad, groups=cv["groups"], dilation=cv["dilation"])
        return out.reshape(b, s, *self.in_shape)

    def bias_term(self, a: Tensor) -> Tensor:
        bias = self._b(a)
        return a.new_zeros(a.shape[:2]) if bias is None else (a.sum(dim=(-2, -1)) * bias).sum(-1)


class ChannelAffineOp(Affine):
    """``x · scale_c + shift_c`` per channel: ``Normalize`` and ``BatchNorm2d`` in eval mode."""

    exact_interval = True

    def _scale_shift(self, t: Tensor) -> tuple[Tensor, Tensor]:
        m = self.module
        if isinstance(m, Normalize):
            scale = 1.0 / m.std.to(t.dtype).reshape(-1)
            shift = -m.mean.to(t.dtype).reshape(-1) * scale
        else:  # BatchNorm2d, eval mode: running statistics
            inv = 1.0 / torch.sqrt(m.running_var.to(t.dtype) + m.eps)
            scale = inv if m.weight is None else m.weight.to(t.dtype) * inv
            shift = -m.running_mean.to(t.dtype) * scale
            if m.bias is not None:
                shift = shift + m.bias.to(t.dtype)
        c = self.in_shape[0]
        return scale.expand(c).reshape(c, 1, 1), shift.expand(c).reshape(c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._scale_shift(x)
        return x * scale + shift

    def abs_linear(self, r: Tensor) -> Tensor:
        return r * self._scale_shift(r)[0].abs()

    def back(self, a: Tensor) -> Tensor:
        return a * self._scale_shift(a)[0]

    def bias_term(self, a: Tensor) -> Tensor:
        return (a * self._scale_shift(a)[1]).flatten(2).sum(-1)


class ReshapeOp(Affine):
    exact_interval = True

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def interval(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(lo), self.forward(hi)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self.forward(r)

    def back(self, a: Tensor) -> Tensor:
        return a.reshape(*a.shape[:2], *self.in_shape)

    def bias_term(self, a: Tensor) -> Tensor:
        return a.new_zeros(a.shape[:2])


class ReLUOp(Op):
    exact_interval = True

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def interval(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return torch.relu(lo), torch.relu(hi)


class MaxPoolOp(Op):
    """``MaxPool2d``; ``windows`` holds, per output position, the flat input positions it reads
    (one channel's ``H·W`` grid), shape ``[Ho·Wo, k·k]``."""

    def __init__(self, module, in_shape, out_shape):
        super().__init__(module, in_shape, out_shape)
        k, s = _pair(module.kernel_size), _pair(module.stride if module.stride is not None else module.kernel_size)
        self.kernel, self.stride = k, s
        grid = torch.arange(in_shape[1] * in_shape[2], dtype=torch.float64).reshape(1, 1, *in_shape[1:])
        self.windows = F.unfold(grid, k, stride=s)[0].T.round().long()  # [L, K]

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride)

    def interval(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(lo), self.forward(hi)  # max is monotone: the exact interval image

    def unfold(self, t: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, L, K]``: the values each window sees."""
        flat = t.flatten(2)
        return flat[:, :, self.windows.to(t.device)]


@dataclass
class Network:
    """The parsed operations; ``ops[-1]`` is usually the last ``Linear`` (where the margin
    matrix is folded in)."""

    ops: list[Op]
    input_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return int(math.prod(self.ops[-1].out_shape))

    def forward(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op.forward(x)
        return x


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
