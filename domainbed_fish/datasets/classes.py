"""The paper's datasets as DomainBed datasets (importing this module imports DomainBed).

``CdSprites5`` … ``CdSprites50`` and ``LinearToy`` subclass DomainBed's
``MultipleDomainDataset``, so ``--dataset CdSprites15`` works in DomainBed's
unmodified ``train``, ``sweep`` and ``collect_results`` once the plugin has
registered them.  Nothing is downloaded: ``root`` (``--data_dir``) is ignored.
Data are generated in memory, so no loader workers are needed.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

from domainbed_fish.datasets.cdsprites import build_cdsprites
from domainbed_fish.datasets.toy import HELDOUT_COORDINATE, INPUT_DIM, TRAINING_COORDINATES, toy_domain
from domainbed_fish.hparams import CDSPRITES_HPARAMS, LINEAR_TOY_HPARAMS, refuse_unknown_prefixed
from domainbed_fish.locate import import_domainbed

_datasets = import_domainbed("datasets")


def _default(specs, name: str) -> Any:
    return next(spec.default for spec in specs if spec.name == name)


def _whole_number(dataset: str, hparams: dict, specs, name: str) -> int:
    """The non-negative integer hyperparameter ``name``; a float is accepted only when it is
    whole, so that ``2000.0`` works and ``10.5``, ``-1`` or ``"a"`` are refused instead of
    truncated or unexplained."""
    value = hparams.get(name, _default(specs, name))
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
        value = int(value)
    # numpy integers are Integral
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{dataset}: the hyperparameter {name} must be a whole number >= 0, got {value!r}; "
                         f"set it as one, e.g. --hparams '{{\"{name}\": {_default(specs, name)}}}'")
    return int(value)


def _refuse_unknown(dataset: str, hparams: dict, specs, prefix: str) -> None:
    """No unknown hyperparameter named ``prefix…`` (a mistyped ``cdsprites_per_domian`` would
    build the default size)."""
    known = [spec.name for spec in specs if spec.name.startswith(prefix)]
    refuse_unknown_prefixed(hparams, known, prefix, owner=f"{dataset}: ")


def _check_test_envs(dataset: str, test_envs: list[int] | None, environments: list[str], intended: int) -> None:
    """Refuse ``test_envs`` that DomainBed's train script would take for nonsense silently: it
    trains on every environment not listed, so one out of range holds nothing out (the job
    trains on the intended test environment too and ends with status 0); a repeated one is
    subtracted twice from the training domains the algorithm is told about; and holding out
    every environment leaves no training data (a bare ``StopIteration`` at step 0)."""
    test_envs = list(test_envs or [])
    listing = ", ".join(f"{i}: {name}" for i, name in enumerate(environments))
    fix = f"pass --test_envs {intended}, the intended test environment (environments: {listing})"
    out_of_range = [e for e in test_envs
                    if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < len(environments)]
    if out_of_range:
        raise ValueError(f"{dataset}: --test_envs {' '.join(map(str, out_of_range))} names no environment "
                         f"(they are 0 … {len(environments) - 1}); {fix}")
    if len(set(test_envs)) < len(test_envs):
        raise ValueError(f"{dataset}: --test_envs {' '.join(map(str, test_envs))} repeats an environment, which "
                         f"DomainBed's train script would count twice as held out; {fix}")
    if len(test_envs) == len(environments):
        raise ValueError(f"{dataset}: --test_envs {' '.join(map(str, test_envs))} holds out every environment, "
                         f"leaving none to train on; {fix}")


class CdSprites(_datasets.MultipleDomainDataset):
    """CdSprites-N: N spurious training domains, then the decorrelated environment.

    Environments ``0 … N−1`` (``spurious0`` …) colour the sprites with their own
    two-colour palette, colour index = label; environment ``N``
    (``decorrelated``) draws colours independently of the label and is the
    intended test environment (``--test_envs N``).  Hyperparameters
    ``cdsprites_per_domain`` and ``cdsprites_data_seed`` set the size and the data.
    """

    NUM_DOMAINS: int
    INPUT_SHAPE = (3, 64, 64)
    N_STEPS = 1001
    CHECKPOINT_FREQ = 100
    N_WORKERS = 0

    def __init__(self, root: str | None, test_envs: list[int], hparams: dict):
        super().__init__()
        _check_test_envs(type(self).__name__, test_envs, self.ENVIRONMENTS, self.decorrelated_env())
        _refuse_unknown(type(self).__name__, hparams, CDSPRITES_HPARAMS, "cdsprites_")
        self.datasets = list(
            build_cdsprites(
                self.NUM_DOMAINS,
                _whole_number(type(self).__name__, hparams, CDSPRITES_HPARAMS, "cdsprites_per_domain"),
                _whole_number(type(self).__name__, hparams, CDSPRITES_HPARAMS, "cdsprites_data_seed"),
            )
        )
        self.input_shape = self.INPUT_SHAPE
        self.num_classes = 2

    @classmethod
    def decorrelated_env(cls) -> int:
        """Index of the decorrelated (test) environment."""
        return cls.NUM_DOMAINS


def _cdsprites(num_domains: int) -> type[CdSprites]:
    environments = [f"spurious{d}" for d in range(num_domains)] + ["decorrelated"]
    return type(
        f"CdSprites{num_domains}",
        (CdSprites,),
        {"NUM_DOMAINS": num_domains, "ENVIRONMENTS": environments, "__module__": __name__,
         "__doc__": f"CdSprites-{num_domains}: {num_domains} spurious domains + 'decorrelated' (env {num_domains})."},
    )


CdSprites5 = _cdsprites(5)
CdSprites10 = _cdsprites(10)
CdSprites15 = _cdsprites(15)
CdSprites20 = _cdsprites(20)
CdSprites25 = _cdsprites(25)
CdSprites30 = _cdsprites(30)
CdSprites35 = _cdsprites(35)
CdSprites40 = _cdsprites(40)
CdSprites45 = _cdsprites(45)
CdSprites50 = _cdsprites(50)


class LinearToy(_datasets.MultipleDomainDataset):
    """The paper's linear toy: training domains ``domain1``, ``domain2``; ``heldout`` (env 2) is
    the intended test environment.  Hyperparameter ``toy_per_domain`` sets the size."""

    ENVIRONMENTS: ClassVar[list[str]] = ["domain1", "domain2", "heldout"]
    INPUT_SHAPE = (INPUT_DIM,)
    N_STEPS = 3001
    CHECKPOINT_FREQ = 250
    N_WORKERS = 0

    def __init__(self, root: str | None, test_envs: list[int], hparams: dict):
        super().__init__()
        _check_test_envs(type(self).__name__, test_envs, self.ENVIRONMENTS, self.decorrelated_env())
        _refuse_unknown(type(self).__name__, hparams, LINEAR_TOY_HPARAMS, "toy_")
        size = _whole_number(type(self).__name__, hparams, LINEAR_TOY_HPARAMS, "toy_per_domain")
        self.datasets = [toy_domain(c, size) for c in (*TRAINING_COORDINATES, HELDOUT_COORDINATE)]
        self.input_shape = self.INPUT_SHAPE
        self.num_classes = 2

    @classmethod
    def decorrelated_env(cls) -> int:
        """Index of the held-out (test) environment."""
        return len(cls.ENVIRONMENTS) - 1
