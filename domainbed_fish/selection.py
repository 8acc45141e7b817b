"""Which jobs each of DomainBed's model-selection methods needs.

DomainBed trains one job per (dataset, algorithm, test environments, hparams seed,
trial).  Its three selection methods read different jobs:

- ``training`` (training-domain validation, ``IIDAccuracySelectionMethod``) and
  ``oracle`` (test-domain validation, ``OracleSelectionMethod``) read the jobs with a
  single test environment;
- ``loo`` (leave-one-domain-out, ``LeaveOneOutSelectionMethod``) for test environment
  ``t`` also needs, for every other environment ``v``, the job that holds out ``{t, v}``
  (its ``v`` accuracy is the validation score).

So a sweep only needs pairs of test environments when ``loo`` is wanted; that is 1 + (n-1)
jobs per held-out environment instead of 1 (e.g. 4 instead of 1 for the 4-domain PACS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: Selection method short names -> DomainBed ``model_selection`` class names.
SELECTION_METHODS: dict[str, str] = {
    "training": "IIDAccuracySelectionMethod",
    "loo": "LeaveOneOutSelectionMethod",
    "oracle": "OracleSelectionMethod",
}


def parse_selection(value: str | Iterable[str]) -> list[str]:
    """``"all"``, one name, a comma-separated list or a list of names -> ordered names.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if name == "all":
            wanted = list(SELECTION_METHODS)
        elif name in SELECTION_METHODS:
            wanted = [name]
        else:
            raise ValueError(
                f"unknown selection method {name!r}; use one of {', '.join(SELECTION_METHODS)} or 'all'"
            )
        out += [w for w in wanted if w not in out]
    return [name for name in SELECTION_METHODS if name in out]  # canonical order


def needs_pairs(selection: Iterable[str]) -> bool:
    """Whether the methods need jobs with two test environments (only ``loo`` does)."""
    return "loo" in selection


def required_test_envs(
    n_envs: int, selection: Iterable[str], test_envs: Sequence[int] | None = None
) -> list[list[int]]:
    """The test-environment lists whose jobs ``selection`` needs, in DomainBed's order.

    ``test_envs`` restricts which environments are reported as held out (default: all).

    Raises:
        ValueError: an environment index out of range, or ``loo`` on fewer than 3 domains.
    """
    selection = list(selection)
    held = sorted(set(range(n_envs) if test_envs is None else test_envs))
    bad = [e for e in held if not 0 <= e < n_envs]
    if bad:
        raise ValueError(f"--test_envs {bad}: this dataset has environments 0..{n_envs - 1}")
    pairs = needs_pairs(selection)
    if pairs and n_envs < 3:
        raise ValueError(
            f"leave-one-domain-out selection needs at least 3 environments, this dataset has {n_envs}; "
            "use --selection training or oracle"
        )
    out: list[list[int]] = []
    for i in range(n_envs):  # the order of DomainBed's all_test_env_combinations
        if i in held:
            out.append([i])
        if pairs:
            out += [[i, j] for j in range(i + 1, n_envs) if i in held or j in held]
    return out
