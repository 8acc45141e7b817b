"""The gradient inner product Ĝ against its definition, a double loop over pairs."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import domain_minibatches, idgm_config, tiny_net
from torch import nn

from domainbed_fish.gradients import (
    gradient_inner_product,
    mean_pairwise_inner_product,
    per_domain_gradients,
    per_domain_losses,
)
from domainbed_fish.idgm import IDGMUpdater


def brute_force_gip(grads) -> torch.Tensor:
    """2/(S(S−1)) Σ_{i<j} G_i·G_j, literally."""
    flat = [torch.cat([g.reshape(-1) for g in per_domain]) for per_domain in grads]
    pairs = list(itertools.combinations(range(len(flat)), 2))
    return sum(flat[i] @ flat[j] for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("num_domains", [2, 3, 5, 10])
def test_identity_matches_double_loop(num_domains):
    g = torch.Generator().manual_seed(num_domains)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(num_domains)]
    torch.testing.assert_close(mean_pairwise_inner_product(grads), brute_force_gip(grads), rtol=1e-12, atol=1e-12)


def test_two_domains_is_plain_dot_product():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 2.0])
    assert mean_pairwise_inner_product([[a], [b]]).item() == pytest.approx(-1 + 1 + 6)


def test_single_domain_has_no_pair():
    assert mean_pairwise_inner_product([[torch.ones(3)]]).item() == 0.0
    with pytest.raises(ValueError, match="at least one"):
        mean_pairwise_inner_product([])


def test_measured_on_a_network_matches_double_loop():
    net, batches = tiny_net(), domain_minibatches(num_domains=4)
    params = list(net.parameters())
    grads = per_domain_gradients(per_domain_losses(net, batches), params)
    measured = gradient_inner_product(net, batches)
    torch.testing.assert_close(measured, brute_force_gip(grads))
    assert all(p.grad is None for p in params), "measuring must not accumulate .grad"


def test_frozen_parameters_are_left_out_and_unused_ones_get_zero_gradients():
    """Ĝ is measured over the trainable parameters (a frozen layer, as in a frozen featurizer,
    is skipped, not an autograd error); a parameter no loss depends on gets a zero gradient,
    and IDGM's update then trains the rest and leaves both alone."""
    net, batches = tiny_net(), domain_minibatches(num_domains=3)
    net[0].requires_grad_(False)
    net.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=torch.float64)))  # Sequential never calls it
    trainable = [net[2].weight, net[2].bias]
    grads = per_domain_gradients(per_domain_losses(net, batches), trainable)
    torch.testing.assert_close(gradient_inner_product(net, batches), brute_force_gip(grads))
    for (g,) in per_domain_gradients(per_domain_losses(net, batches), [net.unused]):
        assert torch.equal(g, torch.zeros(3, dtype=torch.float64))

    before = {k: v.clone() for k, v in net.state_dict().items()}
    IDGMUpdater(net, idgm_config(idgm_gamma=0.7, idgm_penalty_anneal_iters=0)).step(batches)
    after = net.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["2.weight", "2.bias"]
