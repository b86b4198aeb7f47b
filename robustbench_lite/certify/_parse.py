"""A model as a flat sequence of :mod:`._layers` operations.

:func:`parse_network` flattens nested ``nn.Sequential`` containers and maps each module to one
operation:

* affine: ``Linear``, ``Conv2d`` (any stride, padding, dilation, groups; zero padding),
  ``AvgPool2d`` (as a depthwise convolution), the project's ``Normalize`` and ``BatchNorm2d`` in
  eval mode (per-channel affine maps), ``Flatten`` (a reshape);
* nonlinear: ``ReLU`` and ``MaxPool2d`` (no padding, no dilation, floor mode);
* dropped: ``Identity`` and ``Dropout`` in eval mode.

Anything else raises ``ValueError`` naming the layer, the supported layers and the zoo models
that parse.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.models import Normalize
from ._layers import (
    ChannelAffineOp,
    ConvOp,
    LinearOp,
    MaxPoolOp,
    Network,
    Op,
    ReLUOp,
    ReshapeOp,
    _pair,
)

SUPPORTED = (
    "Linear, Conv2d (zero padding), ReLU, MaxPool2d (no padding/dilation, floor mode), AvgPool2d "
    "(floor mode), Flatten, Normalize, BatchNorm2d (eval mode), Identity, Dropout (eval mode), nested "
    "nn.Sequential"
)


class UnsupportedLayer(ValueError):
    """A layer no verifier can bound; :func:`parse_network` adds the lists of what is supported."""


def unsupported(what: str) -> UnsupportedLayer:
    return UnsupportedLayer(f"cannot bound {what}")


def supported_zoo() -> list[str]:
    """The zoo models (registry names) that parse into supported layers on a 1x28x28 input."""
    from ..core.models import create_model
    from ..core.registry import list_models

    names = []
    for name in list_models():
        try:
            _parse(create_model(name, (1, 28, 28), 10).eval(), torch.zeros(1, 1, 28, 28))
        except (ValueError, RuntimeError, TypeError):
            continue
        names.append(name)
    return names


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _convert(m: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Op | None:
    if isinstance(m, nn.Linear):
        if len(in_shape) != 1:
            raise unsupported(f"Linear on a {len(in_shape)}-d input (flatten first)")
        return LinearOp(m, in_shape, out_shape)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            raise unsupported(f"Conv2d with padding {m.padding!r} / padding_mode {m.padding_mode!r}")
        return ConvOp(m, in_shape, out_shape)
    if isinstance(m, nn.ReLU):
        return ReLUOp(m, in_shape, out_shape)
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
            raise unsupported("MaxPool2d with padding, dilation, ceil_mode or return_indices")
        return MaxPoolOp(m, in_shape, out_shape)
    if isinstance(m, nn.AvgPool2d):
        pad = _pair(m.padding)
        if m.ceil_mode or m.divisor_override is not None or (pad != (0, 0) and not m.count_include_pad):
            raise unsupported("AvgPool2d with ceil_mode, divisor_override or count_include_pad=False")
        k = _pair(m.kernel_size)
        c = in_shape[0]
        weight = torch.full((c, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
        stride = m.stride if m.stride is not None else m.kernel_size
        return ConvOp(m, in_shape, out_shape, weight=weight,
                      conv={"stride": _pair(stride), "padding": pad, "dilation": (1, 1), "groups": c})
    if isinstance(m, (Normalize, nn.BatchNorm2d)):
        if isinstance(m, nn.BatchNorm2d) and (m.training or m.running_mean is None):
            raise unsupported("BatchNorm2d in train mode or without running statistics (certify in eval mode)")
        return ChannelAffineOp(m, in_shape, out_shape)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise unsupported(f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})")
        return ReshapeOp(m, in_shape, out_shape)
    if isinstance(m, nn.Identity) or isinstance(m, nn.Dropout) and not m.training:
        return None
    raise unsupported(f"layer {type(m).__name__} ({m!r})")


def parse_network(model: nn.Module, example: Tensor) -> Network:
    """Flatten ``model`` into supported operations, recording shapes by running ``example``
    (one or more inputs) through it.  The caller chooses the mode (the verifiers use eval).
    An unsupported layer raises ``ValueError`` naming it, the supported layers and the zoo
    models that are supported."""
    try:
        return _parse(model, example)
    except UnsupportedLayer as exc:
        raise ValueError(
            f"{exc}; supported layers: {SUPPORTED}. Zoo models that are supported: "
            f"{', '.join(supported_zoo())}. Express the model as an nn.Sequential of these layers."
        ) from None


def _parse(model: nn.Module, example: Tensor) -> Network:
    leaves = _leaves(model)
    ops: list[Op] = []
    dtype = next((p.dtype for p in model.parameters()), example.dtype)
    x = example[:1].to(dtype)  # shapes only: run it in the model's own dtype
    with torch.no_grad():
        for m in leaves:
            out = m(x)
            op = _convert(m, tuple(x.shape[1:]), tuple(out.shape[1:]))
            if op is not None:
                ops.append(op)
            x = out
    if not ops:
        raise unsupported("an empty model")
    if len(ops[-1].out_shape) != 1:
        raise unsupported(f"a model whose output has shape {ops[-1].out_shape} (logits must be [B, K])")
    return Network(ops, tuple(example.shape[1:]))
