"""A failed step leaves no trace in the network's buffers (BatchNorm's running statistics).

The forward passes of a step update BatchNorm's running mean and variance before the loss
can be checked; one non-finite input would then leave them NaN and every later prediction in
``eval()`` mode NaN too.  :class:`~domainbed_fish.errors.NonFiniteLossError` promises that the
model is as it was before the step, so the steps that raise it run under
:func:`buffers_restored_on_error`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def buffers_restored_on_error(network: nn.Module, error: type[BaseException]) -> Iterator[None]:
    """Run the block; if it raises ``error``, put ``network``'s buffers back as they were.

    The copy is of the buffers only (running statistics and counters: a BatchNorm layer's
    are 2·C + 1 numbers), so it costs nothing next to a step; a network without buffers
    copies nothing.
    """
    buffers = list(network.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    except error:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
        raise
