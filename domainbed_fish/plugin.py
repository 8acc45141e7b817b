"""All DomainBed glue: every registration into DomainBed's modules happens here.

Registration is additive and idempotent.  DomainBed's own algorithms, datasets,
hyperparameters and launchers behave exactly as before, except ``Fish``, whose
name the plugin takes over; DomainBed's class stays available as
``FishDomainBed``; the infinite training loaders, which raise
:class:`~domainbed_fish.errors.BatchLargerThanSplitError` where DomainBed's would hang;
and ``reporting.load_records``, which skips a truncated ``results.jsonl`` line with a
warning where DomainBed's stops.  :func:`registered` lists what was added.
"""

from __future__ import annotations

import functools
from types import FunctionType, ModuleType
from typing import Any

from domainbed_fish import registry
from domainbed_fish.errors import BatchLargerThanSplitError, UnknownNameError, check_batch_size
from domainbed_fish.locate import import_domainbed

_MARK = "_domainbed_fish_registered"
_added: dict[str, list[str]] = {}


def _record(kind: str, name: str) -> None:
    names = _added.setdefault(kind, [])
    if name not in names:
        names.append(name)


# ----------------------------------------------------------------------------- algorithms


class _GlobalsOverlay(dict):
    """Function globals that pin some names and read everything else live from a module."""

    def __init__(self, module_globals: dict, pinned: dict[str, Any]):
        super().__init__(pinned)
        self._module_globals = module_globals

    def __missing__(self, key: str) -> Any:
        return self._module_globals[key]


def _pin_global(cls: type, name: str, value: Any, module: ModuleType) -> None:
    """Make ``cls``'s methods see ``name`` as ``value`` whatever the module says.

    DomainBed's classes call ``super(Fish, self)``, which looks ``Fish`` up in the
    module's globals at call time; once the plugin owns that name the built-in
    class would otherwise find the plugin's class there and fail.
    """
    overlay = _GlobalsOverlay(vars(module), {name: value, "__builtins__": vars(module)["__builtins__"]})
    for attribute, function in list(vars(cls).items()):
        if isinstance(function, FunctionType) and name in function.__code__.co_names:
            pinned = FunctionType(
                function.__code__, overlay, function.__name__, function.__defaults__, function.__closure__
            )
            pinned.__kwdefaults__ = function.__kwdefaults__
            pinned.__qualname__ = function.__qualname__
            pinned.__doc__ = function.__doc__
            setattr(cls, attribute, pinned)


def _with_clear_error(lookup, kind: str, names: list[str]):
    @functools.wraps(lookup)
    def get_class(name: str):
        try:
            return lookup(name)
        except NotImplementedError:
            raise UnknownNameError(kind, name, names) from None

    get_class._domainbed_fish_wrapped = True
    return get_class


def _add_listed(module: ModuleType, listing: list[str], entries: dict[str, str], kind: str) -> None:
    """Set ``module.<name>`` for each entry and append the name to DomainBed's listing."""
    for name, target in entries.items():
        setattr(module, name, registry.load(target))
        if name not in listing:
            listing.append(name)
        _record(kind, name)


def register_algorithms(algorithms: ModuleType) -> None:
    """Add the plugin's algorithms to ``domainbed.algorithms`` (globals and ``ALGORITHMS``)."""
    if getattr(algorithms, _MARK, False):
        return
    for name, new_name in registry.RENAMED_BUILTINS.items():
        builtin = getattr(algorithms, name)
        _pin_global(builtin, name, builtin, algorithms)
        setattr(algorithms, new_name, builtin)
        if new_name not in algorithms.ALGORITHMS:
            algorithms.ALGORITHMS.append(new_name)
        _record("algorithms", new_name)
    _add_listed(algorithms, algorithms.ALGORITHMS, registry.ALGORITHMS, "algorithms")
    if not getattr(algorithms.get_algorithm_class, "_domainbed_fish_wrapped", False):
        algorithms.get_algorithm_class = _with_clear_error(
            algorithms.get_algorithm_class, "algorithm", algorithms.ALGORITHMS
        )
    setattr(algorithms, _MARK, True)


# ----------------------------------------------------------------------------- hyperparameters


def _extended_hparams(original, seed_hash):
    """Wrap DomainBed's ``_hparams(algorithm, dataset, random_seed)``.

    DomainBed's names are computed by DomainBed itself (a renamed built-in under
    its original name; the plugin's datasets as DomainBed's small-image dataset
    ``DATASET_HPARAMS_BASE``); the plugin's names are added with DomainBed's
    seeding, one ``RandomState(seed_hash(random_seed, name))`` per name, and the
    plugin's datasets then set their own entries.
    """
    import numpy as np

    original_names = {new: old for old, new in registry.RENAMED_BUILTINS.items()}

    @functools.wraps(original)
    def _hparams(algorithm: str, dataset: str, random_seed: int) -> dict:
        dataset_specs = registry.DATASET_HPARAMS.get(dataset)
        base_dataset = registry.DATASET_HPARAMS_BASE if dataset_specs is not None else dataset
        hparams = original(original_names.get(algorithm, algorithm), base_dataset, random_seed)

        def define(spec, replace: bool) -> None:
            if spec.name in hparams and not replace:
                raise RuntimeError(
                    f"domainbed-fish: hyperparameter {spec.name!r} of {algorithm} is already "
                    "defined by DomainBed; this DomainBed version is not supported."
                )
            random_state = np.random.RandomState(seed_hash(random_seed, spec.name))
            hparams[spec.name] = (spec.default, spec.sample(random_state))

        for spec in registry.HPARAMS.get(algorithm, ()):
            define(spec, replace=False)
        # The plugin's datasets set their own values, for DomainBed's names too.
        for key in ("*", algorithm):
            for spec in (dataset_specs or {}).get(key, ()):
                define(spec, replace=True)
        return hparams

    _hparams._domainbed_fish_wrapped = True
    return _hparams


def register_hparams(hparams_registry: ModuleType) -> None:
    """Teach ``domainbed.hparams_registry`` the plugin's hyperparameters."""
    if getattr(hparams_registry, _MARK, False):
        return
    misc = import_domainbed("lib.misc")
    if not getattr(hparams_registry._hparams, "_domainbed_fish_wrapped", False):
        hparams_registry._hparams = _extended_hparams(hparams_registry._hparams, misc.seed_hash)
    for algorithm in registry.HPARAMS:
        _record("hparams", algorithm)
    setattr(hparams_registry, _MARK, True)


# ----------------------------------------------------------------------------- networks


def _extended_featurizer(original):
    """Wrap DomainBed's ``Featurizer(input_shape, hparams)`` with the plugin's networks.

    Only inputs DomainBed has no network for are taken: 3×64×64 (CdSprites-N) and
    flat inputs of a dataset that asks for the linear model (``linear_model``).
    """
    from domainbed_fish import networks

    @functools.wraps(original)
    def Featurizer(input_shape, hparams):
        if hparams.get("linear_model", False):
            return networks.LinearFeatures(input_shape)
        if len(input_shape) == 3 and tuple(input_shape[1:]) == networks.CdSpritesCNN.INPUT_SIZE:
            return networks.CdSpritesCNN(input_shape)
        return original(input_shape, hparams)

    Featurizer._domainbed_fish_wrapped = True
    return Featurizer


def _extended_classifier(original):
    """Wrap DomainBed's ``Classifier`` so the linear toy's model starts at zero."""
    from domainbed_fish import networks

    @functools.wraps(original)
    def Classifier(in_features, out_features, is_nonlinear=False):
        if isinstance(in_features, networks.ZeroInitWidth) and not is_nonlinear:
            return networks.zero_linear(in_features, out_features)
        return original(in_features, out_features, is_nonlinear)

    Classifier._domainbed_fish_wrapped = True
    return Classifier


def register_networks(networks_module: ModuleType) -> None:
    """Teach ``domainbed.networks``' featurizer selection the paper's networks."""
    if getattr(networks_module, _MARK, False):
        return
    if not getattr(networks_module.Featurizer, "_domainbed_fish_wrapped", False):
        networks_module.Featurizer = _extended_featurizer(networks_module.Featurizer)
        networks_module.Classifier = _extended_classifier(networks_module.Classifier)
    _record("networks", "CdSpritesCNN (3×64×64)")
    _record("networks", "LinearFeatures (linear_model)")
    setattr(networks_module, _MARK, True)


# ----------------------------------------------------------------------------- datasets, launchers


def register_datasets(datasets: ModuleType) -> None:
    """Add the plugin's datasets to ``domainbed.datasets`` and a clear unknown-name error."""
    if getattr(datasets, _MARK, False):
        return
    _add_listed(datasets, datasets.DATASETS, registry.DATASETS, "datasets")
    if not getattr(datasets.get_dataset_class, "_domainbed_fish_wrapped", False):
        datasets.get_dataset_class = _with_clear_error(datasets.get_dataset_class, "dataset", datasets.DATASETS)
    setattr(datasets, _MARK, True)


def register_launchers(command_launchers: ModuleType) -> None:
    """Add the plugin's launchers to ``domainbed.command_launchers.REGISTRY``."""
    if getattr(command_launchers, _MARK, False):
        return
    for name, target in registry.LAUNCHERS.items():
        command_launchers.REGISTRY.setdefault(name, registry.load(target))
        _record("launchers", name)
    setattr(command_launchers, _MARK, True)


# ----------------------------------------------------------------------------- data loaders


def _failing_fast(loader: type, weighted_fills_any_batch: bool) -> type:
    """Subclass one of DomainBed's infinite loaders so that a batch larger than its split
    raises :class:`BatchLargerThanSplitError` instead of hanging.

    Without weights the loaders sample ``len(split)`` indices per pass (with or without
    replacement) and drop the incomplete batch.  With weights DomainBed samples exactly
    ``batch_size`` indices: with replacement any split fills that (unchecked), without it
    torch fails at the first batch with a message that names neither cause nor fix.
    """

    class Loader(loader):
        def __init__(self, dataset, weights, batch_size, num_workers):
            batch_size = check_batch_size(batch_size)
            unweighted_or_unfillable = weights is None or not weighted_fills_any_batch
            if unweighted_or_unfillable and batch_size > len(dataset):
                raise BatchLargerThanSplitError(batch_size, len(dataset))
            super().__init__(dataset, weights, batch_size, num_workers)

    Loader.__name__ = Loader.__qualname__ = loader.__name__
    Loader.__module__ = loader.__module__
    Loader.__doc__ = loader.__doc__
    Loader._domainbed_fish_wrapped = True
    return Loader


def register_data_loaders(fast_data_loader: ModuleType) -> None:
    """Make ``domainbed.lib.fast_data_loader``'s infinite loaders fail fast on a batch that
    cannot be filled (registered before DomainBed's train script imports them)."""
    if getattr(fast_data_loader, _MARK, False):
        return
    for name, with_replacement in (("InfiniteDataLoader", True), ("InfiniteDataLoaderWithoutReplacement", False)):
        loader = getattr(fast_data_loader, name, None)
        if loader is not None and not getattr(loader, "_domainbed_fish_wrapped", False):
            setattr(fast_data_loader, name, _failing_fast(loader, weighted_fills_any_batch=with_replacement))
            _record("data loaders", f"{name} (batch larger than the split: clear error)")
    setattr(fast_data_loader, _MARK, True)


# ----------------------------------------------------------------------------- results


def _tolerant_load_records(original):
    """Wrap ``reporting.load_records(path)`` (what ``collect_results`` and
    ``list_top_hparams`` read a sweep with) with :func:`domainbed_fish.results.load_records`:
    the same records, every job directory included as DomainBed does, but a truncated line
    (a job killed while writing) is skipped with a ``MalformedResultsWarning`` naming the
    file and line, where DomainBed's reader stops with a ``JSONDecodeError``."""
    from domainbed_fish import results

    @functools.wraps(original)
    def load_records(path):
        return results.load_records(path, include_incomplete=True, progress=True)

    load_records._domainbed_fish_wrapped = True
    return load_records


def register_reporting(reporting: ModuleType) -> None:
    """Let DomainBed's result scripts read a sweep that holds a killed job's truncated line."""
    if getattr(reporting, _MARK, False):
        return
    if not getattr(reporting.load_records, "_domainbed_fish_wrapped", False):
        reporting.load_records = _tolerant_load_records(reporting.load_records)
        _record("results readers", "reporting.load_records (a truncated line: warning, not a crash)")
    setattr(reporting, _MARK, True)


_REGISTRARS = {
    "domainbed.algorithms": register_algorithms,
    "domainbed.networks": register_networks,
    "domainbed.hparams_registry": register_hparams,
    "domainbed.datasets": register_datasets,
    "domainbed.command_launchers": register_launchers,
    "domainbed.lib.fast_data_loader": register_data_loaders,
    "domainbed.lib.reporting": register_reporting,
}


def on_domainbed_import(module: ModuleType) -> None:
    """Called by the start-up hook right after one of DomainBed's modules is executed."""
    _REGISTRARS[module.__name__](module)


def register() -> dict[str, list[str]]:
    """Register everything into DomainBed now (idempotent); return what was added.

    Raises:
        DomainBedNotFoundError: DomainBed cannot be imported (the message says how
            to provide it).
    """
    for module_name, registrar in _REGISTRARS.items():
        registrar(import_domainbed(module_name.removeprefix("domainbed.")))
    return registered()


def registered() -> dict[str, list[str]]:
    """What the plugin has added to DomainBed in this process, by kind."""
    return {kind: list(names) for kind, names in _added.items()}
