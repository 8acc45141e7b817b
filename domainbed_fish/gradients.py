"""Per-domain gradients and the inter-domain gradient inner product (GIP).

Notation of Shi et al., "Gradient Matching for Domain Generalization" (ICLR 2022),
section 3: ``S`` training domains, per-domain loss ``L_s(θ)`` (cross-entropy on a
minibatch of domain ``s``) and per-domain gradient ``G_s = ∇_θ L_s``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Minibatches = Sequence[tuple[Tensor, Tensor]]
Gradients = Sequence[Tensor]  # one tensor per parameter


def require_minibatches(minibatches: Minibatches, algorithm: str) -> None:
    """Refuse an empty ``minibatches``, naming what ``update`` takes.

    Raises:
        ValueError: with the fix.
    """
    if len(minibatches) == 0:
        raise ValueError(f"{algorithm}.update() got no minibatches: pass a list with one (x, y) pair per "
                         "training domain, as DomainBed's train script does")


def per_domain_losses(network: nn.Module, minibatches: Minibatches) -> list[Tensor]:
    """``[L_1, …, L_S]``: the mean cross-entropy of each domain's minibatch.

    Each domain gets its own forward pass, so the backward pass of ``L_s`` only
    touches domain ``s``'s activations (and BatchNorm sees per-domain statistics,
    as in Fish's inner loop).
    """
    return [F.cross_entropy(network(x), y) for x, y in minibatches]


def per_domain_gradients(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    create_graph: bool = False,
) -> list[list[Tensor]]:
    """``[G_1, …, G_S]`` with ``G_s = ∇_θ L_s``, one list of tensors per domain.

    Parameters a loss does not depend on get zero gradients.  With
    ``create_graph=True`` the gradients stay differentiable, which exact IDGM
    needs to back-propagate through ``Ĝ``.
    """
    return [
        list(
            torch.autograd.grad(
                loss,
                params,
                create_graph=create_graph,
                retain_graph=create_graph,
                materialize_grads=True,
            )
        )
        for loss in losses
    ]


def mean_pairwise_inner_product(grads: Sequence[Gradients]) -> Tensor:
    """The gradient inner product ``Ĝ`` of the paper (its section 3.1).

    .. math::

        Ĝ = \\frac{2}{S(S-1)} \\sum_{i<j} G_i \\cdot G_j
          = \\frac{\\lVert \\sum_i G_i \\rVert^2 - \\sum_i \\lVert G_i \\rVert^2}{S(S-1)}

    The right-hand side costs ``S`` gradient-sized additions instead of the
    ``S(S-1)/2`` dot products of the left.  The result is differentiable when the
    gradients are (``create_graph=True``).  With fewer than two domains there is
    no pair and ``Ĝ`` is defined as 0.
    """
    num_domains = len(grads)
    if num_domains == 0:
        raise ValueError("mean_pairwise_inner_product needs at least one domain's gradients")
    reference = grads[0][0]
    if num_domains < 2:
        return reference.new_zeros(())
    total_sq = reference.new_zeros(())
    self_sq = reference.new_zeros(())
    for per_param in zip(*grads, strict=True):
        summed = per_param[0]
        for g in per_param[1:]:
            summed = summed + g
        total_sq = total_sq + summed.pow(2).sum()
        for g in per_param:
            self_sq = self_sq + g.pow(2).sum()
    return (total_sq - self_sq) / (num_domains * (num_domains - 1))


def gradient_inner_product(
    network: nn.Module, minibatches: Minibatches, params: Sequence[Tensor] | None = None
) -> Tensor:
    """Measure ``Ĝ`` of ``network`` at its current weights (no graph is kept).

    The caller is responsible for side effects of the forward passes (BatchNorm
    statistics, random number generators); see ``FishUpdater.measure_gip``.
    """
    params = [p for p in network.parameters() if p.requires_grad] if params is None else params
    grads = per_domain_gradients(per_domain_losses(network, minibatches), params)
    with torch.no_grad():
        return mean_pairwise_inner_product(grads)
