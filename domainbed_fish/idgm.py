"""IDGM: exact inter-domain gradient matching (Shi et al., ICLR 2022, section 3.1).

Minimise

    L_idgm(θ) = L_erm(θ) − γ Ĝ(θ),   L_erm = (1/S) Σ_s L_s,
    Ĝ = 2/(S(S−1)) Σ_{i<j} G_i·G_j,  G_s = ∇_θ L_s,

whose gradient ∇L_idgm = Ḡ − γ∇Ĝ needs Hessian-vector products: ∇Ĝ is obtained by
back-propagating through the per-domain gradients (double backward).  The cost
is linear in S: S per-domain forward/backward passes (kept differentiable) and
one double backward for all domains together, never a backward through the
whole batch once per domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from domainbed_fish.errors import NonFiniteLossError
from domainbed_fish.gradients import (
    Minibatches,
    mean_pairwise_inner_product,
    per_domain_gradients,
    per_domain_losses,
)
from domainbed_fish.hparams import IDGMConfig
from domainbed_fish.optim import make_optimizer, reset_optimizer_state


@dataclass
class IDGMGradient:
    """∇_θ(L_erm − γĜ) and the values it was computed from (all detached)."""

    grads: list[Tensor]
    nll: Tensor  # L_erm
    gip: Tensor  # Ĝ
    objective: Tensor  # L_erm − γĜ


def idgm_gradient(losses: Sequence[Tensor], params: Sequence[Tensor], gamma: float) -> IDGMGradient:
    """The gradient of the IDGM objective from the per-domain losses ``[L_1, …, L_S]``.

    Cost: S first-order backward passes (differentiable when γ ≠ 0) and one
    double backward shared by all domains, never one per domain or per pair.
    With Σ = Σ_s G_s, Ĝ = (‖Σ‖² − Σ_s ‖G_s‖²)/(S(S−1)) has ∂Ĝ/∂G_s = 2(Σ − G_s)/(S(S−1)),
    so instead of building a graph for Ĝ, one ``autograd.grad`` call seeds every
    G_s with −γ ∂Ĝ/∂G_s and L_erm with 1: autograd adds the Hessian-vector
    products and ∇L_erm in a single traversal, and the forward graph, which the
    double backward crosses anyway, is not traversed twice.  With ``gamma == 0``
    no graph is kept and this is ERM's gradient, Ḡ = Σ/S, plus the diagnostic Ĝ.
    """
    num_domains = len(losses)
    second_order = gamma != 0.0 and num_domains > 1
    grads = per_domain_gradients(losses, params, create_graph=second_order)
    nll = torch.stack([loss.detach() for loss in losses]).mean()
    with torch.no_grad():
        summed = [g.detach() for g in grads[0]] if num_domains == 1 else torch._foreach_add(grads[0], grads[1])
        for g in grads[2:]:
            torch._foreach_add_(summed, g)
        gip = _gip_from_sum(summed, grads)
    if second_order:
        scale = -gamma * 2.0 / (num_domains * (num_domains - 1))
        seeds = []
        with torch.no_grad():
            for g in grads:
                seed = torch._foreach_sub(summed, g)
                torch._foreach_mul_(seed, scale)
                seeds += seed
        # Gradients that do not depend on θ (materialised zeros) have no graph to seed.
        pairs = [(t, seed) for t, seed in zip((t for g in grads for t in g), seeds, strict=True) if t.requires_grad]
        mean_loss = torch.stack(list(losses)).mean()
        outputs = [mean_loss, *(t for t, _ in pairs)]
        seeds = [torch.ones_like(mean_loss), *(seed for _, seed in pairs)]
        total = list(torch.autograd.grad(outputs, params, seeds, materialize_grads=True))
    else:
        total = summed if num_domains > 1 else [g.clone() for g in summed]
        torch._foreach_div_(total, float(num_domains))
    return IDGMGradient(grads=total, nll=nll, gip=gip, objective=nll - gamma * gip)


def _gip_from_sum(summed: Sequence[Tensor], grads: Sequence[Sequence[Tensor]]) -> Tensor:
    """Ĝ = (‖Σ_s G_s‖² − Σ_s ‖G_s‖²)/(S(S−1)) from the summed gradients (no graph)."""
    num_domains = len(grads)
    if num_domains < 2:
        return summed[0].new_zeros(())

    def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
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
    """IDGM's update on ``network``, with DomainBed-style penalty annealing.

    For the first ``penalty_anneal_iters`` steps γ = 0 (plain ERM on per-domain
    minibatches); at the switch the optimizer's state is reset, as DomainBed's IRM
    and VREx do, because the gradient magnitudes jump.
    """

    def __init__(self, network: nn.Module, config: IDGMConfig):
        self.network = network
        self.config = config
        self.optimizer = make_optimizer(
            config.optimizer, network.parameters(), config.lr, config.weight_decay
        )
        self.num_updates = 0

    @property
    def penalty_weight(self) -> float:
        on = self.num_updates >= self.config.penalty_anneal_iters
        return self.config.gamma if on else 0.0

    def step(self, minibatches: Minibatches) -> dict[str, float]:
        c = self.config
        if self.num_updates == c.penalty_anneal_iters and c.penalty_anneal_iters > 0:
            reset_optimizer_state(self.optimizer)
        gamma = self.penalty_weight
        params = [p for p in self.network.parameters() if p.requires_grad]

        losses = per_domain_losses(self.network, minibatches)
        self._check_finite(torch.stack([loss.detach() for loss in losses]), "loss")
        result = idgm_gradient(losses, params, gamma)
        self._check_finite(result.objective.reshape(1), "objective L_erm − γĜ")

        for p, g in zip(params, result.grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.num_updates += 1
        return {
            "loss": result.objective.item(),
            "nll": result.nll.item(),
            "gip": result.gip.item(),
            "penalty_weight": gamma,
        }

    def _check_finite(self, values: Tensor, what: str) -> None:
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        bad = int((~finite).nonzero()[0, 0])
        domain = bad if what == "loss" else None
        raise NonFiniteLossError("IDGM", self.num_updates, domain, float(values[bad]), what)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
