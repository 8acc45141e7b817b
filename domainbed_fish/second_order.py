"""Build graphs whose double backward is cheap: the context IDGM's forward passes run in.

IDGM differentiates every layer's backward pass (:mod:`domainbed_fish.idgm`).
For three layers PyTorch's double backward does avoidable work on a CPU, and
each has a replacement with PyTorch's own values and first derivatives and an
explicit second derivative:

- train-mode batch norm (:mod:`domainbed_fish.batchnorm`): a closed form instead
  of about 34 full-size products per layer;
- convolution (:mod:`domainbed_fish.convolution`): four plain convolution passes
  instead of batch/channel-swapped copies and transposed convolutions, and oneDNN
  for 1×1 convolutions on a CPU, where PyTorch picks its slower reference kernel
  at IDGM's per-domain batch sizes;
- ReLU (:mod:`domainbed_fish.relu`): no materialised zero gradient.

Inside :func:`cheap_double_backward` the functional calls that modules make
(``F.batch_norm``, ``F.conv1d/2d/3d``, ``F.relu``, ``torch.relu``) are routed to
them.  Calls they do not cover (eval-mode batch norm, string padding, unbatched
input) go to PyTorch unchanged, so any network runs; only the graph built inside
matters, and a backward run later still uses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from domainbed_fish.batchnorm import batch_norm_train
from domainbed_fish.convolution import convolution
from domainbed_fish.relu import relu

_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)


def _call(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _route(func: Any, args: tuple, kwargs: dict) -> Any:
    """The replacement's result for a call it covers, else ``NotImplemented``."""
    if func is F.batch_norm:
        call = _call(_BATCH_NORM_ARGS, args, kwargs)
        if call.get("training", False):
            return batch_norm_train(
                call["input"], call.get("running_mean"), call.get("running_var"), call.get("weight"),
                call.get("bias"), call.get("momentum", 0.1), call.get("eps", 1e-5),
            )
    elif func in _CONVOLUTIONS:
        call = _call(_CONV_ARGS, args, kwargs)
        if not isinstance(call.get("padding", 0), str) and call["input"].dim() == call["weight"].dim():
            return convolution(call["input"], call["weight"], call.get("bias"), call.get("stride", 1),
                               call.get("padding", 0), call.get("dilation", 1), call.get("groups", 1))
    elif func is F.relu or func is torch.relu:
        call = _call(("input", "inplace"), args, kwargs)
        return relu(call["input"], bool(call.get("inplace", False)))
    return NotImplemented


class _CheapDoubleBackwardMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = _route(func, args, kwargs)
        return func(*args, **kwargs) if result is NotImplemented else result


@contextlib.contextmanager
def cheap_double_backward() -> Iterator[None]:
    """Inside, train-mode batch norm, convolutions and ReLUs build graphs whose
    second derivative is the explicit one of their module (values unchanged)."""
    with _CheapDoubleBackwardMode():
        yield
