"""The one place that decides how DomainBed is found.

DomainBed is not a package on any registry: users clone it.  It is found either
because ``import domainbed`` already works (the checkout is on ``sys.path``, e.g.
the current directory) or through the ``DOMAINBED_DIR`` environment variable, which
names the checkout's root (the folder that contains ``domainbed/``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

ENV_VAR = "DOMAINBED_DIR"

#: The DomainBed commit this plugin is developed and tested against.
TESTED_COMMIT = "b93c22a1cfc3b2428398272c1a116c8de1f4139e"

MISSING_MESSAGE = (
    "DomainBed was not found. domainbed-fish is a plugin for Facebook's DomainBed, "
    "which is not on PyPI. Clone it (https://github.com/facebookresearch/DomainBed; "
    f"tested at commit {TESTED_COMMIT[:7]}), install its requirements "
    "(pip install 'domainbed-fish[domainbed]': wilds, timm, tqdm, parameterized, matplotlib), then either run from the "
    f"checkout's root or set {ENV_VAR}=/path/to/DomainBed (the folder that contains "
    "'domainbed/')."
)


class DomainBedNotFoundError(ImportError):
    """DomainBed cannot be imported; the message says how to provide it."""


class DomainBedDependencyError(DomainBedNotFoundError):
    """DomainBed was found, but one of the modules it imports is not installed."""


def _missing_dependency(exc: ModuleNotFoundError) -> DomainBedDependencyError:
    package = sys.modules.get("domainbed")
    where = f" at {Path(package.__file__).resolve().parents[1]}" if getattr(package, "__file__", None) else ""
    if (exc.name or "").startswith("domainbed."):
        fix = (f"this checkout lacks DomainBed's module '{exc.name}': use DomainBed at the tested commit "
               f"{TESTED_COMMIT[:7]} (git -C <checkout> checkout {TESTED_COMMIT[:7]})")
    else:
        fix = (f"install DomainBed's requirements into this Python ({sys.executable}): "
               "pip install 'domainbed-fish[domainbed]' (wilds, timm, tqdm, parameterized, matplotlib), "
               f"or the package that provides '{exc.name}'")
    return DomainBedDependencyError(f"DomainBed was found{where} but cannot be imported: {exc}. To fix it, {fix}.")


def domainbed_dir_from_env() -> Path | None:
    """The checkout named by ``DOMAINBED_DIR``, validated, or ``None`` if unset."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    if not (root / "domainbed" / "__init__.py").is_file():
        raise DomainBedNotFoundError(
            f"{ENV_VAR}={value!r} does not point at a DomainBed checkout: "
            f"{root / 'domainbed' / '__init__.py'} does not exist. Set {ENV_VAR} to the "
            "folder that contains 'domainbed/'."
        )
    return root


def import_domainbed(submodule: str = "") -> ModuleType:
    """Import ``domainbed`` (or ``domainbed.<submodule>``), using ``DOMAINBED_DIR`` if needed.

    Raises:
        DomainBedNotFoundError: with instructions, when DomainBed cannot be found;
            :class:`DomainBedDependencyError`, a subclass, when it is found but a module
            it imports is not installed.
    """
    name = "domainbed" + (f".{submodule}" if submodule else "")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in ("domainbed", name):
            raise _missing_dependency(exc) from exc  # DomainBed is there, a module it imports is not
        root = domainbed_dir_from_env()
        if root is None:
            raise DomainBedNotFoundError(MISSING_MESSAGE) from None
        if str(root) not in sys.path:
            sys.path.append(str(root))
        importlib.invalidate_caches()
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc2:
            if exc2.name in ("domainbed", name):
                raise DomainBedNotFoundError(MISSING_MESSAGE) from None
            raise _missing_dependency(exc2) from exc2

