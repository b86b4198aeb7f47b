"""Device handling in one place.

:func:`resolve_device` turns ``auto | cpu | cuda | cuda:N`` into a device that exists here;
:class:`DevicePolicy` is everything else the harness decides from that device, as a frozen value:

- mixed precision (``torch.autocast``) per stage: ``train`` and ``attack`` use the policy's dtype
  (bf16 where the GPU supports it, else fp16; off on the CPU unless asked), ``eval`` (clean
  predictions and judging adversarial points) stays in float32 unless ``autocast_eval`` is set;
- ``channels_last`` models and batches: for evaluation (attacks, predictions) on every device
  (on the CPU it more than halves the forward time of pooled conv nets, whose NCHW max-pool
  kernels are slow, and changes no prediction beyond float rounding), for training on CUDA only
  (so CPU-trained weights stay bit-identical to the contiguous-layout runs);
- on the CPU, the model's attack passes in cache-sized chunks (:class:`Chunked`): a pass over a
  few dozen small images keeps its activations in cache where one over hundreds spills them to
  memory, and the outputs and input gradients are the same numbers;
- pinned host memory for copies, on CUDA only;
- ``torch.backends.cudnn.benchmark`` switched on during training on CUDA (and restored after).

:func:`make_policy` reads the current machine; :func:`decide_policy` is the pure rule it applies
(so every CUDA decision is unit-tested on a CPU-only machine).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
T = TypeVar("T")
F = TypeVar("F", bound=Callable)
AUTOCAST_CHOICES = ("auto", "off", "bf16", "fp16")
STAGES = ("train", "attack", "eval")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_CHUNK_BYTES = 4 << 20  # the largest activation of one chunk: a few times a core's L2 cache


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a ``torch.device`` that exists here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise TypeError(f"device must be a string like 'auto', 'cpu' or 'cuda:0', got {spec!r}")
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class DevicePolicy:
    """Where and how tensors run.  Build it with :func:`~robustbench_lite.make_policy`
    (or :func:`~robustbench_lite.core.device.decide_policy`)."""

    device: torch.device
    train_dtype: torch.dtype | None = None  #: autocast dtype for training (None: float32)
    attack_dtype: torch.dtype | None = None  #: autocast dtype inside attacks
    eval_dtype: torch.dtype | None = None  #: autocast dtype for clean/adversarial predictions
    channels_last: bool = False  #: layout for evaluation: attacks, clean and adversarial predictions
    train_channels_last: bool = False  #: layout while training
    pin_memory: bool = False
    cudnn_benchmark: bool = False
    chunk_bytes: int | None = None  #: run attack passes in chunks of about this much activation (None: whole)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def dtype(self, stage: str) -> torch.dtype | None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
        return {"train": self.train_dtype, "attack": self.attack_dtype, "eval": self.eval_dtype}[stage]

    def autocast(self, stage: str) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for ``stage`` (``train`` | ``attack`` | ``eval``), or a no-op."""
        dtype = self.dtype(stage)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def layout(self, training: bool = False) -> torch.memory_format:
        """The memory format for evaluation, or for training when ``training``."""
        wanted = self.train_channels_last if training else self.channels_last
        return torch.channels_last if wanted else torch.contiguous_format

    def model_to(self, model: nn.Module, *, training: bool = False) -> nn.Module:
        """Move ``model`` to the device in the layout for evaluation (or for training), in place;
        a no-op when it is already so."""
        return model.to(self.device, memory_format=self.layout(training))

    def batch_to(self, x: Tensor, *, training: bool = False) -> Tensor:
        """Copy a batch to the device: through pinned memory and non-blocking on CUDA, in the
        layout for evaluation (or for training) when it is an image batch.  Tensors already on the
        device are not copied."""
        if x.device == self.device or (x.device.type == self.device.type and self.device.index is None):
            out = x
        else:
            pinned = self.pin_memory and x.device.type == "cpu"
            out = (x.pin_memory() if pinned else x).to(self.device, non_blocking=pinned)
        if out.dim() == 4:
            out = out.contiguous(memory_format=self.layout(training))
        return out

    def chunked(self, model: nn.Module) -> nn.Module:
        """``model`` as attacks should call it: in :class:`~robustbench_lite.core.device.Chunked`
        passes when the policy says so."""
        return model if self.chunk_bytes is None else Chunked(model, self.chunk_bytes)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The training context: ``cudnn.benchmark`` on when the policy says so (restored after)."""
        before = torch.backends.cudnn.benchmark
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled only for float16 training (bf16 and float32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.train_dtype == torch.float16)

    def precision_tag(self) -> str | None:
        """``None`` for float32 training, else the autocast dtype's short name (part of a model's
        cache key, so a mixed-precision model never stands in for a float32 one)."""
        return None if self.train_dtype is None else str(self.train_dtype).removeprefix("torch.")

    def describe(self) -> dict[str, str | bool | None]:
        def name(d: torch.dtype | None) -> str | None:
            return None if d is None else str(d).removeprefix("torch.")

        return {
            "device": str(self.device), "train_dtype": name(self.train_dtype), "attack_dtype": name(self.attack_dtype),
            "eval_dtype": name(self.eval_dtype), "channels_last": self.channels_last,
            "train_channels_last": self.train_channels_last, "pin_memory": self.pin_memory,
            "cudnn_benchmark": self.cudnn_benchmark, "chunk_bytes": self.chunk_bytes,
        }


def decide_policy(
    device: torch.device, autocast: str = "auto", autocast_eval: bool = False, *, bf16_supported: bool = False
) -> DevicePolicy:
    """The pure rule: what ``device`` and the flags mean.

    ``autocast``: ``auto`` is bf16 on a CUDA device that supports it, fp16 on one that does not,
    off on the CPU (so CPU numbers are exactly the float32 ones); ``off``; or ``bf16``/``fp16``
    for training and attacks wherever asked.  ``autocast_eval`` extends it to evaluation."""
    if autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"unknown autocast {autocast!r}; use one of {AUTOCAST_CHOICES}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; use cpu or cuda")
    cuda = device.type == "cuda"
    if autocast == "auto":
        dtype = (torch.bfloat16 if bf16_supported else torch.float16) if cuda else None
    elif autocast == "off":
        dtype = None
    else:
        dtype = _DTYPES[autocast]
    if autocast_eval and dtype is None:
        raise ValueError("autocast_eval needs an autocast dtype: pass --autocast bf16|fp16 (or auto on CUDA)")
    return DevicePolicy(
        device=device, train_dtype=dtype, attack_dtype=dtype, eval_dtype=dtype if autocast_eval else None,
        channels_last=True, train_channels_last=cuda, pin_memory=cuda, cudnn_benchmark=cuda,
        chunk_bytes=None if cuda else CPU_CHUNK_BYTES,
    )


def make_policy(device: str | torch.device = "auto", autocast: str = "auto", autocast_eval: bool = False) -> DevicePolicy:
    """:func:`~robustbench_lite.core.device.decide_policy` for a device that exists here (see
    :func:`~robustbench_lite.core.device.resolve_device`)."""
    dev = resolve_device(device)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    return decide_policy(dev, autocast, autocast_eval, bf16_supported=bf16)


class Chunked(nn.Module):
    """``model`` run on a batch in chunks of rows, the outputs concatenated.

    On a CPU a forward and backward pass over a few dozen small images keeps each layer's
    activations in cache, where one pass over hundreds of images spills them to memory and waits
    on it: the same work in less time.  A chunk holds as many rows as fit ``chunk_bytes`` of the
    model's largest activation, measured once on the first call (one sample through forward hooks
    on the leaf modules, with the random-number state restored afterwards, so a randomized model
    draws what it would have drawn).  A model in eval mode computes each sample alone, so the
    logits and input gradients are the numbers one pass gives; autograd differentiates through
    the concatenation.  An output that is not a tensor is left to the caller's checks: the model
    then runs on the whole batch."""

    same_function: ClassVar[bool] = True

    def __init__(self, model: nn.Module, chunk_bytes: int) -> None:
        super().__init__()
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.model = model
        self.chunk_bytes = chunk_bytes
        self.rows: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.rows is None:
            self.rows = max(1, self.chunk_bytes // largest_activation_bytes(self.model, x[:1]))
        if x.shape[0] <= self.rows:
            return self.model(x)
        parts = x.split(self.rows)
        first = self.model(parts[0])
        if not isinstance(first, Tensor):
            return self.model(x)
        return torch.cat([first, *(self.model(p) for p in parts[1:])])


def largest_activation_bytes(model: nn.Module, sample: Tensor) -> int:
    """Bytes of the largest tensor a leaf module of ``model`` outputs for ``sample`` (or of
    ``sample`` itself, when larger), from one pass without gradients; the CPU random-number state
    is restored after it."""
    sizes = [sample.numel() * sample.element_size()]

    def hook(_module: nn.Module, _inputs: object, out: object) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return max(sizes)


def as_policy(device: DevicePolicy | str | torch.device) -> DevicePolicy:
    """A policy as given, or the float32 one (no autocast) for a bare device."""
    if isinstance(device, DevicePolicy):
        return device
    return make_policy(device, autocast="off")


@contextlib.contextmanager
def layout_kept(model: nn.Module) -> Iterator[None]:
    """Give ``model``'s 4-D parameters and buffers back their memory format on exit.

    Evaluation converts a model to channels_last in place (:meth:`DevicePolicy.model_to`); a
    user's model must not come back changed, e.g. ``safetensors`` refuses to save non-contiguous
    tensors."""
    contiguous = {id(t) for t in (*model.parameters(), *model.buffers()) if t.dim() == 4 and t.is_contiguous()}
    try:
        yield
    finally:
        for t in (*model.parameters(), *model.buffers()):
            if id(t) in contiguous and not t.is_contiguous():
                t.data = t.data.contiguous()


def keeps_layout(fn: F) -> F:
    """Decorate a function whose first argument is a model with :func:`layout_kept`."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with layout_kept(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )


def halving_on_oom(fn: Callable[[int], T], batch_size: int, *, min_batch: int = 1) -> tuple[T, int]:
    """``fn(batch_size)``; on CUDA out-of-memory, free the cache, halve the batch and retry.

    Returns ``(result, batch size that worked)``.  Other errors, and an OOM at ``min_batch``,
    propagate."""
    if batch_size < 1 or min_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, min_batch={min_batch}")
    batch = batch_size
    while True:
        try:
            return fn(batch), batch
        except Exception as exc:
            if not is_oom(exc) or batch <= min_batch:
                raise
            smaller = max(min_batch, batch // 2)
            log.warning("out of memory with batch %d; retrying with %d", batch, smaller)
            batch = smaller
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
