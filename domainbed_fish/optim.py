"""Optimizers by name, as the hyperparameters spell them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

#: Optimizer names accepted by ``fish_inner_optimizer`` and ``idgm_optimizer``.
OPTIMIZERS = ("adam", "amsgrad", "sgd")


def make_optimizer(
    name: str,
    params: Iterable[Tensor],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``adam`` (DomainBed's default), ``amsgrad`` (Adam with AMSGrad, the official
    CdSprites/WILDS Fish code) or ``sgd``; ``momentum`` is SGD's momentum or Adam's β₁
    (0.9, the default, is torch's and DomainBed's Adam)."""
    if name in ("adam", "amsgrad"):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=(momentum, 0.999),
                                amsgrad=name == "amsgrad")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def apply_to_state_(optimizer: torch.optim.Optimizer, fn: Callable[[Tensor], Tensor]) -> None:
    """Convert the optimizer's per-parameter tensors (moments) with ``fn``, a module's
    ``_apply`` conversion (``.to(device)``, ``.double()``, …), leaving step counts alone.

    torch puts loaded state on the parameters' device and dtype when it is loaded, so a
    module moved after ``load_state_dict`` would step with moments left behind.
    """
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, Tensor):
                state[key] = fn(value)


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget moments and step counts without building a new optimizer.

    torch's optimizers create their per-parameter state lazily on the first
    ``step()``, so an empty ``state`` is exactly a freshly constructed optimizer.
    """
    optimizer.state.clear()


def step_metric(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]
) -> list[Tensor] | None:
    """The diagonal scaling W the optimizer's next step will apply to a gradient near ``grads``.

    Adam's step is (about) W g with W = 1/(√v̂ + eps) per coordinate, v̂ the bias-corrected
    second moment after this step's update v ← β₂v + (1 − β₂)g² (AMSGrad: its running
    maximum); SGD's is the identity, returned as ``None``.  Inner products in this metric
    say whether the step the optimizer actually takes descends a loss (see
    :func:`domainbed_fish.idgm.bounded_gamma`).
    """
    if not isinstance(optimizer, torch.optim.Adam):  # SGD (and anything else): plain norms
        return None
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    metric = []
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            group = group_of[id(p)]
            beta2, eps = group["betas"][1], group["eps"]
            state = optimizer.state.get(p, {})
            step = float(state["step"]) + 1 if "step" in state else 1.0
            v = g.square().mul_(1 - beta2)
            if "exp_avg_sq" in state:
                v.add_(state["exp_avg_sq"], alpha=beta2)
            if group.get("amsgrad") and "max_exp_avg_sq" in state:
                torch.maximum(v, state["max_exp_avg_sq"], out=v)
            metric.append(v.div_(1 - beta2**step).sqrt_().add_(eps).reciprocal_())
    return metric
