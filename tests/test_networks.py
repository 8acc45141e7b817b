"""The CdSprites network computes the paper's function whatever its memory layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from domainbed_fish.gradients import mean_pairwise_inner_product, per_domain_gradients, per_domain_losses
from domainbed_fish.networks import CdSpritesCNN, WholeInputConv2d
from domainbed_fish.second_order import cheap_double_backward


class _NCHWCdSpritesCNN(CdSpritesCNN):
    MEMORY_FORMAT = torch.contiguous_format


def _reference_features(network: CdSpritesCNN, x: torch.Tensor) -> torch.Tensor:
    """The paper's five convolutions written out with ``F.conv2d`` on NCHW tensors."""
    convolutions = [m for m in network.layers if isinstance(m, nn.Conv2d)]
    for conv, padding in zip(convolutions, (1, 1, 1, 1, 0), strict=True):
        x = F.relu(F.conv2d(x, conv.weight.contiguous(), conv.bias, stride=2, padding=padding))
    return x.flatten(1)


def _twin_networks(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    channels_last = nn.Sequential(CdSpritesCNN((3, 64, 64)), nn.Linear(128, 2))
    nchw = nn.Sequential(_NCHWCdSpritesCNN((3, 64, 64)), nn.Linear(128, 2))
    nchw.load_state_dict(channels_last.state_dict())
    return channels_last, nchw


def test_the_layers_are_the_papers():
    """Shi et al., section 4.1: five 4×4 convolutions with stride 2, 3→32→32→64→128→128, padding
    1, 1, 1, 1, 0, each with a bias and followed by ReLU, no normalisation; 128 features."""
    network = CdSpritesCNN((3, 64, 64))
    layers = list(network.layers)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.ReLU] * 4 + [WholeInputConv2d, nn.ReLU, nn.Flatten]
    convolutions = layers[0:10:2]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convolutions] == [
        (3, 32, (4, 4), (2, 2), (1, 1)), (32, 32, (4, 4), (2, 2), (1, 1)), (32, 64, (4, 4), (2, 2), (1, 1)),
        (64, 128, (4, 4), (2, 2), (1, 1)), (128, 128, (4, 4), (2, 2), (0, 0))]
    assert all(c.bias is not None and c.dilation == (1, 1) and c.groups == 1 for c in convolutions)
    assert not [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)]
    assert network.n_outputs == 128 and network(torch.rand(2, 3, 64, 64)).shape == (2, 128)


def test_weights_and_activations_are_channels_last_and_the_features_are_the_papers():
    torch.manual_seed(0)
    network = CdSpritesCNN((3, 64, 64))
    convolutions = [m for m in network.layers if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convolutions] == [32, 32, 64, 128, 128]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convolutions)
    hidden = network.layers[:2](torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert hidden.shape == (2, 32, 32, 32) and hidden.is_contiguous(memory_format=torch.channels_last)

    x = torch.rand(5, 3, 64, 64)  # NCHW, as DomainBed's loaders give them
    features = network(x)
    assert features.shape == (5, 128)
    torch.testing.assert_close(features, _reference_features(network, x), rtol=1e-5, atol=1e-6)


def test_the_same_weights_train_alike_in_either_layout():
    channels_last, nchw = _twin_networks()
    x, y = torch.rand(16, 3, 64, 64), torch.randint(0, 2, (16,))
    for network in (channels_last, nchw):
        F.cross_entropy(network(x), y).backward()
    for (name, a), (_, b) in zip(channels_last.named_parameters(), nchw.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cheap", [False, True], ids=["pytorch", "cheap_double_backward"])
def test_idgm_second_order_gradient_is_the_same_in_either_layout(cheap):
    """∇Ĝ back-propagates through per-domain gradients: its convolution double backward
    must not depend on the layout (with PyTorch's formula or the plugin's)."""
    channels_last, nchw = _twin_networks(seed=1)
    torch.manual_seed(2)
    minibatches = [(torch.rand(8, 3, 64, 64), torch.randint(0, 2, (8,))) for _ in range(3)]
    results = []
    for network in (channels_last, nchw):
        params = list(network.parameters())
        with cheap_double_backward() if cheap else torch.enable_grad():
            losses = per_domain_losses(network, minibatches)
            gip = mean_pairwise_inner_product(per_domain_gradients(losses, params, create_graph=True))
            results.append((gip.detach(), torch.autograd.grad(gip, params)))
    (gip_cl, grads_cl), (gip_nchw, grads_nchw) = results
    assert gip_nchw.abs() > 0
    torch.testing.assert_close(gip_cl, gip_nchw, rtol=1e-4, atol=1e-9)
    for a, b in zip(grads_cl, grads_nchw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["NHWC", "NCHW"])
def test_whole_input_convolution_is_the_convolution(memory_format):
    """The last convolution as a matrix product: same values and gradients as ``F.conv2d``;
    inputs its kernel does not cover whole take ``Conv2d``'s own path."""
    torch.manual_seed(3)
    conv = WholeInputConv2d(128, 16, kernel_size=4, stride=2).to(memory_format=memory_format)
    x = torch.randn(6, 128, 4, 4).contiguous(memory_format=memory_format).requires_grad_()
    y = conv(x)
    reference_x = x.detach().clone().requires_grad_()
    reference = F.conv2d(reference_x, conv.weight.detach(), conv.bias.detach(), stride=2)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    assert y.shape == (6, 16, 1, 1)
    upstream = torch.randn_like(y)
    weight_grad, bias_grad, input_grad = torch.autograd.grad(y, (conv.weight, conv.bias, x), upstream)
    ref_input_grad, = torch.autograd.grad(reference, reference_x, upstream)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_grad, torch.einsum("no,nchw->ochw", upstream[:, :, 0, 0], x.detach()),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias_grad, upstream.sum((0, 2, 3)))

    larger = torch.randn(2, 128, 6, 6)  # 2×2 output positions: Conv2d's path
    torch.testing.assert_close(conv(larger), F.conv2d(larger, conv.weight, conv.bias, stride=2), rtol=1e-5, atol=1e-6)
    assert list(conv.state_dict()) == ["weight", "bias"]
    dilated = WholeInputConv2d(8, 4, kernel_size=4, dilation=2)  # a 4×4 input is too small for its 7×7 reach
    with pytest.raises(RuntimeError, match="Kernel size"):
        dilated(torch.randn(1, 8, 4, 4))
