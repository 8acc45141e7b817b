"""Convolution and ReLU with explicit second derivatives, against PyTorch's own,
and the context that routes a network's layers to them inside IDGM's step."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_routing_keeps_idgm_gradient, idgm_config
from torch import nn

from domainbed_fish.convolution import _pointwise_on_onednn, convolution
from domainbed_fish.idgm import IDGMUpdater
from domainbed_fish.relu import relu
from domainbed_fish.second_order import cheap_double_backward

# (input shape, weight shape, geometry): strided, padded, dilated, grouped, 1-D, 3-D, 1×1.
CONV_CASES = [
    ((3, 4, 9, 9), (6, 4, 3, 3), dict(stride=2, padding=1)),
    ((2, 4, 8, 8), (6, 2, 3, 3), dict(padding=(1, 2), dilation=2, groups=2)),
    ((2, 3, 11), (5, 3, 4), dict(stride=3)),
    ((2, 2, 5, 4, 4), (3, 2, 2, 3, 2), dict(stride=(1, 2, 1), padding=1)),
    ((2, 4, 7, 7), (8, 4, 1, 1), {}),
]
PYTORCH_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _conv_inputs(shape, weight_shape, bias, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(*weight_shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(weight_shape[0], generator=g, dtype=torch.float64).to(device).requires_grad_() if bias else None
    return x, w, b


def _value_grads_and_double_backward(fn, inputs):
    """y, ∇ of a non-linear loss of y, and the gradient of ⟨∇, random seeds⟩."""
    y = fn(*inputs)
    outer = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    grads = torch.autograd.grad((outer.sin() * y * y).sum(), inputs, create_graph=True)
    seeds = [torch.randn(g.shape, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64).to(g)
             for i, g in enumerate(grads)]
    return [y, *grads, *torch.autograd.grad(grads, inputs, seeds)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("shape", "weight_shape", "geometry"), CONV_CASES)
def test_convolution_matches_pytorch_to_second_order(shape, weight_shape, geometry, bias, device):
    x, w, b = _conv_inputs(shape, weight_shape, bias, device=device)
    inputs = [t for t in (x, w, b) if t is not None]

    def ours(*t):
        return convolution(t[0], t[1], t[2] if bias else None, **geometry)

    def pytorchs(*t):
        return PYTORCH_CONV[len(shape)](t[0], t[1], t[2] if bias else None, **geometry)

    expected = _value_grads_and_double_backward(pytorchs, inputs)
    got = _value_grads_and_double_backward(ours, inputs)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11)
    assert min(t.abs().max() for t in expected) > 1e-2  # not a comparison of zeros


@pytest.mark.parametrize(("shape", "weight_shape", "geometry"), CONV_CASES[:3])
def test_convolution_gradgradcheck(shape, weight_shape, geometry):
    inputs = _conv_inputs(shape, weight_shape, bias=True)
    assert torch.autograd.gradgradcheck(lambda *t: convolution(*t, **geometry), inputs)


requires_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _geometry(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return stride, padding, dilation, groups


@requires_onednn
def test_only_cpu_float32_pointwise_convolutions_take_onednn():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 1, 1)
    assert _pointwise_on_onednn(x, w, _geometry())
    assert _pointwise_on_onednn(x, w, _geometry(dilation=(2, 2)))  # no effect on a 1×1 kernel
    assert not _pointwise_on_onednn(x.double(), w.double(), _geometry())
    assert not _pointwise_on_onednn(x, torch.randn(6, 4, 3, 3), _geometry())
    assert not _pointwise_on_onednn(x, w, _geometry(stride=(2, 2)))
    assert not _pointwise_on_onednn(x, w, _geometry(padding=(1, 0)))
    assert not _pointwise_on_onednn(x, torch.randn(6, 2, 1, 1), _geometry(groups=2))
    assert not _pointwise_on_onednn(torch.randn(2, 4, 5), torch.randn(6, 4, 1), ((1,), (0,), (1,), 1))


@requires_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_convolution_on_onednn_matches_pytorch_to_second_order(bias):
    """The float32 1×1 path (oneDNN for the forward pass and input gradients) against
    PyTorch's double backward in float64."""
    x, w, b = _conv_inputs((3, 8, 5, 5), (6, 8, 1, 1), bias)
    inputs64 = [t for t in (x, w, b) if t is not None]
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    expected = _value_grads_and_double_backward(lambda *t: F.conv2d(*t), inputs64)
    got = _value_grads_and_double_backward(lambda *t: convolution(*t), inputs32)
    for a, e in zip(got, expected, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)
    assert min(t.abs().max() for t in expected) > 1e-2


@requires_onednn
def test_pointwise_convolution_avoids_the_reference_kernel():
    """What the path is for: at batch < 16 on one thread PyTorch runs 1×1 convolutions on
    its reference kernel (``_slow_conv2d_*``); this path's forward, input gradients and
    double backward use oneDNN, and only the weight gradient stays PyTorch's choice."""
    from torch.profiler import profile

    x = torch.randn(8, 16, 6, 6, requires_grad=True)
    w = torch.randn(32, 16, 1, 1, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile() as prof:
            y = convolution(x, w)
            gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
            torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w))
    finally:
        torch.set_num_threads(threads)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::mkldnn_convolution", 0) >= 5  # y, g_x, and three in the double backward
    assert "aten::_slow_conv2d_forward" not in calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_relu_matches_pytorch_to_second_order(inplace, device):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def network(act):
        # The pre-activation is a fresh tensor, so the in-place variant is legal.
        return lambda weight: act(x0 @ weight, inplace=inplace)

    expected = _value_grads_and_double_backward(network(F.relu), [w])
    got = _value_grads_and_double_backward(network(relu), [w])
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert (expected[0] == 0).any() and (expected[0] > 0).any()  # both sides of the kink


def test_relu_second_derivative_materialises_no_zeros():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = relu(x)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert type(gx.grad_fn).__name__ != "ThresholdBackwardBackward0"
    assert torch.autograd.gradgradcheck(relu, (torch.randn(7, dtype=torch.float64, requires_grad=True),))


def test_context_routes_layers_and_leaves_the_rest_to_pytorch():
    conv, same = nn.Conv2d(2, 3, 3, padding=1).double(), nn.Conv2d(2, 3, 3, padding="same").double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with cheap_double_backward():
        routed = [conv(x), F.relu(x.requires_grad_()), torch.relu(x), nn.ReLU(inplace=True)(x * 1)]
        unrouted = [same(x), conv(x[0]), torch.tanh(x)]
    names = [type(t.grad_fn).__name__ for t in routed]
    assert names == ["_ConvolutionBackward", "_ReLUBackward", "_ReLUBackward", "_ReLUBackward"]
    assert [type(t.grad_fn).__name__ for t in unrouted] == [
        "ConvolutionBackward0", "SqueezeBackward1", "TanhBackward0"]
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # outside: PyTorch's


def test_routed_convolutions_keep_their_geometry():
    """Stride, padding, dilation and groups reach the routed convolution, from a module's
    positional call and from keywords: the values are PyTorch's (a dropped dilation would
    change only the output's size, which a pooling layer hides)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double()
    geometry = dict(stride=(1, 2), padding=(3, 1), dilation=(3, 1), groups=2)
    expected = [conv(x), F.conv2d(x, conv.weight, conv.bias, **geometry)]
    with cheap_double_backward():
        routed = [conv(x), F.conv2d(x, conv.weight, conv.bias, **geometry)]
    for a, e in zip(routed, expected, strict=True):
        assert type(a.grad_fn).__name__ == "_ConvolutionBackward"
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_routed_inplace_relu_overwrites_its_input_as_pytorchs_does():
    """``nn.ReLU(inplace=True)`` inside the mode rectifies its input tensor itself, and a later
    use of that tensor differentiates through the ReLU, to second order, as PyTorch's does."""
    gen = torch.Generator().manual_seed(0)
    x0, w0 = (torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64))

    def run(routed):
        w = w0.clone().requires_grad_()
        with cheap_double_backward() if routed else contextlib.nullcontext():
            h = x0 @ w
            nn.ReLU(inplace=True)(h)  # result unused: h itself is rectified
            # sin: its derivative is 1, not 0, where the ReLU zeroed h, so the mask matters.
            (grad,) = torch.autograd.grad((h.sin() + h * h).sum(), w, create_graph=True)
        return [h.detach(), grad, *torch.autograd.grad(grad.sin().sum(), w)]

    expected = run(False)
    assert (expected[0] == 0).any()
    for a, e in zip(run(True), expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _conv_net(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).to(device=device, dtype=torch.float64)


def _image_batches(num_domains=3, batch=5, device="cpu"):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64).to(device),
             torch.randint(0, 3, (batch,), generator=g).to(device)) for _ in range(num_domains)]


@pytest.mark.parametrize("device", DEVICES)
def test_idgm_gradient_of_a_conv_net_is_pytorchs(device):
    assert_routing_keeps_idgm_gradient(functools.partial(_conv_net, device=device), _image_batches(device=device))


def test_idgm_step_builds_its_graph_through_the_routed_layers():
    net = _conv_net()
    seen = []
    for index in (0, 1, 2, 3):
        net[index].register_forward_hook(lambda module, args, out: seen.append(type(out.grad_fn).__name__))
    IDGMUpdater(net, idgm_config(idgm_gamma=0.7, idgm_penalty_anneal_iters=0)).step(_image_batches())
    assert seen == ["_ConvolutionBackward", "_BatchNormTrainBackward", "_ReLUBackward", "_ConvolutionBackward"] * 3
