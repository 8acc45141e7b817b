"""Errors the plugin raises, each naming the problem and the fix."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A loss (or the gradient inner product) became NaN or infinite.

    Raised before the model's weights are changed, so the algorithm can be saved,
    inspected or resumed with a smaller learning rate.
    """

    def __init__(self, algorithm: str, step: int, domain: int | None, value: float, what: str = "loss"):
        self.algorithm = algorithm
        self.step = step
        self.domain = domain
        self.value = value
        where = f"training domain {domain} (position in the minibatch list)" if domain is not None else "the step"
        super().__init__(
            f"{algorithm}: non-finite {what} ({value}) at update step {step} on {where}. "
            "The weights were not updated. Lower the learning rate (lr, meta_lr) or the "
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
