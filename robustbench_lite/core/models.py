"""Model zoo.  Every model takes images in [0, 1] (NCHW) and returns logits.

Models are registered by name; :func:`create_model` builds one for a dataset's input shape and
class count.  ``timm:<name>`` builds any timm architecture (``pretrained=False``: nothing is
downloaded).  Normalization, where a model wants it, is a layer inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .registry import MODELS, register_model

if TYPE_CHECKING:
    from .data import Data, DataSplit

InputShape = tuple[int, int, int]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU}
_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


@register_model("small-cnn")
def small_cnn(
    input_shape: InputShape, num_classes: int, width: int = 32, hidden: int = 128, activation: str = "relu",
    pool: str = "max",
) -> nn.Module:
    """Two 3x3 conv layers (32, 64 channels, each followed by 2x2 pooling) and two linear
    layers; about 0.42 M parameters on 28x28 grey images.

    With ReLU and max pooling (the defaults) each block pools before its ReLU: max pooling
    commutes with ReLU, so the logits and every gradient are the same numbers, and the ReLU and
    its backward pass touch a quarter of the values.  Parameter names do not depend on the order.

    ``activation="elu", pool="avg"`` makes the network smooth in its input (every layer has a
    Lipschitz gradient), as WRM's certificate needs (Sinha, Namkoong & Duchi 2018 train with ELU);
    the defaults build the ReLU / max-pooling network, and a spec that does not name them keeps
    its cache key."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"small-cnn: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if pool not in _POOLS:
        raise ValueError(f"small-cnn: pool must be one of {sorted(_POOLS)}, got {pool!r}")
    act, pooling = _ACTIVATIONS[activation], _POOLS[pool]
    c, h, w = input_shape

    def block(conv: nn.Conv2d) -> list[nn.Module]:
        return [conv, pooling(2), act()] if (activation, pool) == ("relu", "max") else [conv, act(), pooling(2)]

    return nn.Sequential(
        *block(nn.Conv2d(c, width, 3, padding=1)),
        *block(nn.Conv2d(width, 2 * width, 3, padding=1)),
        nn.Flatten(),
        nn.Linear(2 * width * (h // 4) * (w // 4), hidden),
        act(),
        nn.Linear(hidden, num_classes),
    )


@register_model("mlp")
def mlp(input_shape: InputShape, num_classes: int, hidden: int = 256, depth: int = 2) -> nn.Module:
    """A fully connected ReLU network with ``depth`` hidden layers."""
    dims = [int(torch.tensor(input_shape).prod())] + [hidden] * depth
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*layers)


@register_model("one-hidden-relu")
def one_hidden_relu(input_shape: InputShape, num_classes: int, hidden: int = 64) -> nn.Module:
    """``f(x) = W2 · relu(W1 x)``: the architecture of the convex training programs (no biases,
    as in Pilanci & Ergen 2020)."""
    d = int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, num_classes, bias=False))


@register_model("cnn-cert-small")
def cnn_cert_small(input_shape: InputShape, num_classes: int, width: int = 16, hidden: int = 100) -> nn.Module:
    """The small certification model of Wong & Kolter (ICML 2018): two 4x4 stride-2 convolutions
    (16, 32 channels), a 100-unit linear layer and the logits; no pooling or normalization, so
    every verifier in :mod:`robustbench_lite.certify` bounds it tightly and cheaply."""
    c, h, w = input_shape

    def side(n: int) -> int:  # a 4x4, stride-2, padding-1 convolution
        return (n - 2) // 2 + 1

    return nn.Sequential(
        nn.Conv2d(c, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * side(side(h)) * side(side(w)), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, the second without ReLU, plus the shortcut (the
    identity, or a strided 1x1 convolution with batch norm when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """See :func:`resnet_small`."""

    def __init__(self, input_shape: InputShape, num_classes: int, width: int = 8, hidden: int = 100) -> None:
        super().__init__()
        c, h, w = input_shape
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = _BasicBlock(width, width, 1)
        self.block2 = _BasicBlock(width, 2 * width, 2)
        side_h, side_w = (h + 1) // 2, (w + 1) // 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * ((side_h + 1) // 2) * ((side_w + 1) // 2), hidden),
                                  nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


@register_model("resnet-small")
def resnet_small(input_shape: InputShape, num_classes: int, width: int = 8, hidden: int = 100) -> nn.Module:
    """A small residual network for certified training and verification, in the spirit of the
    residual networks Wong, Schmidt, Metzen & Kolter ("Scaling provable adversarial defenses",
    NeurIPS 2018) certify on MNIST and Fashion-MNIST and of the batch-normalised ResNets of Shi,
    Wang, Zhang, Yi & Hsieh ("Fast certified robust training with short warmup", NeurIPS 2021):
    a strided 3x3 stem (``width`` channels), two basic blocks (3x3 conv, BN, ReLU, 3x3 conv, BN,
    plus the shortcut: the identity, then a strided 1x1 conv with BN into ``2·width`` channels at
    half the resolution), a ``hidden``-unit linear layer and the logits.  About 0.1 M parameters
    on 28x28 grey images; the verifiers bound it through its computation graph (batch norms
    folded in eval mode, shortcuts as additions)."""
    return ResNetSmall(tuple(input_shape), num_classes, width, hidden)


def _timm_model(arch: str, input_shape: InputShape, num_classes: int, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a core dependency
        raise ValueError("timm models need `pip install timm`") from exc
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch}*")[:5]
        raise KeyError(f"unknown timm model {arch!r}; close names: {close}")
    c = input_shape[0]
    return timm.create_model(arch, pretrained=False, in_chans=c, num_classes=num_classes, **kwargs)


def create_model(name: str, input_shape: InputShape, num_classes: int, **kwargs) -> nn.Module:
    """Build a model by registry name, or ``timm:<arch>`` for a timm architecture."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape is (channels, height, width), got {input_shape!r}")
    if name.startswith("timm:"):
        return _timm_model(name.split(":", 1)[1], tuple(input_shape), num_classes, **kwargs)
    return MODELS.get(name)(tuple(input_shape), num_classes, **kwargs)


@dataclass(frozen=True)
class ModelSpec:
    """A model by registry name (or ``timm:<arch>``) and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, data: Data) -> nn.Module:
        return create_model(self.name, data.input_shape, data.num_classes, **self.kwargs)

    def check(self, data: Data) -> None:
        """Build the model for ``data`` once, before any work, so that bad kwargs (``width = -4``)
        fail at once with a ``ValueError`` naming the model and its kwargs.  It is built on the
        meta device (no memory, no weights); a model that cannot be built there is built on the
        CPU before it counts as broken."""
        try:
            with torch.device("meta"):
                self.build(data)
            return
        except Exception:  # noqa: BLE001 - some layers cannot be built on the meta device: try the CPU
            pass
        try:
            self.build(data)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ValueError(
                f"model {self.name!r} with kwargs {dict(self.kwargs)} cannot be built for the {data.name} images (shape "
                f"{data.input_shape}, {data.num_classes} classes): {type(exc).__name__}: {first}; fix the model's kwargs"
            ) from None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, device: torch.device | str, batch_size: int = 1000) -> Tensor:
    """Predicted classes for ``x``, batched, in eval mode (model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, split: DataSplit, device: torch.device | str, batch_size: int = 1000) -> float:
    """Clean accuracy of ``model`` on ``split``."""
    return float((predict(model, split.x, device, batch_size) == split.y).float().mean())


def check_logits(out: object, batch: int, labels: int, num_classes: int | None = None) -> None:
    """Raise ``ValueError`` naming the fix unless ``out`` is a ``(batch, classes)`` float tensor
    with ``classes >= labels`` (the largest label + 1) and, given, ``classes == num_classes``."""
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a tensor of logits, got {type(out).__name__}")
    shape = tuple(out.shape)
    fix = "the model must return one logit per class, shape (batch, num_classes)"
    if out.dim() != 2 or shape[0] != batch:
        raise ValueError(f"the model returned outputs of shape {shape} for a batch of {batch}; {fix}")
    if not out.is_floating_point():
        raise TypeError(f"the model returned {out.dtype} outputs; {fix}, as floats")
    if num_classes is not None and shape[1] != num_classes:
        raise ValueError(f"the model returns {shape[1]} logits but the dataset has {num_classes} classes; {fix}")
    if shape[1] < labels:
        raise ValueError(f"the model returns {shape[1]} logits but the labels go up to {labels - 1}; {fix}")


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(features, head)`` of a model that is an ``nn.Sequential`` ending in an ``nn.Linear``."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise TypeError("feature extraction needs an nn.Sequential whose last layer is nn.Linear (e.g. small-cnn)")
    return model[:-1], model[-1]
