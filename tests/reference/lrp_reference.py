"""Slow LRP oracles written from the paper equations, with explicit ``z_ij`` loops (float64).

References: Bach et al. 2015 (ε), Montavon et al. 2017 (z⁺, z^B), Montavon et al. 2019 "Layer-wise
relevance propagation: an overview" (αβ, γ, w², flat). Every layer is seen as a dense affine map
``z_j = Σ_i x_i W_ji + b_j``: a convolution or a pooling layer is first turned into its dense
matrix (from its Jacobian), and its structural connectivity (for the flat rule) is taken from the
Jacobian of the same layer with all-ones weights.

A rule gives, for one sample, the contributions ``z_ij`` and the denominators ``z_j``, and
``R_i = Σ_j z_ij / stab(z_j) · R_j`` (αβ: two such terms, weighted by α and −β).

``stab(t) = t + ε`` for ``t ≥ 0``, ``t − ε`` otherwise (the library's definition).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Dense = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (W [out, in], b [out], connectivity mask)


def stab(t: float, eps: float) -> float:
    return t + eps if t >= 0 else t - eps


def _pos(v: float) -> float:
    return v if v > 0 else 0.0


def _neg(v: float) -> float:
    return v if v < 0 else 0.0


# --------------------------------------------------------------------------------------------
# Layers as dense maps
# --------------------------------------------------------------------------------------------


def dense_map(module: nn.Module, in_shape: tuple[int, ...]) -> Dense:
    """``(W, b, mask)`` of an affine layer acting on one sample of shape ``in_shape``."""
    module = module.double()
    x0 = torch.zeros(1, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        b = module(x0).reshape(-1).clone()

    def f(x: torch.Tensor) -> torch.Tensor:
        return (module(x.reshape(1, *in_shape)) - 0).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, x0.reshape(-1))
    mask = torch.ones_like(jac, dtype=torch.bool)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.fill_(1.0)
        mask = torch.autograd.functional.jacobian(f, x0.reshape(-1)) != 0
        with torch.no_grad():
            weight.copy_(saved)
    module.float()
    return jac, b, mask


def _loops(
    x: torch.Tensor,
    R: torch.Tensor,
    contrib: Callable[[int, int], float],
    denom_bias: Callable[[int], float],
    eps: float,
) -> torch.Tensor:
    """``R_i = Σ_j contrib(i, j) / stab(Σ_i' contrib(i', j) + denom_bias(j)) · R_j``."""
    n_in, n_out = x.numel(), R.numel()
    out = [0.0] * n_in
    for j in range(n_out):
        zj = sum(contrib(i, j) for i in range(n_in)) + denom_bias(j)
        s = float(R[j]) / stab(zj, eps)
        for i in range(n_in):
            out[i] += contrib(i, j) * s
    return torch.tensor(out, dtype=torch.float64)


def rule_dense(rule: str, x: torch.Tensor, dense: Dense, R: torch.Tensor, **p: float) -> torch.Tensor:
    """Relevance of the inputs of one sample (flat ``x``, flat ``R``) under ``rule``."""
    W, b, mask = dense
    W = W.tolist()
    b = b.tolist()
    m = mask.tolist()
    xs = x.reshape(-1).double().tolist()
    x_t = torch.tensor(xs)
    R = R.reshape(-1).double()
    eps = p.get("eps", 1e-6)
    if rule == "epsilon":
        return _loops(x_t, R, lambda i, j: xs[i] * W[j][i], lambda j: b[j], eps)
    if rule == "alphabeta":
        alpha, beta = p["alpha"], p["beta"]
        r_pos = _loops(x_t, R, lambda i, j: _pos(xs[i] * W[j][i]), lambda j: _pos(b[j]), eps)
        if beta == 0:
            return alpha * r_pos
        r_neg = _loops(x_t, R, lambda i, j: _neg(xs[i] * W[j][i]), lambda j: _neg(b[j]), eps)
        return alpha * r_pos - beta * r_neg
    if rule == "gamma":
        g = p["gamma"]
        return _loops(
            x_t, R, lambda i, j: xs[i] * (W[j][i] + g * _pos(W[j][i])), lambda j: b[j] + g * _pos(b[j]), eps
        )
    if rule == "wsquare":
        return _loops(x_t, R, lambda i, j: W[j][i] ** 2, lambda j: b[j] ** 2, eps)
    if rule == "flat":
        return _loops(x_t, R, lambda i, j: 1.0 if m[j][i] else 0.0, lambda j: 0.0, eps)
    if rule == "zbox":
        lo, hi = p["low"], p["high"]
        return _loops(
            x_t, R, lambda i, j: xs[i] * W[j][i] - lo * _pos(W[j][i]) - hi * _neg(W[j][i]), lambda j: 0.0, eps
        )
    raise ValueError(f"unknown reference rule {rule!r}")


def layer_relevance(
    rule: str, module: nn.Module, x: torch.Tensor, R: torch.Tensor, **p: float
) -> torch.Tensor:
    """Relevance of a batch of inputs ``x`` of an affine ``module`` (loop over samples)."""
    in_shape = tuple(x.shape[1:])
    dense = dense_map(module, in_shape)
    rows = [rule_dense(rule, x[n], dense, R[n], **p).reshape(in_shape) for n in range(x.shape[0])]
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Sequential nets
# --------------------------------------------------------------------------------------------


def sequential_relevance(
    model: nn.Sequential,
    x: torch.Tensor,
    rules: Callable[[int, nn.Module], tuple[str, dict[str, float]]],
    R_out: torch.Tensor,
) -> torch.Tensor:
    """LRP through an ``nn.Sequential``: affine layers use ``rules(index, module)``, element-wise
    activations pass relevance through, ``Flatten`` reshapes, max-pooling routes it by its
    gradient (winner takes all), and the affine maps of average pooling use ε."""
    acts = [x.double()]
    with torch.no_grad():
        for layer in model:
            acts.append(layer.double()(acts[-1]))
    model.float()
    R = R_out.double()
    for k in range(len(model) - 1, -1, -1):
        layer, a = model[k], acts[k]
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            name, params = rules(k, layer)
            R = layer_relevance(name, layer, a.float(), R, **params)
        elif isinstance(layer, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            R = layer_relevance("epsilon", layer, a.float(), R, eps=1e-6)
        elif isinstance(layer, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            a_req = a.clone().requires_grad_(True)
            (R,) = torch.autograd.grad(layer.double()(a_req), a_req, R)
            layer.float()
        elif isinstance(layer, nn.Flatten):
            R = R.reshape(a.shape)
        elif isinstance(layer, (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.BatchNorm1d, nn.BatchNorm2d)):
            pass
        else:
            raise TypeError(f"no reference for {type(layer).__name__}")
    return R
