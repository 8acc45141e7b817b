"""The closed-form second derivative of train-mode BatchNorm, against PyTorch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_routing_keeps_idgm_gradient, domain_minibatches
from torch import nn

from domainbed_fish.batchnorm import batch_norm_train
from domainbed_fish.idgm import IDGMUpdater
from domainbed_fish.second_order import cheap_double_backward

CASES = [((4, 3, 5, 5), True), ((6, 4), True), ((3, 2, 7), True), ((4, 3, 5, 5), False)]


def _inputs(shape, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    if not affine:
        return x, None, None
    weight = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=g, dtype=torch.float64).requires_grad_()
    return x, weight, bias


@pytest.mark.parametrize(("shape", "affine"), CASES)
def test_values_and_running_statistics_are_pytorchs(shape, affine):
    x, weight, bias = _inputs(shape, affine)
    stats = [(torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)) for _ in range(2)]
    expected = F.batch_norm(x, *stats[0], weight, bias, True, 0.3, 1e-5)
    ours = batch_norm_train(x, *stats[1], weight, bias, 0.3, 1e-5)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    for a, b in zip(stats[0], stats[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(stats[0][0], torch.zeros(shape[1], dtype=torch.float64))  # they did move


@pytest.mark.parametrize(("shape", "affine"), CASES)
def test_double_backward_matches_pytorchs(shape, affine):
    x, weight, bias = _inputs(shape, affine)
    inputs = [t for t in (x, weight, bias) if t is not None]
    outer = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def double_backward(norm):
        y = norm(x, None, None, weight, bias)
        # A non-linear loss, so the output gradient depends on x, γ and β.
        grads = torch.autograd.grad((outer.sin() * y * y).sum(), inputs, create_graph=True)
        seeds = [torch.randn(g.shape, generator=torch.Generator().manual_seed(10 + i), dtype=g.dtype)
                 for i, g in enumerate(grads)]
        return torch.autograd.grad(grads, inputs, seeds)

    expected = double_backward(lambda *a: F.batch_norm(*a, training=True))
    ours = double_backward(batch_norm_train)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(t.abs().max() for t in expected) > 1e-2  # not a comparison of zeros


@pytest.mark.parametrize(("shape", "affine"), CASES)
def test_gradgradcheck(shape, affine):
    x, weight, bias = _inputs(shape, affine)
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def norm(*args):
        return batch_norm_train(args[0], None, None, *(args[1:] if affine else (None, None)))

    assert torch.autograd.gradgradcheck(norm, inputs)


def test_mode_takes_train_mode_batchnorm_only():
    layer = nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    with cheap_double_backward():
        train_out = layer(x)
        layer.eval()
        eval_out = layer(x)
    assert type(train_out.grad_fn).__name__ == "_BatchNormTrainBackward"
    assert type(eval_out.grad_fn).__name__ == "NativeBatchNormBackward0"
    assert type(layer.train()(x).grad_fn).__name__ == "NativeBatchNormBackward0"  # outside: PyTorch's


def test_mode_keeps_a_layers_momentum_and_eps():
    """A layer's own momentum and eps reach the routed batch norm: its values and running
    statistics are PyTorch's (the defaults 0.1 and 1e-5 would hide a dropped argument)."""
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    layers = [nn.BatchNorm1d(3, momentum=0.6, eps=0.5).double() for _ in range(2)]
    expected = layers[0](x)
    with cheap_double_backward():
        routed = layers[1](x)
    assert type(routed.grad_fn).__name__ == "_BatchNormTrainBackward"
    torch.testing.assert_close(routed, expected, rtol=0, atol=0)
    for (name, a), b in zip(layers[1].state_dict().items(), layers[0].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_one_value_per_channel_is_pytorchs_error():
    with cheap_double_backward(), pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(torch.randn(1, 3))


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_idgm_gradient_through_batchnorm_is_unchanged():
    assert_routing_keeps_idgm_gradient(_bn_net, domain_minibatches(num_domains=3))


def test_idgm_step_builds_its_graph_with_the_closed_form():
    from conftest import idgm_config

    net = _bn_net()
    seen = []
    net[1].register_forward_hook(lambda module, args, out: seen.append(type(out.grad_fn).__name__))
    IDGMUpdater(net, idgm_config(idgm_gamma=0.7, idgm_penalty_anneal_iters=0)).step(domain_minibatches())
    assert seen == ["_BatchNormTrainBackward"] * 3
