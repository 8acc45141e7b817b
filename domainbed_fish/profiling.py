"""Tensor memory accounting on any device, from torch's own allocator events.

On a GPU, ``torch.cuda.max_memory_allocated`` answers "how much tensor memory did
this need at its peak"; a CPU has no such counter.  :func:`track_tensor_memory`
gives the same figure on a CPU from the profiler's allocation events (every
allocation and free of torch's CPU allocator, in order), so it is exact and
deterministic, unlike RSS, which also counts the C library's cached free memory.
Used by the benchmark and by the test that memory stays flat across steps.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class TensorMemory:
    """Bytes allocated minus bytes freed inside the tracked region.

    ``peak``: the highest point reached; ``net``: what is still held at the end.
    Memory allocated before the region counts as zero (its frees are not
    reported by torch), so both figures are attributable to the region.
    """

    peak: int = 0
    net: int = 0
    timeline: list[int] = field(default_factory=list, repr=False)


@contextlib.contextmanager
def track_tensor_memory(device: torch.device | str = "cpu") -> Iterator[TensorMemory]:
    """Measure the tensor memory of the ``with`` block on ``device``.

    CPU: from ``torch.profiler`` allocation events.  CUDA: from
    ``torch.cuda.max_memory_allocated`` and ``memory_allocated`` relative to the
    start (``timeline`` stays empty).  The figures are filled in on exit.
    """
    device = torch.device(device)
    result = TensorMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device) - start
        result.net = torch.cuda.memory_allocated(device) - start
        return
    if device.type != "cpu":
        raise ValueError(f"tensor memory tracking supports cpu and cuda devices, not {device.type!r}")

    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield result
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    result.timeline = list(itertools.accumulate(e.nbytes() for e in events))
    result.peak = max([0, *result.timeline])
    result.net = result.timeline[-1] if result.timeline else 0
