"""A model as a computation graph of :mod:`._layers` operations, traced with ``torch.fx``.

:func:`parse_network` traces the model symbolically (the project's ``Normalize`` and every
``torch.nn`` layer stay whole; user-defined blocks are traced through), records each node's shape
by running one example through the traced graph, and maps every tensor node to one operation:

* affine: ``Linear``, ``Conv2d`` (zero padding; any stride, dilation, groups), average pooling
  (``AvgPool2d``, ``AdaptiveAvgPool2d`` to a size that divides the input, ``F.avg_pool2d``,
  ``F.adaptive_avg_pool2d``) as a depthwise convolution, ``Normalize`` and ``BatchNorm1d/2d``
  (per-channel affine maps; in eval mode a batch norm is folded into the ``Conv2d``/``Linear``
  before it when that map feeds nothing else), ``Flatten`` / ``flatten`` / ``view`` /
  ``reshape`` (a reshape), ``+`` of two tensors (residual shortcuts);
* nonlinear: ``ReLU`` (module, ``torch.relu``, ``F.relu``, ``.relu()``) and ``MaxPool2d`` (no
  padding, no dilation, floor mode);
* dropped: ``Identity``, ``Dropout`` in eval mode, ``.contiguous()``, and values that are not
  tensors (``x.size(0)`` feeding a ``view``).

Anything else raises ``ValueError`` naming the node, the supported operations and the zoo
models that parse; a model ``torch.fx`` cannot trace (Python control flow on tensor values)
raises ``ValueError`` saying so.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..core.attack import eval_mode
from ..core.models import Normalize
from ._layers import (
    AddOp,
    ChannelAffineOp,
    ConvOp,
    LinearOp,
    MaxPoolOp,
    Op,
    ReLUOp,
    ReshapeOp,
    _pair,
    avg_pool_op,
)

SUPPORTED = (
    "Linear, Conv2d (zero padding), ReLU, MaxPool2d (no padding/dilation, floor mode), AvgPool2d "
    "(floor mode), AdaptiveAvgPool2d (to a size dividing the input), Flatten/view/reshape, Normalize, "
    "BatchNorm1d/2d (with running statistics), + of two tensors (residual shortcuts), Identity, "
    "Dropout (eval mode)"
)


class UnsupportedLayer(ValueError):
    """A node no verifier can bound; :func:`parse_network` adds the lists of what is supported."""


def unsupported(what: str) -> UnsupportedLayer:
    return UnsupportedLayer(f"cannot bound {what}")


@dataclass
class Node:
    """One operation of the graph and the nodes it reads (``op`` is None for the input)."""

    op: Op | None
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str


@dataclass
class Network:
    """The parsed graph: ``nodes[0]`` is the input, ``nodes[-1]`` the logits, in topological
    order; a Sequential model is a chain."""

    nodes: list[Node]
    input_shape: tuple[int, ...]
    consumers: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.consumers = [[] for _ in self.nodes]
        for k, node in enumerate(self.nodes):
            for i in node.inputs:
                self.consumers[i].append(k)

    @property
    def ops(self) -> list[Op]:
        return [node.op for node in self.nodes[1:]]

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    @property
    def num_classes(self) -> int:
        return int(math.prod(self.nodes[-1].shape))

    def nonlinear(self) -> list[int]:
        """The nodes whose op is not affine (ReLU, max-pooling), in topological order."""
        return [k for k, node in enumerate(self.nodes) if k and not node.op.affine]

    def forward(self, x: Tensor, visit: Callable[[int, list[Tensor]], None] | None = None) -> Tensor:
        """The logits; ``visit(k, inputs)`` sees each node's input values before it runs."""
        values: dict[int, Tensor] = {0: x}
        left = [len(c) for c in self.consumers]
        for k in range(1, len(self.nodes)):
            node = self.nodes[k]
            args = [values[i] for i in node.inputs]
            if visit is not None:
                visit(k, args)
            values[k] = node.op.forward(*args)
            for i in node.inputs:
                left[i] -= 1
                if left[i] == 0:
                    del values[i]
        return values[self.output]

    def use_batch_statistics(self, x: Tensor) -> Tensor | None:
        """Bind every train-mode batch norm to the statistics of the clean batch ``x`` (biased
        variance, as ``nn.BatchNorm2d`` normalises in training) and return the logits; the bounds
        then hold for that normalisation.  Running statistics are not touched.  Without such
        batch norms nothing is computed and ``None`` is returned."""
        if not any(isinstance(n.op, ChannelAffineOp) and not isinstance(n.op.module, Normalize) and n.op.module.training
                   for n in self.nodes[1:]):
            return None

        def visit(k: int, args: list[Tensor]) -> None:
            op = self.nodes[k].op
            if isinstance(op, ChannelAffineOp) and not isinstance(op.module, Normalize) and op.module.training:
                dims = [0] + list(range(2, args[0].dim()))
                op.channel.batch_stats = (args[0].mean(dims), args[0].var(dims, unbiased=False))

        return self.forward(x, visit)


class _Tracer(fx.Tracer):
    """Keeps ``Normalize`` and the ``torch.nn`` layers whole (their types decide the op)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n] = out
        return out


_ADD = (operator.add, operator.iadd, torch.add)
_RELU = (torch.relu, torch.relu_, F.relu)
_ALIAS_METHODS = ("contiguous",)
_RESHAPE_METHODS = ("view", "reshape", "flatten")


def supported_zoo() -> list[str]:
    """The zoo models (registry names) that parse into supported operations on a 1x28x28 input."""
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


def parse_network(model: nn.Module, example: Tensor) -> Network:
    """Trace ``model`` into supported operations, recording shapes by running ``example`` (one
    or more inputs) through it.  The caller chooses the mode (the verifiers use eval).  An
    unsupported node raises ``ValueError`` naming it, the supported operations and the zoo
    models that are supported; so does a model ``torch.fx`` cannot trace."""
    try:
        return _parse(model, example)
    except UnsupportedLayer as exc:
        raise ValueError(
            f"{exc}; supported layers: {SUPPORTED}. Zoo models that are supported: "
            f"{', '.join(supported_zoo())}. Express the model with these operations."
        ) from None


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError... on what it cannot trace
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx ({first}): the verifiers need a model "
            "without Python control flow on tensor values (data-dependent if/for); rewrite its forward "
            "without it"
        ) from None
    return fx.GraphModule(model, graph)


def _parse(model: nn.Module, example: Tensor) -> Network:
    gm = _trace(model)
    dtype = next((p.dtype for p in model.parameters()), example.dtype)
    rec = _Recorder(gm)
    rec.values = {}
    with torch.no_grad(), eval_mode(model):  # shapes only: two copies of one input, the model's dtype
        rec.run(example[:1].to(dtype).repeat(2, *([1] * (example.dim() - 1))))
    values = rec.values
    nodes: list[Node] = []
    index: dict[fx.Node, int] = {}  # fx node -> graph node (aliases map to their source)
    output = None
    for n in gm.graph.nodes:
        if n.op == "output":
            output = n.args[0]
            continue
        value = values.get(n)
        if not isinstance(value, Tensor):
            continue  # sizes and other plain values: read by reshapes only
        if value.dim() == 0 or value.shape[0] != 2:
            raise unsupported(f"node {n.name} ({_describe(n, gm)}): it mixes the batch with other dimensions")
        if n.op == "placeholder":
            if nodes:
                raise unsupported(f"a model with several inputs ({n.name})")
            index[n] = len(nodes)
            nodes.append(Node(None, (), tuple(value.shape[1:]), n.name))
            continue
        if n.op == "get_attr":
            index[n] = -1  # a constant tensor: any op reading it is refused below
            continue
        tensors = [a for a in _flat_args(n) if isinstance(a, fx.Node) and isinstance(values.get(a), Tensor)]
        for a in tensors:
            if index.get(a, -1) < 0:
                raise unsupported(f"node {n.name} ({_describe(n, gm)}): it reads the constant tensor {a.name}")
        shapes = [tuple(values[a].shape[1:]) for a in tensors]
        op = _convert(n, gm, tensors, shapes, tuple(value.shape[1:]), index)
        if isinstance(op, int):  # an alias of an existing node
            index[n] = op
            continue
        index[n] = len(nodes)
        nodes.append(Node(op, tuple(index[a] for a in tensors[: op.arity]), tuple(value.shape[1:]), n.name))
    if not isinstance(output, fx.Node) or index.get(output, -1) < 0:
        raise unsupported("a model whose output is not one tensor computed from its input")
    net = _prune(_fold_batch_norms(nodes), index[output])
    if len(net.nodes) < 2:
        raise unsupported("an empty model")
    if len(net.nodes[-1].shape) != 1:
        raise unsupported(f"a model whose output has shape {net.nodes[-1].shape} (logits must be [B, K])")
    return net


def _convert(n: fx.Node, gm: fx.GraphModule, tensors: list, shapes: list, out_shape: tuple, index: dict) -> Op | int:
    """The op of fx node ``n``, or the index of the node it aliases."""
    what = f"layer {n.target} ({gm.get_submodule(n.target)!r})" if n.op == "call_module" else \
        f"node {n.name} ({_describe(n, gm)})"
    in_shape = shapes[0] if shapes else ()
    if n.op == "call_module":
        return _convert_module(what, gm.get_submodule(n.target), in_shape, out_shape, n.target,
                               index[tensors[0]] if tensors else -1)
    target = n.target
    if n.op == "call_function" and target in _ADD or n.op == "call_method" and target == "add":
        if len(tensors) != 2 or len(_flat_args(n)) != 2:
            raise unsupported(f"{what}: only the sum of two tensors is supported")
        if shapes[0] != shapes[1] or in_shape != out_shape:
            raise unsupported(f"{what}: the sum of tensors of shapes {shapes[0]} and {shapes[1]} (broadcasting)")
        return AddOp(None, in_shape, out_shape)
    if len(tensors) != 1:
        raise unsupported(what)
    if n.op == "call_function" and target in _RELU or n.op == "call_method" and target in ("relu", "relu_"):
        return ReLUOp(None, in_shape, out_shape)
    if n.op == "call_method" and target in _ALIAS_METHODS + _RESHAPE_METHODS \
            or n.op == "call_function" and target is torch.flatten:
        return index[tensors[0]] if in_shape == out_shape else ReshapeOp(None, in_shape, out_shape)
    if n.op == "call_function" and target in (F.adaptive_avg_pool2d, F.avg_pool2d):
        if target is F.avg_pool2d and len(_flat_args(n)) > 2:
            raise unsupported(f"{what}: avg_pool2d with settings beyond its kernel size")
        kernel, stride = _avg_window(what, in_shape, out_shape)
        return avg_pool_op(None, in_shape, out_shape, kernel, stride, 0)
    raise unsupported(what)


def _convert_module(what, m, in_shape, out_shape, name, source) -> Op | int:
    if isinstance(m, nn.Linear):
        if len(in_shape) != 1:
            raise unsupported(f"{what}: Linear on a {len(in_shape)}-d input (flatten first)")
        return LinearOp(m, in_shape, out_shape)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            raise unsupported(f"{what}: Conv2d with padding {m.padding!r} / padding_mode {m.padding_mode!r}")
        return ConvOp(m, in_shape, out_shape)
    if isinstance(m, nn.ReLU):
        return ReLUOp(m, in_shape, out_shape)
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
            raise unsupported(f"{what}: MaxPool2d with padding, dilation, ceil_mode or return_indices")
        return MaxPoolOp(m, in_shape, out_shape)
    if isinstance(m, nn.AvgPool2d):
        pad = _pair(m.padding)
        if m.ceil_mode or m.divisor_override is not None or (pad != (0, 0) and not m.count_include_pad):
            raise unsupported(f"{what}: AvgPool2d with ceil_mode, divisor_override or count_include_pad=False")
        return avg_pool_op(m, in_shape, out_shape, m.kernel_size, m.stride if m.stride is not None else m.kernel_size, pad)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        kernel, stride = _avg_window(what, in_shape, out_shape)
        return avg_pool_op(m, in_shape, out_shape, kernel, stride, 0)
    if isinstance(m, Normalize):
        return ChannelAffineOp(m, in_shape, out_shape, name)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.running_mean is None or m.running_var is None:
            raise unsupported(f"{what}: a batch norm without running statistics (track_running_stats=False)")
        if isinstance(m, nn.BatchNorm1d) and len(in_shape) != 1:
            raise unsupported(f"{what}: BatchNorm1d on a {len(in_shape)}-d input")
        return ChannelAffineOp(m, in_shape, out_shape, name)
    if isinstance(m, nn.Flatten):
        return source if in_shape == out_shape else ReshapeOp(m, in_shape, out_shape)
    if isinstance(m, nn.Identity) or isinstance(m, nn.Dropout) and not m.training:
        return source
    raise unsupported(what)


def _avg_window(what: str, in_shape, out_shape) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window of an adaptive average pooling whose output size divides its input size."""
    if len(in_shape) != 3 or any(i % o for i, o in zip(in_shape[1:], out_shape[1:], strict=True)):
        raise unsupported(f"{what}: adaptive average pooling to a size that does not divide the input")
    k = (in_shape[1] // out_shape[1], in_shape[2] // out_shape[2])
    return k, k


def _fold_batch_norms(nodes: list[Node]) -> list[Node]:
    """Fold each eval-mode batch norm into the ``Conv2d``/``Linear`` before it when that map
    feeds nothing else: the batch norm's node becomes the map (``W' = s W``, ``b' = s b + t``)."""
    uses = [0] * len(nodes)
    for node in nodes:
        for i in node.inputs:
            uses[i] += 1
    for k, node in enumerate(nodes):
        op = node.op
        if not isinstance(op, ChannelAffineOp) or isinstance(op.module, Normalize) or op.module.training:
            continue
        src = node.inputs[0]
        prev = nodes[src].op
        if uses[src] == 1 and isinstance(prev, (LinearOp, ConvOp)) and prev.bn is None \
                and getattr(prev, "_fixed", None) is None:
            prev.bn = op.channel
            prev.out_shape = node.shape
            nodes[k] = Node(prev, nodes[src].inputs, node.shape, node.name)
            nodes[src] = Node(None, (), nodes[src].shape, nodes[src].name)  # unused now: pruned
    return nodes


def _flat_args(n: fx.Node) -> list:
    out = []
    for a in list(n.args) + list(n.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _describe(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    name = getattr(n.target, "__name__", str(n.target))
    return f"{n.op} {name}"


def _prune(nodes: list[Node], out: int) -> Network:
    """Keep the nodes the output depends on (in order), renumbered; the output comes last."""
    keep, stack = set(), [out]
    while stack:
        k = stack.pop()
        if k not in keep:
            keep.add(k)
            stack.extend(nodes[k].inputs)
    if 0 not in keep:
        raise unsupported("a model whose output does not depend on its input")
    order = sorted(keep)
    new = {k: i for i, k in enumerate(order)}
    kept = [Node(nodes[k].op, tuple(new[i] for i in nodes[k].inputs), nodes[k].shape, nodes[k].name) for k in order]
    return Network(kept, kept[0].shape)
