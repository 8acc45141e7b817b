"""``python -m sweeps``: the plugin's sweep command, runnable from the repository root.

The implementation is :mod:`domainbed_fish.sweep` (also ``python -m domainbed_fish.sweep``
and the ``domainbed-fish-sweep`` console script, which work from anywhere).
"""
