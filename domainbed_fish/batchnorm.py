"""Train-mode batch normalisation with an analytic second derivative, for IDGM.

IDGM back-propagates through per-domain gradients (a double backward, see
:mod:`domainbed_fish.idgm`).  PyTorch composes the double backward of train-mode
batch norm from about 34 full-size elementwise products per layer: on a CPU it
took 46% of IDGM's double backward on ResNet-50.  Here the first backward is
PyTorch's own fused kernel and the second is the closed form below: per channel,
three reductions and two outputs, each a per-channel linear combination of
three full-size tensors.

Notation, per channel, over its ``M`` elements (batch × spatial positions):

    μ = mean(x),  σ² = mean((x − μ)²),  r = (σ² + ε)^(−1/2),  x̂ = (x − μ)·r,
    y = γ·x̂ + β.

Values, running statistics and first derivatives are PyTorch's own; only the
derivative of the backward pass is replaced.  :mod:`domainbed_fish.second_order`
routes train-mode ``F.batch_norm`` calls here (modules in eval mode, e.g.
DomainBed's ``freeze_bn``, are left to PyTorch: they are affine).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """A ``(C,)`` vector shaped to broadcast against an ``(N, C, *)`` tensor."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum([d for d in range(t.dim()) if d != 1])


def batch_norm_double_backward(
    u: Tensor | None,
    a: Tensor | None,
    b: Tensor | None,
    g: Tensor,
    x_centred: Tensor,
    rstd: Tensor,
    weight: Tensor,
    sum_g: Tensor,
    sum_gxhat: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Derivatives of the batch-norm backward pass, contracted with its cotangents.

    The backward pass maps the output gradient ``g`` to (PyTorch's kernel)

        g_x = γr·(g − mean(g) − x̂·mean(g·x̂)),  g_γ = Σ g·x̂,  g_β = Σ g.

    With cotangents ``u``, ``a``, ``b`` of ``g_x``, ``g_γ``, ``g_β`` (``None``:
    zero) and Φ = ⟨u, g_x⟩ + a·g_γ + b·g_β, this returns ``(∂Φ/∂g, ∂Φ/∂x, ∂Φ/∂γ)``:

        ∂Φ/∂g = γr·(u − mean(u) − x̂·mean(u·x̂)) + a·x̂ + b
        Q     = Σ u·g − Σu·Σg/M − Σu·x̂·Σg·x̂/M,      ∂Φ/∂γ = r·Q
        h     = −(γr/M)·(u·Σg·x̂ + g·Σu·x̂) + a·g     (∂Φ/∂x̂ at fixed r)
        ∂Φ/∂x = r·(h − mean(h) − x̂·mean(h·x̂)) − γQ·r²·x̂/M

    where x reaches Φ through x̂ and through r (∂r/∂x = −r²x̂/M).  The means of
    ``h`` and ``h·x̂`` are per-channel scalars, so each output is one per-channel
    linear combination of ``u``, ``g`` and ``x − μ`` (``x_centred``; x̂ is never
    materialised).  ``sum_g`` and ``sum_gxhat`` are Σg and Σg·x̂ (the backward
    pass's g_β and g_γ), per channel.
    """
    ndim = g.dim()
    m = g.numel() // g.size(1)

    def pc(t: Tensor) -> Tensor:
        return _per_channel(t, ndim)

    gamma_r = weight * rstd
    a = torch.zeros_like(rstd) if a is None else a
    b = torch.zeros_like(rstd) if b is None else b
    if u is None:
        sum_u = sum_uxhat = q = torch.zeros_like(rstd)
    else:
        sum_u = _channel_sum(u)
        sum_uxhat = _channel_sum(u * x_centred) * rstd
        q = _channel_sum(u * g) - (sum_u * sum_g + sum_uxhat * sum_gxhat) / m

    # ∂Φ/∂g = c_u·u + c_xhat·x̂ + c_1
    c_xhat = a - gamma_r * sum_uxhat / m
    d_g = torch.addcmul(pc(b - gamma_r * sum_u / m), x_centred, pc(c_xhat * rstd))
    if u is not None:
        d_g.addcmul_(u, pc(gamma_r))

    # h = k_u·u + k_g·g, so mean(h) and mean(h·x̂) follow from the channel sums.
    k_u = -gamma_r * sum_gxhat / m
    k_g = -gamma_r * sum_uxhat / m + a
    mean_h = (k_u * sum_u + k_g * sum_g) / m
    mean_hxhat = (k_u * sum_uxhat + k_g * sum_gxhat) / m
    coef_xhat = -rstd * mean_hxhat - weight * q * rstd.square() / m
    d_x = torch.addcmul(pc(-rstd * mean_h), g, pc(rstd * k_g))
    d_x.addcmul_(x_centred, pc(coef_xhat * rstd))
    if u is not None:
        d_x.addcmul_(u, pc(rstd * k_u))
    return d_g, d_x, rstd * q


class _BatchNormBackward(torch.autograd.Function):
    """(g, x, γ) ↦ (g_x, g_γ, g_β) by PyTorch's kernel, differentiable in closed form."""

    @staticmethod
    def forward(ctx: FunctionCtx, g: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                rstd: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        g_x, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, rstd, True, eps, [True, True, True]
        )
        ctx.save_for_backward(g, x, weight, mean, rstd, g_weight, g_bias)
        ctx.has_weight = weight is not None
        return g_x, g_weight, g_bias

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor | None, a: Tensor | None, b: Tensor | None) -> tuple[Any, ...]:
        g, x, weight, mean, rstd, sum_gxhat, sum_g = ctx.saved_tensors
        x_centred = x - _per_channel(mean, x.dim())
        gamma = weight if ctx.has_weight else torch.ones_like(rstd)
        d_g, d_x, d_weight = batch_norm_double_backward(u, a, b, g, x_centred, rstd, gamma, sum_g, sum_gxhat)
        return d_g, d_x, (d_weight if ctx.has_weight else None), None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """Train-mode ``F.batch_norm`` (PyTorch's kernels) whose backward is :class:`_BatchNormBackward`."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> Tensor:
        out, mean, rstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        g_x, g_weight, g_bias = _BatchNormBackward.apply(g, x, weight, mean, rstd, ctx.eps)
        return (g_x, g_weight if weight is not None else None, g_bias if ctx.has_bias else None,
                None, None, None, None)


def batch_norm_train(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None = None, bias: Tensor | None = None,
                     momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm(..., training=True)`` with the closed-form second derivative."""
    if x.numel() // x.size(1) <= 1:  # PyTorch's own error for one value per channel
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps)
