"""Fish and IDGM as DomainBed ``Algorithm`` subclasses (thin: the math is elsewhere).

Both build DomainBed's usual network (``networks.Featurizer`` for the input shape,
then ``networks.Classifier``) exactly as ``ERM`` does, and delegate ``update`` to
:class:`~domainbed_fish.fish.FishUpdater` or :class:`~domainbed_fish.idgm.IDGMUpdater`.
Importing this module imports DomainBed (see :mod:`domainbed_fish.locate`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from domainbed_fish.fish import FishUpdater
from domainbed_fish.gradients import Minibatches
from domainbed_fish.hparams import FishConfig, IDGMConfig
from domainbed_fish.idgm import IDGMUpdater
from domainbed_fish.locate import import_domainbed
from domainbed_fish.optim import apply_to_state_

_db_algorithms = import_domainbed("algorithms")
_networks = import_domainbed("networks")

InputShape = tuple[int, ...]


def _domainbed_network(input_shape: InputShape, num_classes: int, hparams: dict) -> tuple[nn.Module, nn.Module]:
    featurizer = _networks.Featurizer(input_shape, hparams)
    classifier = _networks.Classifier(featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
    return featurizer, classifier


class Fish(_db_algorithms.Algorithm):
    """Fish (Shi et al., ICLR 2022): first-order gradient matching by inner-loop steps.

    At default hyperparameters it takes the same steps as DomainBed's built-in
    ``Fish`` (kept as ``FishDomainBed``), without rebuilding the network and its
    optimizer every step.  ``update`` returns the mean inner loss and, every
    ``gip_every`` steps, ``gip``: the gradient inner product at the weights
    before the step.
    """

    def __init__(self, input_shape: InputShape, num_classes: int, num_domains: int, hparams: dict):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        config = FishConfig.from_hparams(hparams, num_domains)  # fail before building anything
        self.featurizer, self.classifier = _domainbed_network(input_shape, num_classes, hparams)
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.fish = FishUpdater(self.network, config)

    @staticmethod
    def validate_hparams(hparams: dict, num_domains: int) -> None:
        """Raise ``ValueError`` naming the bad hyperparameter, before anything is built."""
        FishConfig.from_hparams(hparams, num_domains)

    def update(self, minibatches: Minibatches, unlabeled: Any = None) -> dict[str, float]:
        return self.fish.step(minibatches)

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _apply(self, fn, recurse=True):
        # The inner copy is not a submodule (it would double state_dict() and
        # parameters()), so move it with the model explicitly; the optimizers'
        # moments too, for a checkpoint loaded before .to(device).
        super()._apply(fn, recurse)
        self.fish.inner_network._apply(fn, recurse)
        for optimizer in (self.fish.inner_optimizer, self.fish.warmup_optimizer):
            apply_to_state_(optimizer, fn)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return self.fish.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.fish.load_state_dict(state)


class IDGM(_db_algorithms.Algorithm):
    """IDGM (Shi et al., ICLR 2022): exact second-order inter-domain gradient matching.

    Minimises mean per-domain cross-entropy − γ·(mean pairwise inner product of the
    per-domain gradients), back-propagating through the gradients; γ is 0 for the
    first ``idgm_penalty_anneal_iters`` steps.  ``update`` returns ``loss`` (the
    objective), ``nll``, ``gip`` and ``penalty_weight``.
    """

    def __init__(self, input_shape: InputShape, num_classes: int, num_domains: int, hparams: dict):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        config = IDGMConfig.from_hparams(hparams)
        self.featurizer, self.classifier = _domainbed_network(input_shape, num_classes, hparams)
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.idgm = IDGMUpdater(self.network, config)

    @staticmethod
    def validate_hparams(hparams: dict, num_domains: int) -> None:
        """Raise ``ValueError`` naming the bad hyperparameter, before anything is built."""
        IDGMConfig.from_hparams(hparams)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.idgm.optimizer

    def update(self, minibatches: Minibatches, unlabeled: Any = None) -> dict[str, float]:
        return self.idgm.step(minibatches)

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        apply_to_state_(self.idgm.optimizer, fn)  # for a checkpoint loaded before .to(device)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return self.idgm.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.idgm.load_state_dict(state)
