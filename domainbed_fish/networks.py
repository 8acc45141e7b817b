"""The networks of the paper's own experiments, chosen by DomainBed's featurizer selection.

DomainBed picks a featurizer from the input shape (``networks.Featurizer``); the
plugin extends that choice additively (see :mod:`domainbed_fish.plugin`):

- 3×64×64 inputs (CdSprites-N, a shape DomainBed has no network for) get
  :class:`CdSpritesCNN`, the paper's network, so ERM, CORAL, Fish and IDGM are all
  compared on it;
- the linear toy (hyperparameter ``linear_model``) gets :class:`LinearFeatures`,
  the identity, whose width asks ``networks.Classifier`` for a zero-initialised
  linear layer: the whole model is then one linear map starting at zero.

Nothing changes for DomainBed's own datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CdSpritesCNN(nn.Module):
    """The CdSprites-N network of Shi et al. (ICLR 2022, section 4.1), minus its last layer.

    Five convolutions 3→32→32→64→128→128 with kernel 4 and stride 2 (padding 1, 1,
    1, 1, 0), each followed by ReLU, no normalisation.  A 64×64 image becomes a
    128-dimensional feature; DomainBed's ``Classifier`` adds the paper's final
    ``Linear(128, 2)``.

    Weights and activations are kept channels-last (NHWC, :attr:`MEMORY_FORMAT`): on
    a CPU oneDNN's convolutions in that layout take ERM's step (one batch of every
    domain's images) on CdSprites-15 and -30 about a third less time than in NCHW, and
    Fish's step (one small batch at a time) about a sixth less
    (``benchmarks/cdsprites_memory_format.py``).
    The function is the same; only floating-point rounding differs.  The fifth
    convolution's kernel covers its whole 4×4 input, so it runs as the matrix product it
    is (:class:`WholeInputConv2d`).
    """

    n_outputs = 128
    INPUT_SIZE = (64, 64)
    MEMORY_FORMAT = torch.channels_last

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        if tuple(input_shape[1:]) != self.INPUT_SIZE:
            raise ValueError(f"CdSpritesCNN takes C×64×64 images, got input shape {tuple(input_shape)}")
        widths = (input_shape[0], 32, 32, 64, 128, 128)
        paddings = (1, 1, 1, 1, 0)
        layers: list[nn.Module] = []
        for c_in, c_out, padding in zip(widths[:-1], widths[1:], paddings, strict=True):
            conv = WholeInputConv2d if padding == 0 else nn.Conv2d
            layers += [conv(c_in, c_out, kernel_size=4, stride=2, padding=padding), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Flatten())
        self.to(memory_format=self.MEMORY_FORMAT)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.contiguous(memory_format=self.MEMORY_FORMAT))


class WholeInputConv2d(nn.Conv2d):
    """A ``Conv2d`` that, when its kernel covers its whole unpadded input, runs as a matrix product.

    Such a convolution has one output position: ``y[n, o] = b[o] + Σ_{c,h,w} W[o, c, h, w]
    x[n, c, h, w]``, a ``Linear`` layer on the flattened input.  On a CPU oneDNN runs the
    CdSprites network's last convolution (128 → 128 channels, 4×4 kernel on a 4×4 input)
    at about a tenth of a matrix product's speed, forward and backward (1.3 and 2.8 ms a
    32-image step on one thread, a tenth of the whole network's step).  Flattening both in
    (h, w, c) order makes the flattening a view of channels-last tensors.  The parameters,
    their names and their layout are ``Conv2d``'s; other input sizes take ``Conv2d``'s path.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() != 4 or tuple(x.shape[-2:]) != self.kernel_size or self.padding != (0, 0)
                or self.groups != 1 or self.dilation != (1, 1)):
            return super().forward(x)
        flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)
        return F.linear(flat, weight, self.bias)[:, :, None, None]


class ZeroInitWidth(int):
    """A feature width that asks the classifier factory for a zero-initialised ``Linear``.

    DomainBed's algorithms build their classifier as
    ``networks.Classifier(featurizer.n_outputs, num_classes, ...)``; this int
    carries the request through that call without changing DomainBed's code.
    """


class LinearFeatures(nn.Identity):
    """The identity featurizer of the linear toy: the model is DomainBed's linear classifier."""

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"the linear model takes flat inputs, got input shape {tuple(input_shape)}")
        self.n_outputs = ZeroInitWidth(input_shape[0])


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """``Linear(in_features, out_features)`` with weights and bias at zero.

    The linear toy needs it: the held-out domain's own input coordinate never
    occurs in training, so its weight keeps its initial value.
    """
    layer = nn.Linear(int(in_features), out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
