"""Start-up hook: register the plugin into DomainBed when DomainBed is imported.

A ``.pth`` file installed next to the package imports this module at interpreter
start-up.  It must stay cheap (budget: 5 ms on ``python -c pass``), so it imports
nothing but ``sys`` and ``os`` (both already loaded by ``site``) and does no work
until one of DomainBed's registry modules is imported.  At that moment it calls
:func:`domainbed_fish.plugin.on_domainbed_import`, which adds the plugin's
algorithms, hyperparameters, datasets and launchers to that module, makes its
training loaders fail with a clear error on a batch larger than their split, and lets
its result scripts skip a killed job's truncated ``results.jsonl`` line.

Set ``DOMAINBED_FISH_AUTOLOAD=0`` (or ``false``, ``no``, ``off``) to switch the hook off for a process.
"""

from __future__ import annotations

import os
import sys

#: DomainBed modules the plugin adds entries to, in no particular order.
WATCHED_MODULES = frozenset(
    {
        "domainbed.algorithms",
        "domainbed.networks",
        "domainbed.hparams_registry",
        "domainbed.datasets",
        "domainbed.command_launchers",
        "domainbed.lib.fast_data_loader",
        "domainbed.lib.reporting",
    }
)

_ENV_SWITCH = "DOMAINBED_FISH_AUTOLOAD"
#: Spellings of the switch, compared lower-case: "false" used to leave the hook on silently.
_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def _switched_off() -> bool:
    """Whether ``DOMAINBED_FISH_AUTOLOAD`` turns the hook off; an unknown value leaves it on, and says so."""
    value = os.environ.get(_ENV_SWITCH, "1").strip().lower()
    if value not in _OFF + _ON:
        sys.stderr.write(f"domainbed-fish: {_ENV_SWITCH}={os.environ[_ENV_SWITCH]!r} is neither on "
                         f"({', '.join(_ON[1:])}) nor off ({', '.join(_OFF)}); the plugin stays on. "
                         f"Set {_ENV_SWITCH}=0 to switch it off.\n")
    return value in _OFF


def _after_exec(module) -> None:
    try:
        from domainbed_fish import plugin

        plugin.on_domainbed_import(module)
    except Exception as exc:  # never break DomainBed itself because of the plugin
        import warnings

        warnings.warn(
            f"domainbed-fish could not register into {module.__name__}: "
            f"{type(exc).__name__}: {exc}. Call domainbed_fish.register() to see the "
            "full error.",
            RuntimeWarning,
            stacklevel=2,
        )


class _PostImportFinder:
    """A meta-path finder that only decorates the loaders of ``WATCHED_MODULES``.

    It finds nothing itself: it asks the finders after it for the real spec and
    wraps that loader's ``exec_module`` so the plugin runs once the module has
    been fully executed.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "domainbed":
            spec = self._later_spec(fullname, path, target)
            if spec is None:
                _explain_missing_domainbed()
            return spec
        if fullname not in WATCHED_MODULES:
            return None
        spec = self._later_spec(fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            original_exec = spec.loader.exec_module

            def exec_module(module, _original=original_exec):
                _original(module)
                _after_exec(module)

            spec.loader.exec_module = exec_module
        return spec

    def _later_spec(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self) -> None:
        pass


_explained = False


def _explain_missing_domainbed() -> None:
    """Say why ``domainbed`` cannot be imported when ``DOMAINBED_DIR`` names no checkout.

    DomainBed's own ``python -m domainbed.scripts...`` never reaches the plugin's code, so
    without this a mistyped ``DOMAINBED_DIR`` gets only Python's "No module named
    'domainbed'".  A note on stderr, once, rather than an exception: a probe such as
    ``importlib.util.find_spec("domainbed")`` must still get ``None``.
    """
    global _explained
    if _explained or not os.environ.get("DOMAINBED_DIR"):
        return
    _explained = True
    try:
        from domainbed_fish.locate import DomainBedNotFoundError, domainbed_dir_from_env

        domainbed_dir_from_env()
    except DomainBedNotFoundError as exc:
        sys.stderr.write(f"domainbed-fish: {exc}\n")
    except Exception:  # the explanation must never be what breaks the import
        pass


def _add_domainbed_dir_to_path() -> None:
    """Make ``DOMAINBED_DIR`` importable (appended, so an importable checkout wins), read as
    :mod:`domainbed_fish.locate` reads it: ``~`` expanded, relative to the working directory."""
    root = os.environ.get("DOMAINBED_DIR")
    if root:
        root = os.path.abspath(os.path.expanduser(root))
        if root not in sys.path:
            sys.path.append(root)


def install() -> None:
    """Install the hook once per interpreter (idempotent)."""
    if _switched_off():
        return
    if any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    _add_domainbed_dir_to_path()
    sys.meta_path.insert(0, _PostImportFinder())
    # DomainBed may already be loaded (hook installed late, e.g. in a notebook).
    for name in WATCHED_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            _after_exec(module)


install()
