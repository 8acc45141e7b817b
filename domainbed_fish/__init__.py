"""domainbed-fish: Fish and exact IDGM (Shi et al., ICLR 2022) as a DomainBed plugin.

Installing the package is enough: DomainBed's own commands know ``Fish`` (this
package's, equivalent to and faster than the built-in, which stays available as
``FishDomainBed``) and ``IDGM``.  In-process users may call :func:`register`.

Importing this package is cheap; torch and DomainBed load only when needed.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "register", "registered"]


def register() -> dict[str, list[str]]:
    """Register the plugin into DomainBed now (idempotent) and return what was added."""
    from domainbed_fish import plugin

    return plugin.register()


def registered() -> dict[str, list[str]]:
    """What the plugin has added to DomainBed in this process, by kind."""
    from domainbed_fish import plugin

    return plugin.registered()
