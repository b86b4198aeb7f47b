"""The operations the bound propagators understand, each with its forward map, interval image
and (for affine maps) transpose.

Every affine operation offers its forward map, its interval image (centre/radius form, exact
for one affine map over a box) and its transpose (``back``) with the bias term, which is what
backward linear bound propagation (CROWN) needs.  Weights are cast to the dtype of the tensors
they meet, so one parsed network serves float32 training and float64 verification, and
gradients reach the parameters.  :mod:`._graph` maps a traced model to these operations.

Batch normalization is a per-channel affine map: in eval mode its running statistics; folded
into the convolution or linear map before it when that map feeds nothing else
(``W' = s·W``, ``b' = s·b + t``); in train mode (certified training) the statistics of the clean
batch, bound by :meth:`~._graph.Network.use_batch_statistics` (Shi et al., "Fast certified
robust training with short warmup", NeurIPS 2021, compute them from the clean inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.models import Normalize

Pair = tuple[Tensor, Tensor]


class Op:
    """One operation of the network graph; ``in_shape``/``out_shape`` exclude the batch
    (``in_shape``: the first input's)."""

    affine = False
    exact_interval = False  # an interval through it is the exact image (elementwise maps)
    arity = 1

    def __init__(self, module: nn.Module | None, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        self.module, self.in_shape, self.out_shape = module, in_shape, out_shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_shape} -> {self.out_shape})"

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def interval(self, lo: Tensor, hi: Tensor) -> Pair:
        raise NotImplementedError

    def interval_of(self, inputs: Sequence[Pair]) -> Pair:
        """The interval image from the intervals of every input (unary ops: the one)."""
        return self.interval(*inputs[0])


class Affine(Op):
    """``z ↦ L z + b``; subclasses give ``L``, its transpose and ``b``."""

    affine = True

    def interval(self, lo: Tensor, hi: Tensor) -> Pair:
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        c, r = self.forward(mid), self.abs_linear(rad)
        return c - r, c + r

    def abs_linear(self, r: Tensor) -> Tensor:  # |L| r
        raise NotImplementedError

    def back(self, a: Tensor) -> Tensor:  # [B, S, *out] -> [B, S, *in]: rows of A times L
        raise NotImplementedError

    def back_all(self, a: Tensor) -> list[Tensor]:
        """``a`` pulled back to every input (unary maps: one)."""
        return [self.back(a)]

    def bias_term(self, a: Tensor) -> Tensor:  # [B, S]: A b
        raise NotImplementedError


class ChannelAffine:
    """``x · scale_c + shift_c`` per channel of ``Normalize`` or ``BatchNorm1d/2d`` (see the
    module docstring for the statistics a batch norm uses)."""

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self.module, self.name = module, name
        self.batch_stats: Pair | None = None

    def scale_shift(self, t: Tensor) -> Pair:
        m = self.module
        if isinstance(m, Normalize):
            scale = 1.0 / m.std.to(t.dtype).reshape(-1)
            return scale, -m.mean.to(t.dtype).reshape(-1) * scale
        if m.training:
            if self.batch_stats is None:
                raise ValueError(f"{type(m).__name__} {self.name!r} is in train mode: certify the model in eval mode "
                                 "(model.eval()), or bind a clean batch's statistics first (Network.use_batch_statistics)")
            mean, var = (s.to(t.dtype) for s in self.batch_stats)
        else:
            mean, var = m.running_mean.to(t.dtype), m.running_var.to(t.dtype)
        inv = 1.0 / torch.sqrt(var + m.eps)
        scale = inv if m.weight is None else m.weight.to(t.dtype) * inv
        shift = -mean * scale
        return scale, shift if m.bias is None else shift + m.bias.to(t.dtype)


def folded_bias(bias: Tensor | None, bn: ChannelAffine | None, t: Tensor) -> Tensor | None:
    """A layer's bias in ``t``'s dtype with the batch norm after it (``bn``) folded in:
    ``bias · scale + shift`` (``shift`` alone without a bias; ``None`` without either)."""
    b = None if bias is None else bias.to(t.dtype)
    if bn is None:
        return b
    scale, shift = bn.scale_shift(t)
    return shift if b is None else b * scale + shift


class LinearOp(Affine):
    """``Linear``, with a ``BatchNorm1d`` after it folded in (``bn``)."""

    def __init__(self, module, in_shape, out_shape, bn: ChannelAffine | None = None):
        super().__init__(module, in_shape, out_shape)
        self.bn = bn

    def _w(self, t: Tensor) -> Tensor:
        w = self.module.weight.to(t.dtype)
        return w if self.bn is None else w * self.bn.scale_shift(t)[0][:, None]

    def _b(self, t: Tensor) -> Tensor | None:
        return folded_bias(self.module.bias, self.bn, t)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._w(x), self._b(x))

    def abs_linear(self, r: Tensor) -> Tensor:
        return F.linear(r, self._w(r).abs())

    def back(self, a: Tensor) -> Tensor:
        return a @ self._w(a)

    def bias_term(self, a: Tensor) -> Tensor:
        b = self._b(a)
        return a.new_zeros(a.shape[:2]) if b is None else a @ b


class ConvOp(Affine):
    """``Conv2d`` with zero padding (a ``BatchNorm2d`` after it folded in: ``bn``), or average
    pooling as a depthwise convolution (``weight`` given)."""

    def __init__(self, module, in_shape, out_shape, weight: Tensor | None = None, conv: dict | None = None,
                 bn: ChannelAffine | None = None):
        super().__init__(module, in_shape, out_shape)
        self._fixed, self.bn = weight, bn
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
        w = (self._fixed if self._fixed is not None else self.module.weight).to(device=t.device, dtype=t.dtype)
        return w if self.bn is None else w * self.bn.scale_shift(t)[0][:, None, None, None]

    def _b(self, t: Tensor) -> Tensor | None:
        return folded_bias(None if self._fixed is not None else self.module.bias, self.bn, t)

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
    """``x · scale_c + shift_c`` per channel: ``Normalize``, and a batch norm not folded."""

    exact_interval = True

    def __init__(self, module, in_shape, out_shape, name: str = ""):
        super().__init__(module, in_shape, out_shape)
        self.channel = ChannelAffine(module, name)

    def _scale_shift(self, t: Tensor) -> Pair:
        scale, shift = self.channel.scale_shift(t)
        c, rest = self.in_shape[0], (1,) * (len(self.in_shape) - 1)
        return scale.expand(c).reshape(c, *rest), shift.expand(c).reshape(c, *rest)

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
    """Any reshape that keeps the batch (``Flatten``, ``view``, ``reshape``)."""

    exact_interval = True

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def interval(self, lo: Tensor, hi: Tensor) -> Pair:
        return self.forward(lo), self.forward(hi)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self.forward(r)

    def back(self, a: Tensor) -> Tensor:
        return a.reshape(*a.shape[:2], *self.in_shape)

    def bias_term(self, a: Tensor) -> Tensor:
        return a.new_zeros(a.shape[:2])


class AddOp(Affine):
    """``z₁ + z₂`` of two tensors of one shape (residual shortcuts)."""

    arity = 2

    def forward(self, x: Tensor, other: Tensor) -> Tensor:  # type: ignore[override]
        return x + other

    def interval_of(self, inputs: Sequence[Pair]) -> Pair:
        (lo1, hi1), (lo2, hi2) = inputs
        return lo1 + lo2, hi1 + hi2

    def back_all(self, a: Tensor) -> list[Tensor]:
        return [a, a]

    def bias_term(self, a: Tensor) -> Tensor:
        return a.new_zeros(a.shape[:2])


class ReLUOp(Op):
    exact_interval = True

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def interval(self, lo: Tensor, hi: Tensor) -> Pair:
        return torch.relu(lo), torch.relu(hi)


class MaxPoolOp(Op):
    """``MaxPool2d``; ``windows`` holds, per output position, the flat input positions it reads
    (one channel's ``H·W`` grid), shape ``[Ho·Wo, k·k]``."""

    def __init__(self, module, in_shape, out_shape, kernel=None, stride=None):
        super().__init__(module, in_shape, out_shape)
        kernel = module.kernel_size if kernel is None else kernel
        stride = (module.stride if module.stride is not None else kernel) if stride is None else stride
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        grid = torch.arange(in_shape[1] * in_shape[2], dtype=torch.float64).reshape(1, 1, *in_shape[1:])
        self.windows = F.unfold(grid, self.kernel, stride=self.stride)[0].T.round().long()  # [L, K]

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride)

    def interval(self, lo: Tensor, hi: Tensor) -> Pair:
        return self.forward(lo), self.forward(hi)  # max is monotone: the exact interval image

    def unfold(self, t: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, L, K]``: the values each window sees."""
        flat = t.flatten(2)
        return flat[:, :, self.windows.to(t.device)]


def avg_pool_op(module, in_shape, out_shape, kernel, stride, padding) -> ConvOp:
    """Average pooling (count_include_pad) as a depthwise convolution with weights ``1/(k·k)``."""
    k, c = _pair(kernel), in_shape[0]
    weight = torch.full((c, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
    return ConvOp(module, in_shape, out_shape, weight=weight,
                  conv={"stride": _pair(stride), "padding": _pair(padding), "dilation": (1, 1), "groups": c})


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
