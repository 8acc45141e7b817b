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
from torch import Tensor, nn


class CdSpritesCNN(nn.Module):
    """The CdSprites-N network of Shi et al. (ICLR 2022, section 4.1), minus its last layer.

    Five convolutions 3→32→32→64→128→128 with kernel 4 and stride 2 (padding 1, 1,
    1, 1, 0), each followed by ReLU, no normalisation.  A 64×64 image becomes a
    128-dimensional feature; DomainBed's ``Classifier`` adds the paper's final
    ``Linear(128, 2)``.

    Weights and activations are kept channels-last (NHWC, :attr:`MEMORY_FORMAT`): on
    a CPU oneDNN's convolutions in that layout take an ERM or Fish step on CdSprites
    about a third less time than in NCHW (``benchmarks/cdsprites_memory_format.py``).
    The function is the same; only floating-point rounding differs.
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
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=padding), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Flatten())
        self.to(memory_format=self.MEMORY_FORMAT)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.contiguous(memory_format=self.MEMORY_FORMAT))


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
    occurs in training, so its weight keeps its initial value (PAPER.md §3).
    """
    layer = nn.Linear(int(in_features), out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
