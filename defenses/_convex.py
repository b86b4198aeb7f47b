"""Convex training of one-hidden-layer ReLU networks, solved in torch, and its certificate.

Pilanci & Ergen ("Neural networks are convex regularizers", ICML 2020) show that training
``f(x) = Σ_j (xᵀu_j)₊ α_j`` with weight decay equals a convex program over activation patterns
``D_i = diag(1[X g_i ≥ 0])``; Bai, Gautam & Sojoudi ("Practical convex formulation of robust
one-hidden-layer neural network training", ACC 2022) give its Linf-robust version.  With
binary labels ``y ∈ {±1}``, hinge loss and ``r_k = Σ_i d_ik (v_i − w_i)``::

    min_{v, w}  (1/n) Σ_k (1 − y_k x_kᵀ r_k + ε‖r_k‖₁)₊ + β Σ_i (‖v_i‖₂ + ‖w_i‖₂)
    s.t.        (2d_ik − 1) x_kᵀ v_i ≥ ε‖v_i‖₁,   (2d_ik − 1) x_kᵀ w_i ≥ ε‖w_i‖₁   for all i, k

(ε = 0 is the standard program).  The constraints fix every training point's activation
pattern over its whole ε ball, so on it the network is linear and the worst-case hinge is exact.

Solver: preconditioned primal–dual hybrid gradient (Chambolle & Pock 2011; diagonal steps of
Pock & Chambolle 2011, α = 1) on the saddle form in which the hinge, the ℓ₁ terms and the
constraints enter through their conjugates:

* loss: ``max_{0 ≤ λ_k ≤ 1/n, |μ_k| ≤ ελ_k} λ_k (1 − y_k x_kᵀ r_k) + μ_kᵀ r_k``;
* cones: ``max_{ν ≥ 0} −ν_kj (c_kj x_kᵀ u_j − t_j)`` with ``max_{‖ρ_j‖∞ ≤ εη_j} ρ_jᵀu_j − η_j t_j``
  enforcing ``ε‖u_j‖₁ ≤ t_j`` (``u_j`` runs over all v_i and w_i, ``c = 2d − 1``);
* group lasso ``β‖u_j‖₂`` by its prox (group soft-thresholding).

The projection onto ``{0 ≤ λ ≤ cap, ‖μ‖∞ ≤ ελ}`` is exact: ``λ* = clip(max_m (a + εS_m)/(1 + mε²),
0, cap)`` with ``S_m`` the sum of the m largest ``|b_l|``, then ``μ = clip(b, −ελ, ελ)``.
All ``K`` one-vs-rest problems share the patterns and are solved as one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustbench_lite import (
    Defense,
    EpochRecord,
    Norm,
    ThreatModel,
    TrainLog,
    accuracy,
    create_verifier,
    setting,
)


def sample_patterns(x: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """``[n, P]`` 0/1 matrix of distinct activation patterns ``1[X g_i ≥ 0]``, ``g_i ~ N(0, I)``."""
    g = torch.randn(x.shape[1], 4 * count, generator=gen, dtype=x.dtype).to(x.device)
    pats = (x @ g >= 0).to(x.dtype)
    uniq = torch.unique(pats.T, dim=0)  # sorted: order is fixed by the data, not the draw
    pick = torch.randperm(uniq.shape[0], generator=gen)[:count]
    if uniq.shape[0] < count:
        raise ValueError(f"only {uniq.shape[0]} distinct activation patterns found; ask for fewer than {count}")
    return uniq[pick].T.contiguous()


def project_linf_cone(a: Tensor, b: Tensor, eps: float, cap: float | None) -> tuple[Tensor, Tensor]:
    """Euclidean projection of ``(a, b)`` (``[..]``, ``[.., d]``) onto ``{0 ≤ λ ≤ cap, |μ_l| ≤ ελ}``."""
    if eps == 0:
        lam = a.clamp_min(0.0) if cap is None else a.clamp(0.0, cap)
        return lam, torch.zeros_like(b)
    s = b.abs().sort(dim=-1, descending=True).values.cumsum(dim=-1)
    m = torch.arange(1, b.shape[-1] + 1, device=b.device, dtype=b.dtype)
    cand = (a[..., None] + eps * s) / (1 + m * eps * eps)
    lam = torch.maximum(a, cand.amax(dim=-1)).clamp_min(0.0)
    if cap is not None:
        lam = lam.clamp_max(cap)
    bound = (eps * lam)[..., None]
    return lam, torch.maximum(torch.minimum(b, bound), -bound)


@dataclass(frozen=True)
class ConvexProblem:
    """``K`` binary problems sharing data ``x [n, d]`` and patterns ``pats [n, P]``; ``y [K, n]`` in ±1."""

    x: Tensor
    y: Tensor
    pats: Tensor
    beta: float
    eps: float

    def responses(self, u: Tensor) -> Tensor:
        """``r [K, n, d]`` with ``r_k = Σ_i d_ik (v_i − w_i)``; ``u = [V; W]`` is ``[K, 2P, d]``."""
        p = self.pats.shape[1]
        return torch.einsum("ni,kid->knd", self.pats, u[:, :p] - u[:, p:])

    def outputs(self, u: Tensor) -> Tensor:
        """The convex model's outputs on the training points, ``[K, n]``."""
        return (self.responses(u) * self.x).sum(-1)

    def objective(self, u: Tensor) -> Tensor:
        """Per-problem objective ``[K]`` (ignores constraint violation; see :meth:`violation`)."""
        r = self.responses(u)
        margin = self.y * (r * self.x).sum(-1) - self.eps * r.abs().sum(-1)
        return (1 - margin).clamp_min(0).mean(-1) + self.beta * u.norm(dim=-1).sum(-1)

    def violation(self, u: Tensor) -> Tensor:
        """Largest cone-constraint violation per problem ``[K]`` (0 when feasible)."""
        c = 2 * torch.cat([self.pats, self.pats], 1) - 1
        slack = c * torch.einsum("nd,kjd->knj", self.x, u) - self.eps * u.abs().sum(-1)[:, None, :]
        return (-slack).clamp_min(0).flatten(1).amax(-1)


def solve(problem: ConvexProblem, iterations: int, *, callback=None, every: int = 0, omega: float = 100.0) -> Tensor:
    """Run preconditioned PDHG for ``iterations`` steps; return ``u = [V; W]`` as ``[K, 2P, d]``.

    ``callback(it, u)`` is called every ``every`` iterations (for logging curves).
    """
    x, y, pats, beta, eps = problem.x, problem.y, problem.pats, problem.beta, problem.eps
    n, d = x.shape
    k_cls, p = y.shape[0], pats.shape[1]
    pats2 = torch.cat([pats, pats], 1)  # [n, 2P]: pattern of each neuron u_j
    c = 2 * pats2 - 1
    sgn = torch.cat([torch.ones(p), -torch.ones(p)]).to(x)  # +v, -w in r
    xabs = x.abs()
    x1 = xabs.sum(1)  # ||x_k||_1
    m = pats.sum(1)  # patterns active at k
    robust = eps > 0
    # diagonal steps (Pock & Chambolle 2011, alpha = 1), uniform inside each prox group
    col = pats2.T @ xabs + pats2.sum(0)[:, None] * robust + xabs.sum(0)[None, :] + robust  # [2P, d]
    tau_u = 1.0 / col.amax(1).clamp_min(1e-12)  # [2P]
    tau_t = 1.0 / (n + 1.0)
    sig_loss = 1.0 / torch.maximum(2 * m * x1, 2 * m * robust).clamp_min(1e-12)  # [n]
    sig_loss = torch.where(m > 0, sig_loss, torch.ones_like(sig_loss))
    sig_nu = 1.0 / (x1 + float(robust)).clamp_min(1e-12)  # [n]
    tau_u, tau_t = tau_u * omega, tau_t * omega
    sig_loss, sig_nu, sig_c = sig_loss / omega, sig_nu / omega, 1.0 / omega

    u = torch.zeros(k_cls, 2 * p, d, dtype=x.dtype, device=x.device)
    t = torch.zeros(k_cls, 2 * p, dtype=x.dtype, device=x.device)
    lam = torch.zeros(k_cls, n, dtype=x.dtype, device=x.device)
    mu = torch.zeros(k_cls, n, d, dtype=x.dtype, device=x.device) if robust else None
    nu = torch.zeros(k_cls, n, 2 * p, dtype=x.dtype, device=x.device)
    rho = torch.zeros_like(u) if robust else None
    eta = torch.zeros_like(t) if robust else None
    for it in range(iterations):
        # primal step: z - T K^T q, then prox of the group lasso
        g = -(y * lam)[..., None] * x  # d/dr_k of the loss term
        if robust:
            g = g + mu
        grad_u = sgn[None, :, None] * torch.einsum("ni,knd->kid", pats, g).repeat(1, 2, 1)
        grad_u = grad_u - torch.einsum("knj,nd->kjd", nu * c, x)
        if robust:
            grad_u = grad_u + rho
            t_new = t - tau_t * (nu.sum(1) - eta)
        z = u - tau_u[None, :, None] * grad_u
        norms = z.norm(dim=-1, keepdim=True)
        u_new = z * (1 - beta * tau_u[None, :, None] / norms.clamp_min(1e-30)).clamp_min(0.0)
        # dual step at the extrapolated point
        u_bar = 2 * u_new - u
        r_bar = torch.einsum("ni,kid->knd", pats, u_bar[:, :p] - u_bar[:, p:])
        a = lam + sig_loss * (1 - y * (r_bar * x).sum(-1))
        if robust:
            lam, mu = project_linf_cone(a, mu + sig_loss[None, :, None] * r_bar, eps, 1.0 / n)
            t_bar = 2 * t_new - t
            nu = (nu - sig_nu[None, :, None] * (c * torch.einsum("nd,kjd->knj", x, u_bar) - t_bar[:, None, :])).clamp_min(0)
            rho, eta = _swap(project_linf_cone(eta - sig_c * t_bar, rho + sig_c * u_bar, eps, None))
            t = t_new
        else:
            lam = a.clamp(0.0, 1.0 / n)
            nu = (nu - sig_nu[None, :, None] * c * torch.einsum("nd,kjd->knj", x, u_bar)).clamp_min(0)
        u = u_new
        if callback is not None and every and (it + 1) % every == 0:
            callback(it + 1, u)
    return u


def _swap(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return pair[1], pair[0]


# ------------------------------------------------------------------------------------------------
# the ordinary network and its certificate
# ------------------------------------------------------------------------------------------------


def linear_layers(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two bias-free ``nn.Linear`` layers of a one-hidden-layer ReLU network."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(layers) != 2 or any(lay.bias is not None for lay in layers):
        raise ValueError(
            "convex training needs a one-hidden-layer ReLU network without biases "
            "(ModelSpec('one-hidden-relu', {'hidden': 2 * classes * patterns}))"
        )
    return layers[0], layers[1]


@torch.no_grad()
def load_network(model: nn.Module, u: Tensor) -> None:
    """Write ``f_c(x) = Σ_i (xᵀv_i)₊ − (xᵀw_i)₊`` (one block of 2P neurons per class) into
    ``model``, each neuron balanced as ``(u/√‖u‖, ±√‖u‖)`` (zero neurons stay zero)."""
    first, second = linear_layers(model)
    k_cls, two_p, d = u.shape
    if first.weight.shape != (k_cls * two_p, d) or second.weight.shape != (k_cls, k_cls * two_p):
        raise ValueError(
            f"model has hidden width {first.weight.shape[0]}; convex training with {two_p // 2} patterns "
            f"and {k_cls} classes needs hidden = {k_cls * two_p}"
        )
    scale = u.norm(dim=-1).sqrt()  # [K, 2P]
    w1 = u / scale.clamp_min(1e-30)[..., None]
    sign = torch.cat([torch.ones(two_p // 2), -torch.ones(two_p // 2)]).to(u)
    w2 = torch.zeros(k_cls, k_cls * two_p, dtype=u.dtype, device=u.device)
    for cls in range(k_cls):
        w2[cls, cls * two_p : (cls + 1) * two_p] = sign * scale[cls]
    first.weight.copy_(w1.reshape(k_cls * two_p, d).to(first.weight))
    second.weight.copy_(w2.to(second.weight))


# ------------------------------------------------------------------------------------------------
# the defense: one-vs-rest convex training of a one-hidden-relu model
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConvexDefense(Defense):
    """One-vs-rest convex training (one binary program per class, shared patterns).

    The model must be ``one-hidden-relu`` with ``hidden = 2 · classes · P``; P, the number of
    sampled patterns, is read from it.  ``epochs`` is the number of points on the training
    curve (the solver runs ``iterations`` PDHG steps in all); training uses the first
    ``max_points`` training images.  The curve records the mean objective, the largest
    constraint violation and validation accuracy; the last point adds ``certified_acc``
    (the ``stable-relu`` verifier) on the first ``certify_points`` test images at ``certify_eps``
    (0: the training eps).
    """

    eps: float = setting(0.0, low=0.0, high=1.0)
    beta: float = setting(1e-2, low=0.0, low_open=True)
    iterations: int = setting(1000, low=1)
    max_points: int = setting(2000, low=2)
    omega: float = setting(100.0, low=0.0, low_open=True)
    certify_eps: float = setting(0.0, low=0.0, high=1.0)
    certify_points: int = setting(1000, low=0)
    epochs: int = setting(5, low=1, high=10_000)

    uses_autocast: ClassVar[bool] = False  # the solver runs in the data's precision

    def fit(self, model, data, *, device="cpu", progress=True, policy=None):
        device = policy.device if policy is not None else torch.device(device)
        start = time.perf_counter()
        k_cls = data.num_classes
        first, _ = linear_layers(model)
        hidden = first.weight.shape[0]
        if hidden % (2 * k_cls):
            raise ValueError(f"hidden width {hidden} must be a multiple of 2 · classes = {2 * k_cls}")
        gen = torch.Generator().manual_seed(self.seed)
        x = data.train.x[: self.max_points].flatten(1).to(device)
        labels = data.train.y[: self.max_points].to(device)
        y = torch.where(labels[None, :] == torch.arange(k_cls, device=device)[:, None], 1.0, -1.0).to(x)
        problem = ConvexProblem(x, y, sample_patterns(x, hidden // (2 * k_cls), gen).to(device), self.beta, self.eps)
        records = []
        every = max(1, self.iterations // self.epochs)
        last = [time.perf_counter()]

        def log(it, u):
            load_network(model.to(device), u)
            val = accuracy(model, data.val, device) if data.val is not None else None
            metrics = {"objective": float(problem.objective(u).mean()), "violation": float(problem.violation(u).max())}
            records.append(EpochRecord(len(records), metrics["objective"], val, time.perf_counter() - last[0], metrics))
            last[0] = time.perf_counter()

        log(0, torch.zeros(k_cls, hidden // k_cls, x.shape[1], dtype=x.dtype, device=device))  # feasible start
        u = solve(problem, every * self.epochs, callback=log, every=every, omega=self.omega)
        load_network(model, u)
        model.eval()
        ceps = self.certify_eps or self.eps
        if ceps > 0 and self.certify_points > 0:
            test = data.test.head(self.certify_points)
            cert = create_verifier("stable-relu").certify(
                model, test.x.to(device), test.y.to(device), ThreatModel(Norm.LINF, ceps)
            )
            records[-1].metrics.update({"certified_acc": float(cert.float().mean()), "certify_eps": ceps})
        return TrainLog(records, time.perf_counter() - start)

