"""The C allocator's policy in training jobs: reuse freed memory instead of returning it.

On Linux, glibc's ``malloc`` serves every block above its mmap threshold (128 KiB at
first, raised with use up to 32 MiB) with a fresh ``mmap`` and gives it back to the kernel
on ``free``, and it trims the top of its heap once more than 128 KiB is free there.  A
training step on a CPU allocates and frees the same large activation and gradient tensors
every step, so every step writes to fresh pages, which the kernel hands out one zero-filled
page fault at a time.  Measured on CdSprites-30 ERM (DomainBed's train script, 101 steps,
one thread, 32 images per domain): 18.6 million minor page faults and 233 s with glibc's
defaults, 0.37 million and 160 s with this policy, and the same numbers in
``results.jsonl`` (``benchmarks/allocator_policy.py`` prints these figures).

:func:`reuse_freed_memory` sets ``M_MMAP_MAX = 0`` (every block comes from the heap, where
a freed block is reused) and ``M_TRIM_THRESHOLD`` = 1 GiB (free memory at the heap's top
is kept between steps).  The cost: the process keeps the heap it has grown, so its
resident memory stays near its peak (about 15% above the default policy's peak in the
measurement above).  It changes no result: only where tensors live.

Training jobs started by the plugin (``domainbed_fish.run_job``: the plugin's sweeps and
the reproduction command) apply it.  Commands that the plugin's launchers (``local_parallel``,
``submitit``) run for DomainBed's own ``sweep``, which start ``domainbed.scripts.train``
directly, get the same policy through the environment, which glibc reads at start-up
(:func:`job_environment`); for DomainBed's other launchers, export it yourself::

    export GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824

``DOMAINBED_FISH_MALLOC=system`` leaves glibc's defaults alone (in both ways).  Elsewhere than
Linux with glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Environment variable choosing the policy: ``reuse`` (default) or ``system``.
POLICY_VARIABLE = "DOMAINBED_FISH_MALLOC"
POLICIES = ("reuse", "system")

#: ``mallopt`` parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory kept at the heap's top: far above a CdSprites or MNIST job's step.
TRIM_THRESHOLD = 1 << 30

#: The same policy for processes the plugin does not start (glibc reads it at start-up).
GLIBC_TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


def chosen_policy() -> str:
    """The policy :data:`POLICY_VARIABLE` asks for (``reuse`` when unset)."""
    value = os.environ.get(POLICY_VARIABLE, "").strip().lower() or "reuse"
    if value not in POLICIES:
        raise ValueError(
            f"{POLICY_VARIABLE}={os.environ[POLICY_VARIABLE]!r} is not a memory-allocator policy: "
            f"set it to 'reuse' (keep freed memory for the next step, the default) or 'system' "
            f"(glibc's defaults), or unset it."
        )
    return value


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    # gnu_get_libc_version exists in glibc only; musl's mallopt is a stub.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def job_environment(env: dict[str, str]) -> dict[str, str]:
    """What to add to ``env`` so that a job started with it gets the policy from glibc:
    ``GLIBC_TUNABLES``, unless the policy is ``system``, the C library is not glibc, or
    ``env`` already sets ``GLIBC_TUNABLES`` (the user's own tunables are left alone)."""
    if "GLIBC_TUNABLES" in env or chosen_policy() == "system" or _glibc() is None:
        return {}
    return {"GLIBC_TUNABLES": GLIBC_TUNABLES}


def reuse_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep freed memory for reuse in this process (see the module's
    docstring); return whether the policy is now in force.

    ``False`` when :data:`POLICY_VARIABLE` is ``system`` or the C library is not glibc.
    Idempotent.  Raises ``ValueError`` for an unknown :data:`POLICY_VARIABLE` value.
    """
    if chosen_policy() == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on an invalid value.
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
