"""The explicit listing of everything the plugin adds to DomainBed.

This is the single source of truth: registration (``plugin.py``) iterates it, and
the tests are parametrised over it, so every name listed here is exercised.
Entries point at ``"module:attribute"`` strings so that reading the registry
imports neither torch nor DomainBed.
"""

from __future__ import annotations

from domainbed_fish.hparams import FISH_HPARAMS, IDGM_HPARAMS, HParam

#: Algorithms registered into ``domainbed.algorithms`` (name -> "module:class").
ALGORITHMS: dict[str, str] = {
    "Fish": "domainbed_fish.algorithms:Fish",
    "IDGM": "domainbed_fish.algorithms:IDGM",
}

#: DomainBed classes whose names the plugin takes over, and the name each keeps.
RENAMED_BUILTINS: dict[str, str] = {
    "Fish": "FishDomainBed",
}

#: Hyperparameters added on top of DomainBed's own for each algorithm name.
HPARAMS: dict[str, tuple[HParam, ...]] = {
    "Fish": FISH_HPARAMS,
    "IDGM": IDGM_HPARAMS,
}

#: Datasets registered into ``domainbed.datasets`` (name -> "module:class").
DATASETS: dict[str, str] = {}

#: Launchers registered into ``domainbed.command_launchers.REGISTRY``.
LAUNCHERS: dict[str, str] = {}


def load(target: str):
    """Import ``"module:attribute"`` and return the attribute."""
    import importlib

    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
