"""Fish: first-order inter-domain gradient matching (Shi et al., ICLR 2022, Algorithm 1).

One outer step, from weights θ:

1. θ̃ ← θ (parameters and buffers);
2. for each sampled domain i, in order: one optimizer step on θ̃ with the
   cross-entropy of a minibatch of domain i;
3. θ ← θ + ε (θ̃ − θ).

With inner SGD of step α and a uniformly random domain order, Theorem 3.1 gives
E[θ − θ̃] = αSḠ − (α²S(S−1)/4)∇Ĝ + O(α³): Fish's expected step is a gradient step
on the IDGM objective L_erm − γĜ with γ = α(S−1)/4 (see ``idgm.py``).

Unlike DomainBed's built-in Fish, which builds a new network and a new optimizer
on every step, :class:`FishUpdater` keeps one inner network and one inner
optimizer for the whole run and moves weights with in-place ``foreach`` ops.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainbed_fish.buffers import buffers_restored_on_error
from domainbed_fish.errors import NonFiniteLossError
from domainbed_fish.gradients import Minibatches, gradient_inner_product, require_minibatches
from domainbed_fish.hparams import FishConfig
from domainbed_fish.optim import make_optimizer, reset_optimizer_state

# ----------------------------------------------------------------------------- pure math


def fish_epsilon(meta_lr: float, num_inner_steps: int, convention: str = "meta_lr") -> float:
    """The outer step size ε of θ ← θ + ε(θ̃ − θ).

    ``"meta_lr"``: ε = meta_lr (DomainBed's Fish).  ``"meta_lr/meta_steps"``:
    ε = meta_lr / (number of inner steps), the official WILDS code's convention.
    """
    if convention == "meta_lr":
        return meta_lr
    if convention == "meta_lr/meta_steps":
        return meta_lr / num_inner_steps
    raise ValueError(f"unknown ε convention {convention!r}")


def model_state_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters then buffers, the whole state Fish interpolates, in a stable order."""
    return [*module.parameters(), *module.buffers()]


@torch.no_grad()
def copy_state_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """θ̃ ← θ, in place (no allocation, no module construction)."""
    torch._foreach_copy_(list(dst), list(src))


@torch.no_grad()
def fish_meta_update_(
    meta: Sequence[Tensor], inner: Sequence[Tensor], epsilon: float, consume_inner: bool = False
) -> None:
    """θ ← θ + ε(θ̃ − θ), in place, over parameters and buffers.

    Floating-point tensors take three ``foreach`` ops (difference, scale, add),
    the same arithmetic as DomainBed's state-dict version, so both produce
    bitwise-identical weights; a fused ``lerp`` rounds differently, and Adam's
    normalisation amplifies such 1-ulp differences to ~1e-3 within 20 steps.
    Integer buffers (BatchNorm's ``num_batches_tracked``) are interpolated in
    floating point and truncated, as DomainBed's arithmetic does to them.

    ``consume_inner=True`` computes the difference in ``inner``'s own storage
    (same values, no weight-sized temporary: on a CPU a fresh allocation of that
    size costs page faults every step); ``inner`` then holds scratch values.
    """
    floats_meta, floats_inner, ints_meta, ints_inner = [], [], [], []
    for m, i in zip(meta, inner, strict=True):
        (floats_meta if m.is_floating_point() else ints_meta).append(m)
        (floats_inner if m.is_floating_point() else ints_inner).append(i)
    if ints_meta:
        # All counters in one foreach chain (ResNet-50 has 53) rather than four ops
        # each: on a GPU every op is a kernel launch.
        moved = torch._foreach_mul(torch._foreach_sub(ints_inner, ints_meta), epsilon)
        torch._foreach_copy_(ints_meta, torch._foreach_add(ints_meta, moved))
    if not floats_meta:
        return
    if consume_inner:
        torch._foreach_sub_(floats_inner, floats_meta)
        step = floats_inner
    else:
        step = torch._foreach_sub(floats_inner, floats_meta)
    if math.frexp(epsilon)[0] == 0.5:
        # ε a power of two (DomainBed's default 0.5): ε·d is exact, so a fused
        # multiply-add rounds like the separate ops (short of subnormal
        # differences); one pass over the weights saved.
        torch._foreach_add_(floats_meta, step, alpha=epsilon)
        return
    torch._foreach_mul_(step, epsilon)
    torch._foreach_add_(floats_meta, step)


def domain_schedule(
    num_domains: int,
    meta_steps: int | None,
    random_order: bool,
    generator: torch.Generator,
) -> list[int]:
    """Which domains the inner loop visits, in order.

    All domains in environment order by default (DomainBed's Fish); ``meta_steps``
    distinct domains drawn at random when fewer than all are wanted; a fresh
    random permutation when ``random_order`` (the order Theorem 3.1 assumes).
    """
    count = num_domains if meta_steps is None else meta_steps
    if count > num_domains:
        raise ValueError(
            f"meta_steps = {count} but this step has only {num_domains} domain minibatches"
        )
    if count == num_domains and not random_order:
        return list(range(num_domains))
    chosen = torch.randperm(num_domains, generator=generator)[:count].tolist()
    return chosen if random_order else sorted(chosen)


# ----------------------------------------------------------------------------- the step


#: Momentum (SGD) or β₁ (Adam) of the ERM warm-up's optimizer: DomainBed's Adam, and the
#: official Camelyon17 recipe's SGD.
WARMUP_MOMENTUM = 0.9


class FishUpdater:
    """Fish's outer step on ``network``, with a persistent inner copy and optimizer.

    Framework-free: DomainBed's ``Fish`` algorithm (``algorithms.py``) is a thin
    wrapper around it.  ``network`` is trained in place.
    """

    def __init__(self, network: nn.Module, config: FishConfig, seed: int | None = None):
        self.network = network
        self.config = config
        # Built once: the inner loop only ever copies weights into it.
        self.inner_network = copy.deepcopy(network).train()
        self.inner_optimizer = self._optimizer(self.inner_network, config.inner_optimizer)
        # Used only by the ERM warm-up steps (fish_warmup_steps): the inner optimizer's kind, as
        # in the official code's pretraining (Camelyon17: SGD), with DomainBed's momentum/β₁ 0.9.
        self.warmup_optimizer = make_optimizer(config.inner_optimizer, self.network.parameters(), config.lr,
                                               config.weight_decay, WARMUP_MOMENTUM)
        self.generator = torch.Generator()
        self.generator.manual_seed(torch.initial_seed() if seed is None else seed)
        self.num_updates = 0

    def _optimizer(self, module: nn.Module, name: str) -> torch.optim.Optimizer:
        c = self.config
        return make_optimizer(name, module.parameters(), c.lr, c.weight_decay, c.inner_momentum)

    # -- one update --------------------------------------------------------------------

    def step(self, minibatches: Minibatches, order: Sequence[int] | None = None) -> dict[str, float]:
        """One update: an ERM warm-up step, or one Fish outer step.

        ``order`` overrides the domain schedule for this step (used to average
        over all orders when checking Theorem 3.1).
        """
        require_minibatches(minibatches, "Fish")
        c = self.config
        # Ĝ is traced on the same step grid through warm-up and Fish, so the trace
        # is comparable with ERM's from step 0 (the paper's Figure 5).
        gip = None
        if c.gip_every and self.num_updates % c.gip_every == 0:
            gip = self.measure_gip(minibatches)
        if self.num_updates < c.warmup_steps:
            stats = self._erm_step(minibatches)
        else:
            if self.warmup_optimizer.state:
                # The warm-up's moments (twice the weights) are never read again: free them,
                # in memory and in every later checkpoint (an older checkpoint's too).
                reset_optimizer_state(self.warmup_optimizer)
            stats = self._fish_step(minibatches, order)
        if gip is not None:
            stats["gip"] = gip
        self.num_updates += 1
        return stats

    def _erm_step(self, minibatches: Minibatches) -> dict[str, float]:
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        with buffers_restored_on_error(self.network, NonFiniteLossError):
            loss = F.cross_entropy(self.network(x), y)
            value = loss.item()
            self._check_finite([value])
        self.warmup_optimizer.zero_grad()
        loss.backward()
        self.warmup_optimizer.step()
        return {"loss": value}

    def _fish_step(self, minibatches: Minibatches, order: Sequence[int] | None) -> dict[str, float]:
        c = self.config
        if order is None:
            order = domain_schedule(len(minibatches), c.meta_steps, c.random_order, self.generator)
        order = list(order)
        meta = model_state_tensors(self.network)
        inner = model_state_tensors(self.inner_network)
        stats: dict[str, float] = {}

        copy_state_(inner, meta)
        if not c.reload_inner_state:
            reset_optimizer_state(self.inner_optimizer)

        losses = []
        for i in order:
            x, y = minibatches[i]
            # Free the previous gradients before the forward pass, so that its
            # activations do not sit on top of them (the plain training loop's order).
            self.inner_optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.inner_network(x), y)
            loss.backward()
            self.inner_optimizer.step()
            losses.append(loss.detach())

        # One synchronisation per step; θ is untouched until the check passes.
        values = torch.stack(losses).tolist()
        try:
            self._check_finite(values, order)
        except NonFiniteLossError:
            reset_optimizer_state(self.inner_optimizer)  # its moments saw the bad values
            raise
        # The inner weights are scratch from here on: the next step copies θ into them.
        fish_meta_update_(meta, inner, fish_epsilon(c.meta_lr, len(order), c.epsilon), consume_inner=True)
        stats["loss"] = sum(values) / len(values)
        return stats

    def _check_finite(self, values: list[float], domains: list[int] | None = None) -> None:
        bad = next((k for k, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is None:
            return
        domain = domains[bad] if domains is not None else None
        raise NonFiniteLossError("Fish", self.num_updates, domain, values[bad])

    # -- diagnostic --------------------------------------------------------------------

    def measure_gip(self, minibatches: Minibatches) -> float:
        """Ĝ at the current weights θ, with no effect on training.

        Measured on the inner copy (so θ's ``.grad`` and BatchNorm statistics stay
        untouched) under a forked RNG (so dropout draws are the same as without
        the measurement); the caller copies θ into the inner network afterwards.
        """
        meta = model_state_tensors(self.network)
        copy_state_(model_state_tensors(self.inner_network), meta)
        devices = sorted({t.device for t in meta if t.device.type == "cuda"}, key=str)
        with torch.random.fork_rng(devices=devices):
            return gradient_inner_product(self.inner_network, minibatches).item()

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the network: the step count, both optimizers and
        the domain-order generator."""
        return {
            "num_updates": self.num_updates,
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "warmup_optimizer": self.warmup_optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the network is loaded by its owner).

        The optimizers get copies: torch's ``load_state_dict`` keeps tensors already on the
        right device, so a state dict loaded in memory would share its moments with its source.
        """
        state = copy.deepcopy(state)
        self.num_updates = int(state["num_updates"])
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self.warmup_optimizer.load_state_dict(state["warmup_optimizer"])
        # A checkpoint loaded with map_location to an accelerator moves the generator's state too.
        self.generator.set_state(state["generator"].cpu())
