"""The explicit listing of everything the plugin adds to DomainBed.

This is the single source of truth: registration (``plugin.py``) iterates it, and
the tests are parametrised over it, so every name listed here is exercised.
Entries point at ``"module:attribute"`` strings so that reading the registry
imports neither torch nor DomainBed.
"""

from __future__ import annotations

from typing import Any

from domainbed_fish.hparams import (
    CDSPRITES_ALGORITHM_HPARAMS,
    CDSPRITES_HPARAMS,
    FISH_HPARAMS,
    IDGM_HPARAMS,
    LINEAR_TOY_ALGORITHM_HPARAMS,
    LINEAR_TOY_HPARAMS,
    SMALL_IMAGES_BASE,
    HParam,
)

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

#: The CdSprites-N datasets of the paper (N training domains + the decorrelated one).
CDSPRITES_SIZES: tuple[int, ...] = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50)

#: Datasets registered into ``domainbed.datasets`` (name -> "module:class").
DATASETS: dict[str, str] = {
    **{f"CdSprites{n}": f"domainbed_fish.datasets.classes:CdSprites{n}" for n in CDSPRITES_SIZES},
    "LinearToy": "domainbed_fish.datasets.classes:LinearToy",
}

#: DomainBed dataset whose hyperparameters the plugin's datasets start from
#: (DomainBed's small-image treatment for every algorithm).
DATASET_HPARAMS_BASE: str = SMALL_IMAGES_BASE

#: Hyperparameters of the plugin's datasets: dataset -> algorithm (``"*"``: every
#: algorithm) -> entries that are added or replace DomainBed's.
DATASET_HPARAMS: dict[str, dict[str, tuple[HParam, ...]]] = {
    **{f"CdSprites{n}": {"*": CDSPRITES_HPARAMS, **CDSPRITES_ALGORITHM_HPARAMS} for n in CDSPRITES_SIZES},
    "LinearToy": {"*": LINEAR_TOY_HPARAMS, **LINEAR_TOY_ALGORITHM_HPARAMS},
}

#: Launchers registered into ``domainbed.command_launchers.REGISTRY``.
LAUNCHERS: dict[str, str] = {
    "local_parallel": "domainbed_fish.launchers:local_parallel",
    "submitit": "domainbed_fish.launchers:submitit_launcher",
}


def load(target: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    import importlib

    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
