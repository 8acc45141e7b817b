"""IDGM: exact inter-domain gradient matching (Shi et al., ICLR 2022, section 3.1).

Minimise

    L_idgm(θ) = L_erm(θ) − γ Ĝ(θ),   L_erm = (1/S) Σ_s L_s,
    Ĝ = 2/(S(S−1)) Σ_{i<j} G_i·G_j,  G_s = ∇_θ L_s,

whose gradient ∇L_idgm = Ḡ − γ∇Ĝ needs Hessian-vector products: ∇Ĝ is obtained by
back-propagating through the per-domain gradients (double backward).  The cost
is linear in S: S per-domain forward/backward passes (kept differentiable) and
one double backward for all domains together, never a backward through the
whole batch once per domain.  Batch norm, convolutions and ReLUs get explicit
second derivatives that PyTorch's CPU kernels run faster
(:mod:`domainbed_fish.second_order`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from domainbed_fish.buffers import buffers_restored_on_error
from domainbed_fish.errors import NonFiniteLossError
from domainbed_fish.gradients import (
    Minibatches,
    mean_pairwise_inner_product,
    per_domain_gradients,
    per_domain_losses,
    require_minibatches,
)
from domainbed_fish.hparams import IDGMConfig
from domainbed_fish.optim import make_optimizer, reset_optimizer_state, step_metric
from domainbed_fish.second_order import cheap_double_backward


@dataclass
class IDGMGradient:
    """∇_θ(L_erm − γ_t Ĝ) and the values it was computed from (all detached)."""

    grads: list[Tensor]
    nll: Tensor  # L_erm
    gip: Tensor  # Ĝ
    gamma: Tensor  # γ_t, the weight used (γ unless the bound lowered it)
    objective: Tensor  # L_erm − γ_t Ĝ


def _global_norm(tensors: Sequence[Tensor], metric: Sequence[Tensor] | None = None) -> Tensor:
    """‖x‖, or ‖x‖_W = (Σ W x²)^½ for a diagonal ``metric`` W."""
    if metric is None:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))
    weighted = torch._foreach_mul(list(tensors), list(tensors))
    torch._foreach_mul_(weighted, list(metric))
    return torch.stack([w.sum() for w in weighted]).sum().sqrt()


def bounded_gamma(gamma: float, bound: float, mean_grad_norm: Tensor, gip_grad_norm: Tensor) -> Tensor:
    """γ_t = min(γ, ρ‖Ḡ‖/‖∇Ĝ‖): the largest weight ≤ γ whose penalty gradient is ≤ ρ‖Ḡ‖.

    L_erm − γĜ is unbounded below (Ĝ grows with the gradients; README, "IDGM that does not
    run away"), and an
    adaptive optimizer follows even a tiny penalty gradient once the cross-entropy
    is near zero.  Keeping ‖γ_t∇Ĝ‖ ≤ ρ‖Ḡ‖ with ρ < 1 makes every step a descent
    direction of L_erm (Ḡ·(Ḡ − γ_t∇Ĝ) ≥ (1 − ρ)‖Ḡ‖² > 0): the penalty steers among
    descent directions but never reverses ERM's progress.  The norms may be taken in
    the metric ‖x‖²_W = Σ W x² of the optimizer's step W(Ḡ − γ_t∇Ĝ) (Cauchy–Schwarz
    in ⟨·,·⟩_W gives the same guarantee for the step actually taken; see
    :func:`domainbed_fish.optim.step_metric`).  The guarantee is first order and for this
    step's gradient: with momentum (Adam's β₁, SGD's) the step taken also carries earlier
    gradients, and may climb L_erm as ERM's own steps sometimes do.  ``bound = inf`` is the
    fixed-γ objective.
    """
    if gamma == 0.0 or bound == float("inf"):
        return mean_grad_norm.new_tensor(gamma)
    limit = bound * mean_grad_norm / gip_grad_norm
    return torch.where(gip_grad_norm > 0, limit.clamp(max=gamma), limit.new_tensor(gamma))


def idgm_gradient(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    gamma: float,
    bound: float = float("inf"),
    metric: Callable[[Sequence[Tensor]], Sequence[Tensor] | None] | None = None,
    gip_metric: Callable[[Sequence[Tensor]], Sequence[Tensor] | None] | None = None,
) -> IDGMGradient:
    """The gradient of the IDGM objective from the per-domain losses ``[L_1, …, L_S]``.

    ∇(L_erm − γĜ) = Ḡ − γ∇Ĝ.  Cost: S first-order backward passes
    (differentiable when γ ≠ 0) and one double backward shared by all domains,
    never one per domain or per pair.  Ḡ = Σ/S with Σ = Σ_s G_s reuses the
    per-domain gradients; Ĝ = (‖Σ‖² − Σ_s ‖G_s‖²)/(S(S−1)) has
    ∂Ĝ/∂G_s = 2(Σ − G_s)/(S(S−1)), so instead of building a graph for Ĝ one
    ``autograd.grad`` call seeds every G_s with ∂Ĝ/∂G_s and autograd adds the
    Hessian-vector products into ∇Ĝ in a single traversal.  With a finite
    ``bound`` ρ, γ is lowered to :func:`bounded_gamma` for this step, its norms taken
    in ``metric(Ḡ)`` (diagonal weights per parameter; Euclidean when absent).  With
    ``gamma == 0`` no graph is kept and this is ERM's gradient plus the
    diagnostic Ĝ.  With ``gip_metric``, Ĝ is :func:`metric_gip` in the weights
    ``gip_metric(Ḡ)``, held constant.
    """
    num_domains = len(losses)
    second_order = gamma != 0.0 and num_domains > 1
    grads = per_domain_gradients(losses, params, create_graph=second_order)
    nll = torch.stack([loss.detach() for loss in losses]).mean()
    with torch.no_grad():
        summed = [g.detach() for g in grads[0]] if num_domains == 1 else torch._foreach_add(grads[0], grads[1])
        for g in grads[2:]:
            torch._foreach_add_(summed, g)
        mean_grad = torch._foreach_div(summed, float(num_domains))
        gip_weights = gip_metric(mean_grad) if gip_metric is not None else None
        gip = _gip_from_sum(summed, grads, gip_weights)
    if second_order:
        scale = 2.0 / (num_domains * (num_domains - 1))
        seeds = []
        with torch.no_grad():
            for g in grads:
                seed = torch._foreach_sub(summed, g)
                torch._foreach_mul_(seed, scale)
                if gip_weights is not None:  # ∂Ĝ_W/∂G_s = W·2(Σ − G_s)/(S(S−1))
                    torch._foreach_mul_(seed, list(gip_weights))
                seeds += seed
        # Gradients that do not depend on θ (materialised zeros) have no graph to seed.
        pairs = [(t, seed) for t, seed in zip((t for g in grads for t in g), seeds, strict=True) if t.requires_grad]
        if pairs:
            outputs, grad_outputs = zip(*pairs, strict=True)
            gip_grads = list(torch.autograd.grad(outputs, params, grad_outputs, materialize_grads=True))
        else:
            gip_grads = [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            weights = metric(mean_grad) if metric is not None else None
            gamma_t = bounded_gamma(
                gamma, bound, _global_norm(mean_grad, weights), _global_norm(gip_grads, weights)
            )
            torch._foreach_add_(mean_grad, torch._foreach_mul(gip_grads, -gamma_t))
    else:
        gamma_t = gip.new_tensor(gamma if num_domains > 1 else 0.0)  # one domain: no pair, no penalty
    return IDGMGradient(grads=mean_grad, nll=nll, gip=gip, gamma=gamma_t, objective=nll - gamma_t * gip)


def metric_gip(grads: Sequence[Sequence[Tensor]], weights: Sequence[Tensor]) -> Tensor:
    """Ĝ_W = 2/(S(S−1)) Σ_{i<j} G_iᵀ W G_j: the mean pairwise inner product in a diagonal metric W.

    With W = 1/(√v̂ + eps), the scaling of Adam's next step (:func:`domainbed_fish.optim.step_metric`),
    this is the alignment Fish with an inner Adam rewards.  Expanding Fish's outer step
    to second order in the inner step α, as for the paper's Theorem 3.1 (Shi et al.,
    ICLR 2022) but with the inner step −αW g, the domains in a uniformly
    random order, W constant over the S inner steps and no momentum
    (checked in ``tests/test_idgm.py``):
    E[θ̃ − θ] = −αSW ∇(L_erm − γ Ĝ_W) + O(α³) with γ = α(S − 1)/4.  Differentiable in
    ``grads`` (W is a constant); with W = 1 it is :func:`~domainbed_fish.gradients.mean_pairwise_inner_product`.
    """
    num_domains = len(grads)
    if num_domains < 2:
        raise ValueError(f"the gradient inner product needs at least 2 domains, got {num_domains}")
    total = 0.0
    for i in range(num_domains):
        for j in range(i + 1, num_domains):
            total = total + sum((w * a * b).sum() for w, a, b in zip(weights, grads[i], grads[j], strict=True))
    return total * (2.0 / (num_domains * (num_domains - 1)))


def _gip_from_sum(
    summed: Sequence[Tensor], grads: Sequence[Sequence[Tensor]], weights: Sequence[Tensor] | None = None
) -> Tensor:
    """Ĝ = (‖Σ_s G_s‖² − Σ_s ‖G_s‖²)/(S(S−1)) from the summed gradients (no graph); norms
    in the diagonal metric ``weights`` when given."""
    num_domains = len(grads)
    if num_domains < 2:
        return summed[0].new_zeros(())

    def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
        if weights is not None:
            return _global_norm(tensors, weights).square()
        return torch.stack(torch._foreach_norm(list(tensors))).square().sum()

    self_sq = sum(squared_norm(g) for g in grads)
    return (squared_norm(summed) - self_sq) / (num_domains * (num_domains - 1))


def idgm_objective(network: nn.Module, minibatches: Minibatches, gamma: float) -> Tensor:
    """L_erm − γĜ as a differentiable scalar (for tests and analysis; training uses
    :func:`idgm_gradient`, which avoids a second first-order backward)."""
    params = [p for p in network.parameters() if p.requires_grad]
    losses = per_domain_losses(network, minibatches)
    grads = per_domain_gradients(losses, params, create_graph=True)
    return torch.stack(losses).mean() - gamma * mean_pairwise_inner_product(grads)


class IDGMUpdater:
    """IDGM's update on ``network``: γ bounded per step (:func:`bounded_gamma`), with
    DomainBed-style penalty annealing.

    For the first ``penalty_anneal_iters`` steps γ = 0 (plain ERM on per-domain
    minibatches); at the switch the optimizer's state is reset, as DomainBed's IRM
    and VREx do, because the gradient magnitudes jump.
    """

    def __init__(self, network: nn.Module, config: IDGMConfig):
        self.network = network
        self.config = config
        self.optimizer = make_optimizer(
            config.optimizer, network.parameters(), config.lr, config.weight_decay, config.momentum
        )
        self.num_updates = 0

    @property
    def penalty_weight(self) -> float:
        on = self.num_updates >= self.config.penalty_anneal_iters
        return self.config.gamma if on else 0.0

    def step(self, minibatches: Minibatches) -> dict[str, float]:
        """One update on ``[(x_1, y_1), …, (x_S, y_S)]``; returns the objective, ``nll``,
        ``gip`` (Ĝ) and ``penalty_weight`` (γ_t)."""
        require_minibatches(minibatches, "IDGM")
        c = self.config
        if self.num_updates == c.penalty_anneal_iters and c.penalty_anneal_iters > 0:
            reset_optimizer_state(self.optimizer)
        gamma = self.penalty_weight
        params = [p for p in self.network.parameters() if p.requires_grad]

        with buffers_restored_on_error(self.network, NonFiniteLossError):
            # ∇Ĝ differentiates every layer's backward pass; graphs built here get explicit
            # second derivatives for batch norm, convolutions and ReLU (same values).
            with cheap_double_backward():
                losses = per_domain_losses(self.network, minibatches)
            self._check_finite(torch.stack([loss.detach() for loss in losses]), "loss")
            # The bound is measured in the metric of the step the optimizer will take.
            in_step_metric = functools.partial(step_metric, self.optimizer, params)
            metric = in_step_metric if c.bound_metric == "optimizer" else None
            gip_metric = in_step_metric if c.gip_metric == "optimizer" else None
            result = idgm_gradient(losses, params, gamma, c.penalty_bound, metric, gip_metric)
            self._check_finite(result.objective.reshape(1), "objective L_erm − γĜ")

        for p, g in zip(params, result.grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.num_updates += 1
        return {
            "loss": result.objective.item(),
            "nll": result.nll.item(),
            "gip": result.gip.item(),
            "penalty_weight": result.gamma.item(),
        }

    def _check_finite(self, values: Tensor, what: str) -> None:
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        bad = int((~finite).nonzero()[0, 0])
        domain = bad if what == "loss" else None
        raise NonFiniteLossError("IDGM", self.num_updates, domain, float(values[bad]), what)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the network: the step count and the optimizer."""
        return {"num_updates": self.num_updates, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the network is loaded by its owner); the optimizer
        gets a copy, so that a state dict loaded in memory shares no moments with its source."""
        self.num_updates = int(state["num_updates"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
