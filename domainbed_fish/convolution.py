"""Convolution whose second derivative is four plain convolution passes, for IDGM.

IDGM back-propagates through per-domain gradients (:mod:`domainbed_fish.idgm`),
so every convolution's backward pass is itself differentiated.  PyTorch's
double backward for a convolution (``_convolution_double_backward``) expresses
two of its terms as convolutions with batch and channel axes swapped, or as
transposed convolutions: on a CPU that meant a contiguous copy of the swapped
tensors (1.7 s of a 20 s IDGM step on ResNet-50) and the slow reference kernel
for transposed convolutions (1.6 s).  Written with the linear maps involved,
every term is a forward convolution or one half of PyTorch's own
``convolution_backward`` on the original layouts.

For y = conv(x, w) + b the backward pass maps the output gradient g to

    g_x = J_xᵀ g,   g_w = J_wᵀ g,   g_b = Σ g   (over batch and positions),

where J_x: x ↦ conv(x, w) and J_w: w ↦ conv(x, w) are linear.  With cotangents
u, v, c of g_x, g_w, g_b and Φ = ⟨u, g_x⟩ + ⟨v, g_w⟩ + ⟨c, g_b⟩:

    ∂Φ/∂g = conv(u, w) + conv(x, v) + c        (J_x u + J_w v, c broadcast)
    ∂Φ/∂w = ∂⟨g, conv(u, w)⟩/∂w                 (the weight gradient of conv(u, ·) at g)
    ∂Φ/∂x = ∂⟨g, conv(x, v)⟩/∂x                 (the input gradient of conv(·, v) at g)

Values and first derivatives are PyTorch's own kernels; only the derivative of
the backward pass is replaced (differentiable twice, which is what IDGM needs,
not three times), and for 1×1 convolutions on a CPU the kernel is chosen
(:func:`_pointwise_on_onednn`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def _pointwise_on_onednn(x: Tensor, weight: Tensor, geometry: tuple) -> bool:
    """Whether this is a 1×1 convolution (stride 1, no padding, one group) of float32 images on a CPU.

    For those PyTorch's heuristic picks its reference ``thnn`` kernel on one thread at
    batch < 16, IDGM's per-domain case; oneDNN's computes the forward pass and the input
    gradient about twice as fast there (measured on ResNet-50's shapes, batch 8).  A 1×1
    convolution's input gradient is the 1×1 convolution with the transposed weight, so
    both run on ``torch.mkldnn_convolution``.
    """
    stride, padding, _, groups = geometry
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and groups == 1
            and weight.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            and torch.backends.mkldnn.is_available())


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, geometry: tuple) -> Tensor:
    stride, padding, dilation, groups = geometry
    if _pointwise_on_onednn(x, weight, geometry):
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_backward(g: Tensor, x: Tensor, weight: Tensor, geometry: tuple,
                   mask: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
    """The backward of ``conv(x, weight)`` at output gradient ``g``, for the parts in ``mask``:
    PyTorch's ``convolution_backward``, except a pointwise input gradient on oneDNN."""
    stride, padding, dilation, groups = geometry
    g_x = None
    if mask[0] and _pointwise_on_onednn(x, weight, geometry):
        g_x = _conv(g, weight.transpose(0, 1).contiguous(), None, geometry)
        mask = (False, mask[1], mask[2])
    if not any(mask):
        return g_x, None, None
    bias_sizes = [weight.size(0)] if mask[2] else None
    grads = torch.ops.aten.convolution_backward(
        g, x, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, list(mask)
    )
    return (grads[0] if g_x is None else g_x), grads[1], grads[2]


class _ConvolutionBackward(torch.autograd.Function):
    """(g, x, w) ↦ (g_x, g_w, g_b) by PyTorch's kernels, differentiable as in the module docstring."""

    @staticmethod
    def forward(ctx: FunctionCtx, g: Tensor, x: Tensor, weight: Tensor, geometry: tuple,
                mask: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
        ctx.save_for_backward(g, x, weight)
        ctx.geometry = geometry
        return _conv_backward(g, x, weight, geometry, mask)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor | None, v: Tensor | None, c: Tensor | None) -> tuple[Any, ...]:
        g, x, weight = ctx.saved_tensors
        geometry = ctx.geometry
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        d_g = d_x = d_w = None
        if need_g:
            terms = []
            if u is not None:
                terms.append(_conv(u, weight, None, geometry))
            if v is not None:
                terms.append(_conv(x, v, None, geometry))
            if c is not None:
                terms.append(c.view(1, -1, *([1] * (g.dim() - 2))).expand_as(g))
            d_g = sum(terms[1:], terms[0]) if terms else None
        if need_w and u is not None:
            d_w = _conv_backward(g, u, weight, geometry, (False, True, False))[1]
        if need_x and v is not None:
            d_x = _conv_backward(g, x, v, geometry, (True, False, False))[0]
        return d_g, d_x, d_w, None, None


class _Convolution(torch.autograd.Function):
    """``conv(x, w) + b`` (PyTorch's kernel) whose backward is :class:`_ConvolutionBackward`."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        ctx.has_bias = bias is not None
        return _conv(x, weight, bias, geometry)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        g_x, g_w, g_b = _ConvolutionBackward.apply(g, x, weight, ctx.geometry, mask)
        return g_x, g_w, g_b, None


def _as_tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


def convolution(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
                padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1) -> Tensor:
    """``F.conv{1,2,3}d`` (batched input, numeric padding) with the second derivative above."""
    n = weight.dim() - 2
    geometry = (_as_tuple(stride, n), _as_tuple(padding, n), _as_tuple(dilation, n), groups)
    return _Convolution.apply(x, weight, bias, geometry)
