"""Model wrappers that give gradient attacks honest gradients where the model's own lie.

Athalye, Carlini, Wagner, "Obfuscated gradients give a false sense of security", ICML 2018:

* **BPDA** (§4.1): a non-differentiable layer ``g`` (quantization, JPEG, ...) is run as is on the
  forward pass and replaced by a differentiable approximation on the backward pass; with
  ``g(x) ≈ x`` that is the straight-through estimator ``x + (g(x) − x).detach()``.  The user
  marks such a layer with :func:`bpda` (a :class:`NonDifferentiable` module); it behaves exactly
  like the layer (true, usually zero, gradient) until a :class:`BPDA` wrapper switches it on.
* **EOT** (§4.3): for a randomized model, attack the expectation over its randomness:
  :class:`EOT` averages the logits of ``samples`` forward passes, so the input gradient is the
  average of the per-pass gradients of the logits (equal to averaging the loss gradients for
  losses linear in the logits, e.g. the CW margin; a close stand-in for CE).

Two more wrappers answer the other masking checks (Carlini et al. 2019, §5.2; Croce & Hein 2020):

* :class:`LogOutputs`: a model that returns probabilities is attacked through ``log p``
  (logits up to a per-row shift), so CE is computed on logits, not on probabilities.
* :class:`RescaleLogits`: logits divided by their (detached) per-row gap between the two
  largest, so a softmax saturated by a huge logit scale gives CE gradients again, and CE then
  leans on the runner-up class as the CW margin does; argmax unchanged.

And one for the escalation ladder (:mod:`~robustbench_lite.eval.escalate`):

* :class:`NoiseEOT`: EOT over small Gaussian input noise chosen by the attacker (Athalye et al.
  2018, §4.3, with the transformation a noise of a few percent of eps): the mean logits over noisy
  copies.  Its gradient is the gradient of the noise-smoothed model, which averages away
  high-frequency terms that shatter the plain gradient (§4.2) while moving the function little.

Every wrapper is an ``nn.Module`` returning logits, so any gradient attack can use it; the
adversarial points are always judged on the original model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["BPDA", "EOT", "LogOutputs", "NoiseEOT", "NonDifferentiable", "RescaleLogits", "adapt", "bpda", "marked_layers"]


class NonDifferentiable(nn.Module):
    """Marks a non-differentiable layer for BPDA.

    ``layer`` is a module or a function of a tensor; ``approx`` the differentiable stand-in
    used on the backward pass under BPDA (default: the identity, i.e. straight-through).
    """

    def __init__(self, layer: nn.Module | Callable[[Tensor], Tensor], approx: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if not callable(layer):
            raise TypeError(f"bpda(layer): layer must be a module or a function of a tensor, got {type(layer).__name__}")
        if approx is not None and not callable(approx):
            raise TypeError(f"bpda(..., approx=) must be a function of a tensor, got {type(approx).__name__}")
        self.layer = layer
        self.approx = approx
        self.straight_through = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        if not (self.straight_through and torch.is_grad_enabled() and x.requires_grad):
            return out
        smooth = self.approx(x) if self.approx is not None else x
        if smooth.shape != out.shape:
            raise ValueError(
                f"BPDA approximation returned shape {tuple(smooth.shape)} but the layer returns {tuple(out.shape)}; "
                "pass an approx= with the layer's output shape"
            )
        return smooth + (out - smooth).detach()


def bpda(layer: nn.Module | Callable[[Tensor], Tensor], approx: Callable[[Tensor], Tensor] | None = None) -> NonDifferentiable:
    """Mark ``layer`` as non-differentiable: ``nn.Sequential(bpda(quantize), net)``."""
    return NonDifferentiable(layer, approx)


def marked_layers(model: nn.Module) -> list[NonDifferentiable]:
    """The :class:`NonDifferentiable` layers inside ``model``."""
    return [m for m in model.modules() if isinstance(m, NonDifferentiable)]


@contextmanager
def _straight_through(layers: list[NonDifferentiable]) -> Iterator[None]:
    old = [m.straight_through for m in layers]
    for m in layers:
        m.straight_through = True
    try:
        yield
    finally:
        for m, flag in zip(layers, old, strict=True):
            m.straight_through = flag


class BPDA(nn.Module):
    """``model`` with its marked layers run straight-through (or with their ``approx``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        if not marked_layers(model):
            raise ValueError(
                "BPDA found no layer marked non-differentiable in the model; wrap the preprocessing "
                "layer with robustbench_lite.eval.adaptive.bpda(layer)"
            )

    def forward(self, x: Tensor) -> Tensor:
        with _straight_through(marked_layers(self.model)):
            return self.model(x)


class EOT(nn.Module):
    """Expectation over transformation: the mean logits of ``samples`` forward passes."""

    def __init__(self, model: nn.Module, samples: int = 8) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"EOT samples must be an int >= 1, got {samples!r}")
        self.model = model
        self.samples = samples

    @property
    def passes_per_forward(self) -> int:
        """Network passes per call, so attacks count EOT's true cost (see ``attack._Counter``)."""
        return self.samples

    def forward(self, x: Tensor) -> Tensor:
        # one batched pass over ``samples`` copies: each copy draws its own randomness
        out = self.model(x.repeat(self.samples, *([1] * (x.dim() - 1))))
        return out.view(self.samples, x.shape[0], *out.shape[1:]).mean(dim=0)


class NoiseEOT(nn.Module):
    """The mean logits of ``samples`` copies of the input plus Gaussian noise of std ``sigma``
    (clipped to [0, 1]); the noise comes from a generator seeded with ``seed`` (one per device),
    so a rerun draws the same noise."""

    def __init__(self, model: nn.Module, sigma: float, samples: int = 8, seed: int = 0) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"NoiseEOT samples must be an int >= 1, got {samples!r}")
        if not (isinstance(sigma, (int, float)) and sigma >= 0):
            raise ValueError(f"NoiseEOT sigma must be a number >= 0, got {sigma!r}")
        self.model = model
        self.sigma = float(sigma)
        self.samples = samples
        self.seed = seed
        self._gens: dict[str, torch.Generator] = {}

    @property
    def passes_per_forward(self) -> int:
        return self.samples

    def forward(self, x: Tensor) -> Tensor:
        key = str(x.device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=x.device).manual_seed(self.seed)
        xs = x.repeat(self.samples, *([1] * (x.dim() - 1)))
        noise = torch.randn(xs.shape, generator=self._gens[key], device=x.device, dtype=x.dtype)
        out = self.model((xs + self.sigma * noise).clamp(0.0, 1.0))
        return out.view(self.samples, x.shape[0], *out.shape[1:]).mean(dim=0)


class LogOutputs(nn.Module):
    """``log p`` for a model whose outputs are probabilities (rows summing to 1)."""

    def __init__(self, model: nn.Module, floor: float = 1e-30) -> None:
        super().__init__()
        self.model = model
        self.floor = floor

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).clamp_min(self.floor).log()


class RescaleLogits(nn.Module):
    """Logits divided by the detached gap between each row's two largest (argmax unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        top = z.detach().topk(2, dim=1).values
        scale = (top[:, :1] - top[:, 1:]).clamp_min(1e-6 * top.abs().amax(dim=1, keepdim=True).clamp_min(1e-12))
        return z / scale


def adapt(
    model: nn.Module, *, bpda: bool = False, eot_samples: int = 0, log_outputs: bool = False, rescale: bool = False
) -> tuple[nn.Module, list[str]]:
    """Wrap ``model`` for an adaptive rerun; returns the wrapped model and the wrapper names.

    Order, innermost first: BPDA (needs marked layers), EOT, log of probabilities, rescaling.
    """
    names: list[str] = []
    if bpda and marked_layers(model):
        model, names = BPDA(model), [*names, "bpda"]
    if eot_samples > 1:
        model, names = EOT(model, eot_samples), [*names, "eot"]
    if log_outputs:
        model, names = LogOutputs(model), [*names, "log-outputs"]
    if rescale:
        model, names = RescaleLogits(model), [*names, "rescale"]
    return model, names
