"""Errors the plugin raises, each naming the problem and the fix."""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path


def missing_plotting_library() -> bool:
    """Whether matplotlib, which draws the figures and plots, cannot be imported; checked
    before any work is done, so that a run does not end in an ImportError after it."""
    return importlib.util.find_spec("matplotlib") is None


class NonFiniteLossError(FloatingPointError):
    """A loss (or the gradient inner product) became NaN or infinite.

    Raised before the model is changed (its weights, and its BatchNorm running statistics,
    which the step's forward passes had updated, are as before the step), so the algorithm
    can be saved, inspected or resumed with a smaller learning rate.
    """

    def __init__(self, algorithm: str, step: int, domain: int | None, value: float, what: str = "loss"):
        self.algorithm = algorithm
        self.step = step
        self.domain = domain
        self.value = value
        where = f"training domain {domain} (position in the minibatch list)" if domain is not None else "the step"
        super().__init__(
            f"{algorithm}: non-finite {what} ({value}) at update step {step} on {where}. "
            "The model was not changed. Lower the learning rate (lr, meta_lr) or the "
            "penalty weight, or check that domain's data for NaN/inf values."
        )


class UnknownNameError(NotImplementedError, KeyError):
    """An algorithm or dataset name DomainBed does not know.

    Subclasses ``NotImplementedError`` (what DomainBed raises) so existing handlers
    keep working, and ``KeyError`` for registry-style lookups.
    """

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind = kind
        self.name = name
        self.available = list(available)
        super().__init__(
            f"unknown {kind} {name!r}. Available {kind}s: {', '.join(self.available)}. "
            "Check the spelling (names are case-sensitive); plugin names need domainbed-fish "
            "installed (pip install -e .) or domainbed_fish.register() called."
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class InvalidBatchSizeError(ValueError):
    """A training ``batch_size`` that is not a whole number >= 1 (``"8"``, ``8.0``, ``0``).

    Without the check a string fails as an unexplained ``TypeError`` in a comparison and a
    float or a non-positive value in torch's sampler, which names neither the
    hyperparameter nor the fix.
    """

    def __init__(self, batch_size: object):
        self.batch_size = batch_size
        super().__init__(
            f"batch_size {batch_size!r} is not a whole number >= 1, which DomainBed's training loaders need. "
            "Pass it as a JSON integer, e.g. --hparams '{\"batch_size\": 32}' (not \"32\" or 32.0)."
        )


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as an ``int`` (numpy's integers too: torch's samplers refuse them).

    Raises:
        InvalidBatchSizeError: it is no whole number >= 1 (``True`` is Integral, yet no size).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InvalidBatchSizeError(batch_size)
    return int(batch_size)


class BatchLargerThanSplitError(ValueError):
    """A training minibatch asks for more examples than its environment's split holds.

    DomainBed's ``InfiniteDataLoader`` draws ``len(split)`` indices per pass and drops an
    incomplete batch, so such a loader never yields a batch and the job would hang at its
    first step instead of failing.
    """

    def __init__(self, batch_size: int, split_size: int):
        self.batch_size = batch_size
        self.split_size = split_size
        if split_size == 0:  # "at most 0" would be no fix: nothing is left to train on
            super().__init__(
                f"batch_size {batch_size} is larger than a training split of 0 examples: this environment "
                "keeps nothing for training. Lower --holdout_fraction (the share of each environment held "
                "out; DomainBed's default 0.2), or give every environment more examples."
            )
            return
        super().__init__(
            f"batch_size {batch_size} is larger than a training split of {split_size} examples: "
            "DomainBed's InfiniteDataLoader would never fill a batch and the job would hang. "
            f"Use a batch_size of at most {split_size} (train: --hparams '{{\"batch_size\": "
            f"{split_size}}}'; sweep: pin batch_size in the sweep's hparams, since DomainBed "
            "draws random batch sizes up to 512 for small images), or give every environment "
            "more examples."
        )


def file_in_the_way(directory: Path) -> Path | None:
    """The file, ``directory`` itself or one of its parents, that keeps ``directory`` from
    being a directory (``None`` if there is none), so that a command can say so before it
    writes anything instead of failing halfway with ``NotADirectoryError``."""
    return next((path for path in (directory, *directory.parents) if path.exists() and not path.is_dir()), None)
