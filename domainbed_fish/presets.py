"""Named sweep settings shipped with the package (``domainbed_fish/presets/*.json``).

A preset fills in any sweep option the command line leaves out; options given on the
command line win, and ``--hparams`` is merged over the preset's ``hparams``.  Keys are
DomainBed's sweep option names plus ``selection``, ``test_envs``, ``checkpoint_freq``
and ``description``.  ``"data_dir": null`` marks a preset whose datasets need no files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).with_name("presets")

#: Keys a preset may set.
PRESET_KEYS = frozenset(
    {
        "description", "datasets", "algorithms", "n_hparams", "n_hparams_from", "n_trials", "steps",
        "hparams", "holdout_fraction", "selection", "test_envs", "checkpoint_freq", "data_dir", "task",
    }
)


def available() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load(name: str) -> dict[str, Any]:
    """The preset ``name`` as a dict.

    Raises:
        ValueError: unknown preset (lists the available ones) or unknown keys in its file.
    """
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(available())}")
    preset = json.loads(path.read_text(encoding="utf-8"))
    unknown = set(preset) - PRESET_KEYS
    if unknown:
        raise ValueError(f"preset {path} has unknown keys {sorted(unknown)}; allowed: {sorted(PRESET_KEYS)}")
    return preset
