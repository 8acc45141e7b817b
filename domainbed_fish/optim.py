"""Optimizers by name, as the hyperparameters spell them."""

from __future__ import annotations

from collections.abc import Iterable

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
    CdSprites/WILDS Fish code) or ``sgd`` with ``momentum``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "amsgrad":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget moments and step counts without building a new optimizer.

    torch's optimizers create their per-parameter state lazily on the first
    ``step()``, so an empty ``state`` is exactly a freshly constructed optimizer.
    """
    optimizer.state.clear()
