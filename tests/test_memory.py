"""Fish and IDGM hold no more memory after many steps than after a few: no graph,
gradient or optimizer state accumulates across ``update()`` calls.

Measured exactly, from torch's allocator events (``domainbed_fish.profiling``):
the bytes a window of steps leaves allocated, and its peak, must not depend on
the number of steps in the window.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import fish_config, idgm_config
from torch import nn

from domainbed_fish.fish import FishUpdater
from domainbed_fish.idgm import IDGMUpdater
from domainbed_fish.profiling import track_tensor_memory


def small_cnn() -> nn.Module:
    """Convolutions, BatchNorm (buffers) and a classifier: every kind of state Fish moves."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    )


def image_minibatches(num_domains: int = 3, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, 8, 8, generator=g) + d, torch.randint(0, 3, (batch,), generator=g))
            for d in range(num_domains)]


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))


def window(step, steps: int):
    """Allocation figures (peak, net bytes) and the Python-visible tensor count after ``steps`` calls."""
    gc.collect()
    gc.disable()  # Python's cycle collector would otherwise free garbage at varying points
    try:
        with track_tensor_memory() as memory:
            for _ in range(steps):
                step()
            gc.collect()
    finally:
        gc.enable()
    return memory.peak, memory.net, live_tensors()


UPDATERS = {
    "Fish": lambda: FishUpdater(small_cnn(), fish_config(gip_every=4)),  # the diagnostic runs too
    "Fish, fresh inner optimizer": lambda: FishUpdater(small_cnn(), fish_config(fish_reload_inner_state=False)),
    "IDGM, annealed": lambda: IDGMUpdater(small_cnn(), idgm_config(idgm_penalty_anneal_iters=6)),
}


@pytest.mark.parametrize("name", list(UPDATERS))
def test_memory_is_flat_across_many_updates(name):
    updater, batches = UPDATERS[name](), image_minibatches()
    step = lambda: updater.step(batches)  # noqa: E731
    for _ in range(8):  # past warm-up, annealing switch and the first gip measurement
        step()
    window(step, 4)  # the first profiled window also sees the profiler's own start-up
    early = window(step, 4)
    many = window(step, 12)
    late = window(step, 4)
    assert many[1] == 0, many  # twelve steps leave nothing allocated behind them
    assert late == early, (early, late)  # same peak, nothing held, same live tensors
    assert early[0] > 0  # the window does see the steps' working memory


def test_the_measurement_sees_a_leak():
    """A step that keeps its loss (and with it the graph) grows with every call."""
    net, batches = small_cnn(), image_minibatches()
    kept = []

    def leaky_step():
        x, y = batches[0]
        kept.append(F.cross_entropy(net(x), y))

    leaky_step()
    window(leaky_step, 4)
    early, many, late = window(leaky_step, 4), window(leaky_step, 12), window(leaky_step, 4)
    assert many[1] == 3 * early[1] > 0  # every step keeps the same bytes: growth in proportion
    assert late[2] > early[2]
