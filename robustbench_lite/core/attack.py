"""Attack base classes.

An attack is a frozen dataclass of its settings plus one method that implements the algorithm.
The base class owns everything else (template method): it validates settings at construction
and inputs at call time, puts the model in ``eval()``, seeds a ``torch.Generator``, counts
forward and gradient evaluations, calls the plugin, and checks that the result is finite, in
[0, 1] and inside the threat ball.  Plugins never re-check any of that.

Plugin settings are declared with :func:`setting`, which records the bounds the base class
enforces, so a plugin file holds only its algorithm::

    @register_attack("my-attack")
    @dataclass(frozen=True, kw_only=True)
    class MyAttack(EvasionAttack):
        steps: int = setting(10, low=1)

        def _perturb(self, model, x, y, target, gen):
            ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .access import Access, access_note, model_access
from .config import MAX_SEED, Plugin, setting
from .models import check_logits
from .threat import Geometry, Norm, ThreatModel, check_eps

LossFn = Callable[[Tensor, Tensor], Tensor]
__all__ = [
    "Attack",
    "AttackOutput",
    "EvasionAttack",
    "PoisoningAttack",
    "UniversalAttack",
    "UniversalOutput",
    "setting",
]


@dataclass(frozen=True)
class AttackOutput:
    """What one call of an evasion attack returns."""

    x_adv: Tensor
    forward_evals: int  #: number of images pushed through the model (forward passes x batch)
    grad_evals: int  #: number of images whose input gradient was computed
    seconds: float
    target: Tensor | None = None  #: the class a targeted attack aimed for, per point
    distances: Tensor | None = None  #: min-norm attacks: smallest adversarial distance per point (inf: none)


def network_of(model: nn.Module) -> nn.Module:
    """The network inside the wrappers that compute the very same function (the attack's
    counter, chunked passes: those with a true ``same_function`` attribute): what a plugin that
    exploits a network's structure inspects.  Wrappers that change the function (BPDA, EOT,
    rescaling) stay."""
    while getattr(model, "same_function", False):
        model = model.model
    return model


def count_forwards(model: nn.Module, images: int) -> None:
    """Count ``images`` forward passes a plugin computed without calling ``model`` (e.g. by
    incremental scoring of the network inside it); a no-op for a model that does not count."""
    if isinstance(model, _Counter):
        model.forwards += images * model.passes


class _Counter(nn.Module):
    """Wraps a model and counts forward passes and input-gradient evaluations per image.

    A module that runs the network several times per call (EOT) says so with an integer
    ``passes_per_forward`` attribute; the counts are multiplied by it (nested ones multiply).
    The first output is checked: logits ``(batch, classes)`` with a logit for every label
    (``labels``: the largest label + 1), so a label out of range or a model with the wrong output
    shape fails with a message instead of deep inside a loss."""

    same_function: ClassVar[bool] = True

    def __init__(self, model: nn.Module, labels: int = 0) -> None:
        super().__init__()
        self.model = model
        self.forwards = 0
        self.backwards = 0
        self.passes = 1
        self.labels = labels
        self._checked = False
        for m in model.modules():
            self.passes *= int(getattr(m, "passes_per_forward", 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if not self._checked:
            check_logits(out, x.shape[0], self.labels)
            self._checked = True
        n = x.shape[0] * self.passes
        self.forwards += n
        if out.requires_grad:
            out.register_hook(self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> Callable[[Tensor], None]:
        def hook(_grad: Tensor) -> None:
            self.backwards += n

        return hook


@dataclass(frozen=True, kw_only=True)
class Attack(Plugin):
    """Settings shared by every attack, and their checks."""

    norm: Norm = Norm.LINF
    eps: float = 0.1
    seed: int = setting(0, low=0, high=MAX_SEED)

    #: the cell kind (harness registry name) that evaluates this attack's cells
    cell_kind: ClassVar[str] = "evasion"
    norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2)
    targeted: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = True
    #: reads the model's output scores (logits); ``False``: only its predicted label (decision-based)
    needs_scores: ClassVar[bool] = True
    randomized: ClassVar[bool] = False
    min_norm: ClassVar[bool] = False
    iterative: ClassVar[bool] = True

    def __post_init__(self) -> None:
        norm = Norm.parse(self.norm)
        if norm not in self.norms:
            allowed = ", ".join(n.value for n in self.norms)
            raise ValueError(f"{self.name} supports norm {allowed}, not {norm.value}")
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", check_eps(self.eps, norm))
        super().__post_init__()

    # -- description ----------------------------------------------------------------------------
    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)

    @property
    def geometry(self) -> Geometry:
        """The norm's geometry: distances, projections, ascent steps, random starts."""
        return self.norm.geometry

    @property
    def grad_budget(self) -> float:
        """Gradient evaluations per point at most; the harness runs cheaper attacks first."""
        return 1.0

    @classmethod
    def access(cls) -> Access:
        """What the attack needs to see of a model, from its tags: gradients (``needs_grad``),
        scores (``needs_scores``) or only the predicted label."""
        if cls.needs_grad:
            return Access.GRADIENTS
        return Access.SCORES if cls.needs_scores else Access.LABELS

    def check_access(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` naming the fix when ``model`` gives less than the attack needs
        (a :class:`~robustbench_lite.core.access.LabelOnly` model and a gradient attack)."""
        given = model_access(model)
        if not given.covers(self.access()):
            raise ValueError(access_note(self.name, self.access(), given))

    def _prepare(
        self, model: object, x: object, y: object, gen: torch.Generator | None
    ) -> tuple[Tensor, Tensor, torch.Generator, _Counter]:
        """The call-time checks every attack kind shares: model, images, labels, generator."""
        check_model(model)
        self.check_access(model)
        x = check_images(x)
        check_dtype(model, x)
        y = check_labels(y, x.shape[0]).to(x.device)
        return x, y, seeded(gen, self.seed, x.device), _Counter(model, int(y.max()) + 1)


# -------------------------------------------------------------------------------------------------
# input checks shared by every kind of attack
# -------------------------------------------------------------------------------------------------


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    return model


def check_images(x: object, name: str = "x") -> Tensor:
    """Images must be a floating NCHW tensor, finite, with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor in [0, 1], got {x.dtype}; use x.float() / 255")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must be NCHW (batch, channels, height, width), got shape {tuple(x.shape)}; "
            "add a channel axis with x.unsqueeze(1) for grey images"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; clean the input first")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; scale images to [0, 1] "
            "and put any normalization inside the model"
        )
    return x


def check_dtype(model: nn.Module, x: Tensor) -> None:
    """Images in a float dtype other than the model's weights fail with the dtype to use."""
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_floating_point() and x.dtype != param.dtype:
        raise TypeError(
            f"x is {str(x.dtype)[6:]} but the model's weights are {str(param.dtype)[6:]}; pass x.to({param.dtype}) "
            f"(e.g. x.float() for a float32 model)"
        )


def check_labels(y: object, n: int) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"y must hold integer class indices, got {y.dtype}; use y.long()")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"y must have shape ({n},) to match x's batch, got {tuple(y.shape)}")
    if (y < 0).any():
        raise ValueError("y holds negative class indices")
    return y.long()


@contextmanager
def eval_mode(model: nn.Module | None) -> Iterator[None]:
    """Put ``model`` in ``eval()`` for the block and restore every submodule's mode after."""
    if model is None:
        yield
        return
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in zip(model.modules(), was_training, strict=True):
            m.training = flag


def seeded(gen: torch.Generator | None, seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """``gen`` checked, or a new generator on ``device`` seeded with ``seed``."""
    return check_generator(gen) if gen is not None else torch.Generator(device=device).manual_seed(seed)


def check_generator(gen: object) -> torch.Generator:
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"gen must be a torch.Generator (seeded), got {type(gen).__name__}")
    return gen


# -------------------------------------------------------------------------------------------------
# evasion attacks
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EvasionAttack(Attack):
    """A per-point test-time attack: ``perturb(model, x, y) -> x_adv`` inside the threat ball."""


    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Adversarial examples for ``(x, y)``; see :meth:`run` for the counts that come with them."""
        return self.run(model, x, y, gen).x_adv

    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator | None = None
    ) -> AttackOutput:
        """Adversarial examples for ``(x, y)`` with what they cost (:class:`~robustbench_lite.AttackOutput`):
        forward and input-gradient evaluations per image, seconds, and the targets or distances
        where the attack has them.  Inputs are checked first, the output after."""
        x, y, gen, counted = self._prepare(model, x, y, gen)
        start = time.perf_counter()
        with eval_mode(model), torch.no_grad():
            target = self._choose_target(counted, x, y, gen) if self.targeted else None
            x_adv = self._perturb(counted, x, y, target, gen)
        distances = None
        if self.min_norm and isinstance(x_adv, tuple):  # (x_adv, distances)
            x_adv, distances = x_adv
        seconds = time.perf_counter() - start
        self._check_output(x, x_adv)
        return AttackOutput(
            x_adv=x_adv.detach(),
            forward_evals=counted.forwards,
            grad_evals=counted.backwards,
            seconds=seconds,
            target=target,
            distances=None if distances is None else distances.detach(),
        )

    # -- what plugins implement -----------------------------------------------------------------
    def _perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, gen: torch.Generator
    ) -> Tensor:
        """The algorithm.  Runs under ``torch.no_grad``; use :meth:`loss_grad` for gradients.

        Minimum-norm attacks (``min_norm = True``) may return ``(x_adv, distances)``: the
        per-point smallest adversarial distance found (``inf`` where none), passed through as
        :attr:`AttackOutput.distances <robustbench_lite.AttackOutput.distances>`.
        """
        raise NotImplementedError

    def _choose_target(self, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """Targeted attacks: the class each point should be sent to."""
        raise NotImplementedError(f"{self.name} is targeted and must implement _choose_target")

    # -- helpers for plugins --------------------------------------------------------------------
    @staticmethod
    def loss_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor, Tensor]:
        """Logits at ``x``, per-sample loss, and the gradient of the summed loss w.r.t. ``x``."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            loss = loss_fn(logits, y)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return logits.detach(), loss.detach(), grad

    # -- output check ---------------------------------------------------------------------------
    def _check_output(self, x: Tensor, x_adv: object) -> None:
        if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape or x_adv.dtype != x.dtype:
            raise RuntimeError(f"attack {self.name} returned a result that does not match its input's shape/dtype")
        if not torch.isfinite(x_adv).all():
            raise RuntimeError(f"attack {self.name} returned non-finite values")
        tol = 1e-5
        if float(x_adv.min()) < -tol or float(x_adv.max()) > 1 + tol:
            raise RuntimeError(f"attack {self.name} returned values outside [0, 1]")
        if self.min_norm:  # minimum-norm attacks report a distance; the harness compares it to eps
            return
        dist = self.geometry.distance(x_adv - x)
        if not self.geometry.inside(x_adv - x, self.eps).all():
            raise RuntimeError(
                f"attack {self.name} left the {self.norm.value} ball of radius {self.eps}: "
                f"max distance {float(dist.max()):.6g}"
            )


# -------------------------------------------------------------------------------------------------
# universal perturbations
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniversalOutput:
    """What one call of a universal attack returns: one perturbation for every input."""

    delta: Tensor  #: [1, C, H, W]; applied as clip(x + delta, 0, 1)
    forward_evals: int
    grad_evals: int
    seconds: float


def _as_split(data: object) -> tuple[Tensor, Tensor]:
    """Images and labels from a DataSplit, an ``(x, y)`` pair or an iterable of ``(x, y)`` batches."""
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y  # type: ignore[union-attr]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], data[1]
    try:
        batches = list(data)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"data must be a DataSplit, an (x, y) pair or an iterable of (x, y) batches, got {type(data).__name__}"
        ) from None
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
        raise TypeError("data as an iterable must yield (x, y) batches (e.g. a DataLoader over a TensorDataset)")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def apply_delta(x: Tensor, delta: Tensor) -> Tensor:
    """``clip(x + delta, 0, 1)``: a universal perturbation applied to a batch."""
    return (x + delta.to(x.device)).clamp(0.0, 1.0)


@dataclass(frozen=True, kw_only=True)
class UniversalAttack(Attack):
    """One perturbation for all inputs: ``fit(model, data) -> delta`` with ``||delta|| <= eps``.

    ``data`` is the attacker's set (a DataSplit, an ``(x, y)`` pair or a loader of batches); the
    perturbation is evaluated on held-out points (:mod:`robustbench_lite.eval.universal`).
    Plugins implement :meth:`_fit` on the concatenated images and labels.
    """

    cell_kind: ClassVar[str] = "universal"

    def fit(self, model: nn.Module, data: object, gen: torch.Generator | None = None) -> Tensor:
        """The universal perturbation, shape ``[1, C, H, W]``; see :meth:`run` for the counts."""
        return self.run(model, data, gen).delta

    def run(self, model: nn.Module, data: object, gen: torch.Generator | None = None) -> UniversalOutput:
        """The universal perturbation with what it cost (:class:`~robustbench_lite.UniversalOutput`)."""
        x, y, gen, counted = self._prepare(model, *_as_split(data), gen)
        start = time.perf_counter()
        with eval_mode(model), torch.no_grad():
            delta = self._fit(counted, x, y, gen)
        seconds = time.perf_counter() - start
        delta = self._check_delta(x, delta)
        return UniversalOutput(delta.detach(), counted.forwards, counted.backwards, seconds)

    # -- what plugins implement -----------------------------------------------------------------
    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """The algorithm.  Runs under ``torch.no_grad``; use :meth:`loss_grad` for gradients."""
        raise NotImplementedError

    loss_grad = staticmethod(EvasionAttack.loss_grad)

    # -- output check ---------------------------------------------------------------------------
    def _check_delta(self, x: Tensor, delta: object) -> Tensor:
        shape = tuple(x.shape[1:])
        if not isinstance(delta, Tensor) or tuple(delta.shape) not in (shape, (1, *shape)):
            got = tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__
            raise RuntimeError(f"attack {self.name} must return one perturbation of shape {(1, *shape)}, got {got}")
        delta = delta.reshape(1, *shape)
        if not torch.isfinite(delta).all():
            raise RuntimeError(f"attack {self.name} returned a non-finite perturbation")
        dist = float(self.geometry.distance(delta)[0])
        if not bool(self.geometry.inside(delta, self.eps).all()):
            raise RuntimeError(f"attack {self.name} left the {self.norm.value} ball of radius {self.eps}: norm {dist:.6g}")
        return delta


# -------------------------------------------------------------------------------------------------
# poisoning attacks
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PoisoningAttack(Attack):
    """A training-time attack: ``poison(train, gen) -> train'`` of the same length.

    ``norm``/``eps`` bound how far each poisoned image may move from its clean original (a label
    change alone moves it by 0).  The base class checks that the poisoned split keeps its length,
    images and labels, and that exactly :meth:`n_poison` points changed (image or label).
    Attacks that need a model (``needs_model``) or the test split (``needs_test``, e.g. a target
    image) receive them as keywords.  :meth:`success_points` names the test inputs the attack wants
    misclassified and the class it wants them sent to (``None``: an availability attack).
    """

    cell_kind: ClassVar[str] = "poisoning"
    norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2, Norm.L0)
    needs_grad: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    needs_test: ClassVar[bool] = False
    has_trigger: ClassVar[bool] = False

    def poison(
        self,
        train: object,
        gen: torch.Generator | None = None,
        *,
        model: nn.Module | None = None,
        test: object | None = None,
    ) -> Any:
        """The poisoned training split (a new DataSplit; ``train`` is not modified)."""
        from .data import DataSplit

        if not isinstance(train, DataSplit):
            raise TypeError(f"train must be a DataSplit, got {type(train).__name__}")
        check_images(train.x, "train.x")
        check_labels(train.y, len(train))
        if self.needs_model:
            check_model(model)
        if self.needs_test and not isinstance(test, DataSplit):
            raise TypeError(f"{self.name} needs the test split: pass test=DataSplit(...)")
        gen = seeded(gen, self.seed)
        with eval_mode(model):
            out = self._poison(train, gen, model, test)
        self._check_poisoned(train, out)
        return out

    def trigger(self, x: Tensor) -> Tensor:
        """Stamp the attack's trigger on a batch (backdoor attacks only)."""
        raise NotImplementedError(f"{self.name} has no trigger")

    def n_poison(self, n_train: int) -> int:
        """How many of ``n_train`` points the attack changes (its stated rate)."""
        raise NotImplementedError

    def success_points(self, test: Any) -> Any | None:
        """``DataSplit(x, goal)``: test inputs and the class the attack wants each predicted as."""
        return None

    # -- what plugins implement -----------------------------------------------------------------
    def _poison(self, train: Any, gen: torch.Generator, model: nn.Module | None, test: Any | None) -> Any:
        raise NotImplementedError

    # -- output check ---------------------------------------------------------------------------
    def _check_poisoned(self, train: Any, out: object) -> None:
        from .data import DataSplit

        if not isinstance(out, DataSplit) or len(out) != len(train) or out.x.shape != train.x.shape:
            raise RuntimeError(f"attack {self.name} must return a DataSplit of the same length and image shape")
        if out.x.dtype != train.x.dtype or out.y.dtype != train.y.dtype:
            raise RuntimeError(f"attack {self.name} changed the dtype of the split")
        if not torch.isfinite(out.x).all() or float(out.x.min()) < 0.0 or float(out.x.max()) > 1.0:
            raise RuntimeError(f"attack {self.name} returned images outside [0, 1]")
        changed = (out.x != train.x).flatten(1).any(1) | (out.y != train.y)
        expected = self.n_poison(len(train))
        if int(changed.sum()) != expected:
            raise RuntimeError(
                f"attack {self.name} changed {int(changed.sum())} points, but its rate says {expected}"
            )
        dist = self.geometry.distance(out.x - train.x)
        if not self.geometry.inside(out.x - train.x, self.eps).all():
            raise RuntimeError(
                f"attack {self.name} moved a poison outside the {self.norm.value} ball of radius {self.eps}: "
                f"{float(dist.max()):.6g}"
            )
