"""Exact references for the verifier tests, and the small networks they run on.

``milp_min_margin`` is the exact minimum of a margin over the Linf (or L1) ball ∩ [0, 1] by a MILP
(scipy/HiGHS) over the parsed computation graph: one binary per unstable ReLU and per max-pool
entry, big-M from interval bounds over the box that holds the ball; residual additions are
equalities.  It is independent of the bound propagators under test: it reads only each op's
forward map (its matrix, by pushing the basis through) and interval image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robustbench_lite.certify import parse_network
from robustbench_lite.certify._layers import AddOp, MaxPoolOp, ReLUOp


def _dense(op, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """The matrix and offset of a unary affine op, by pushing the basis through it."""
    basis = torch.cat([torch.zeros(1, n_in), torch.eye(n_in)]).double().reshape(n_in + 1, *op.in_shape)
    out = op.forward(basis).reshape(n_in + 1, -1).detach().numpy()
    return (out[1:] - out[0]).T, out[0]


def milp_min_margin(
    model: nn.Module, x: torch.Tensor, y: int, c: int, eps: float, norm: str = "linf",
) -> tuple[float, np.ndarray]:
    """Exact ``min f_y − f_c`` over the ball ∩ [0, 1]; returns (value, argmin)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    net = parse_network(model.eval(), x[None])
    lo0 = (x - eps).clamp(0, 1).flatten().numpy()
    hi0 = (x + eps).clamp(0, 1).flatten().numpy()
    var_lo, var_hi, integer, rows = list(lo0), list(hi0), [0] * lo0.size, []
    x0 = x.flatten().numpy()

    def new(lower, upper, is_int=0) -> np.ndarray:
        start = len(var_lo)
        var_lo.extend(np.atleast_1d(lower))
        var_hi.extend(np.atleast_1d(upper))
        integer.extend([is_int] * np.atleast_1d(lower).size)
        return np.arange(start, len(var_lo))

    def row(coefs: dict, low: float, up: float) -> None:
        rows.append((coefs, low, up))

    if norm == "l1":
        t = new(np.zeros(x0.size), np.full(x0.size, eps))
        for i in range(x0.size):
            row({int(t[i]): 1.0, i: -1.0}, -x0[i], np.inf)
            row({int(t[i]): 1.0, i: 1.0}, x0[i], np.inf)
        row({int(v): 1.0 for v in t}, -np.inf, eps)
    var = {0: np.arange(lo0.size)}
    box = {0: (lo0, hi0)}
    for k in range(1, len(net.nodes)):
        node = net.nodes[k]
        op = node.op
        ins = [var[i] for i in node.inputs]
        in_box = [box[i] for i in node.inputs]
        if isinstance(op, AddOp):
            lo, hi = in_box[0][0] + in_box[1][0], in_box[0][1] + in_box[1][1]
            out = new(lo, hi)
            for r in range(out.size):
                coefs = {int(out[r]): 1.0}
                for v in (ins[0][r], ins[1][r]):
                    coefs[int(v)] = coefs.get(int(v), 0.0) - 1.0
                row(coefs, 0.0, 0.0)
        elif op.affine:
            cur = ins[0]
            w, b = _dense(op, cur.size)
            t_lo, t_hi = op.interval(torch.tensor(in_box[0][0]).reshape(1, *op.in_shape),
                                     torch.tensor(in_box[0][1]).reshape(1, *op.in_shape))
            lo, hi = t_lo.detach().flatten().numpy(), t_hi.detach().flatten().numpy()
            out = new(lo, hi)
            for r in range(out.size):
                coefs = {int(out[r]): 1.0}
                for s in np.nonzero(w[r])[0]:
                    coefs[int(cur[s])] = coefs.get(int(cur[s]), 0.0) - w[r, s]
                row(coefs, b[r], b[r])
        elif isinstance(op, ReLUOp):
            cur, (lo, hi) = ins[0], in_box[0]
            out = new(np.maximum(lo, 0), np.maximum(hi, 0))
            for n in range(cur.size):
                z, a = int(cur[n]), int(out[n])
                if lo[n] >= 0:
                    row({a: 1.0, z: -1.0}, 0.0, 0.0)
                elif hi[n] > 0:
                    d = int(new(0, 1, 1)[0])
                    row({a: 1.0, z: -1.0}, 0.0, np.inf)  # a >= z
                    row({a: 1.0, z: -1.0, d: -lo[n]}, -np.inf, -lo[n])  # a <= z - l(1 - d)
                    row({a: 1.0, d: -hi[n]}, -np.inf, 0.0)  # a <= u d
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
        else:
            assert isinstance(op, MaxPoolOp)
            cur, (lo, hi) = ins[0], in_box[0]
            c_, h_, w_ = op.in_shape
            win = op.windows.numpy()
            out_lo, out_hi = [], []
            for ch in range(c_):
                for o in range(win.shape[0]):
                    idx = ch * h_ * w_ + win[o]
                    out_lo.append(lo[idx].max())
                    out_hi.append(hi[idx].max())
            out = new(np.array(out_lo), np.array(out_hi))
            for ch in range(c_):
                for o in range(win.shape[0]):
                    yv, idx = int(out[ch * win.shape[0] + o]), ch * h_ * w_ + win[o]
                    top = hi[idx].max()
                    ds = new(np.zeros(idx.size), np.ones(idx.size), 1)
                    row({int(d): 1.0 for d in ds}, 1.0, 1.0)
                    for d, i in zip(ds, idx, strict=True):
                        row({yv: 1.0, int(cur[i]): -1.0}, 0.0, np.inf)  # y >= z_i
                        row({yv: 1.0, int(cur[i]): -1.0, int(d): top - lo[i]}, -np.inf, top - lo[i])
            lo, hi = np.array(out_lo), np.array(out_hi)
        var[k], box[k] = out, (lo, hi)
    cur = var[len(net.nodes) - 1]
    cost = np.zeros(len(var_lo))
    cost[cur[y]] += 1.0
    cost[cur[c]] -= 1.0
    a_mat = np.zeros((len(rows), len(var_lo)))
    for r, (coefs, _, _) in enumerate(rows):
        for j, v in coefs.items():
            a_mat[r, j] += v
    res = milp(cost, integrality=np.array(integer), bounds=Bounds(np.array(var_lo), np.array(var_hi)),
               constraints=LinearConstraint(a_mat, [r[1] for r in rows], [r[2] for r in rows]),
               options={"mip_rel_gap": 1e-9})
    assert res.status == 0, res.message
    return float(res.fun), res.x[: x.numel()]


def margins(model: nn.Module, x: torch.Tensor, y: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(x.double())
    return out[:, y : y + 1] - out


# --------------------------------------------------------------------------------------------
# small networks
# --------------------------------------------------------------------------------------------


def mlp(seed: int, d: int, widths: tuple[int, ...], k: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip((d, *widths[:-1]), widths, strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], k)).double()


def _random_bn(bn: nn.Module) -> nn.Module:
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.2, 0.2)
    return bn


class ResidualMLP(nn.Module):
    """``x → Linear → ReLU → [h + Linear(ReLU(BN(Linear h)))] → ReLU → Linear``: a fully connected
    residual block with a batch norm (folded) and an identity shortcut."""

    def __init__(self, seed: int, d: int, width: int, k: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(d, width)
        self.fc1, self.bn = nn.Linear(width, width), _random_bn(nn.BatchNorm1d(width))
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, k)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        r = self.fc2(torch.relu(self.bn(self.fc1(h))))
        return self.out(torch.relu(h + r))


class ResidualCNN(nn.Module):
    """A conv stem, one residual block (3x3 conv, BN, ReLU, 3x3 conv, BN) with a strided 1x1-conv
    shortcut, global average pooling and a linear head: the structure of the small ResNets."""

    def __init__(self, seed: int, c: int = 2, k: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, stride=2, padding=1), _random_bn(nn.BatchNorm2d(c))
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), _random_bn(nn.BatchNorm2d(c))
        self.short = nn.Conv2d(c, c, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, k)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        r = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        out = torch.relu(r + self.short(h))
        return self.head(self.pool(out).flatten(1))


def trained(model: nn.Module, shape: tuple[int, ...], seed: int, steps: int = 150) -> nn.Module:
    """``model`` trained on three Gaussian blobs in ``[0, 1]^shape`` (a trained instance)."""
    gen = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    centres = torch.rand(3, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (300,), generator=gen)
    x = (centres[y] + 0.12 * torch.randn(300, d, generator=gen, dtype=torch.float64)).clamp(0, 1)
    model = model.double().train()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x.view(-1, *shape)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def random_mlp(seed: int, d: int, widths: tuple[int, ...], k: int = 3, std: float = 0.7) -> nn.Sequential:
    """A ReLU MLP with every weight and bias drawn from N(0, std²): random, but with decision
    boundaries inside [0, 1]^d (PyTorch's default init leaves one class everywhere)."""
    model = mlp(seed, d, widths, k)
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, 0.0, std)
    return model
