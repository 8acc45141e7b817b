"""Fish without DomainBed: the meta update, the domain schedule, Theorem 3.1, and the
persistent inner loop checked against a from-the-paper reference implementation."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    assert_resumes_identically,
    batchnorm_net,
    domain_minibatches,
    fish_config,
    idgm_config,
    tiny_net,
    with_a_bad_value,
)
from torch import nn

from domainbed_fish.errors import NonFiniteLossError
from domainbed_fish.fish import (
    FishUpdater,
    domain_schedule,
    fish_epsilon,
    fish_meta_update_,
)
from domainbed_fish.gradients import (
    gradient_inner_product,
    mean_pairwise_inner_product,
    per_domain_gradients,
    per_domain_losses,
)
from domainbed_fish.idgm import IDGMUpdater

# --------------------------------------------------------------------------- pure pieces


def test_meta_update_interpolates_floats_and_truncates_counters():
    meta = [torch.tensor([1.0, 2.0]), torch.tensor(4, dtype=torch.long)]
    inner = [torch.tensor([3.0, -2.0]), torch.tensor(7, dtype=torch.long)]
    fish_meta_update_(meta, inner, 0.25)
    torch.testing.assert_close(meta[0], torch.tensor([1.5, 1.0]))
    assert meta[1].dtype == torch.long and meta[1].item() == 4  # 4 + 0.25·3 = 4.75 → 4
    fish_meta_update_(meta, inner, 1.0)
    torch.testing.assert_close(meta[0], inner[0])


def test_meta_update_of_many_counters_is_domainbeds_arithmetic():
    g = torch.Generator().manual_seed(0)
    meta = [torch.randint(0, 1000, (), generator=g) for _ in range(6)] + [torch.randn(4, generator=g)]
    inner = [m + torch.randint(-5, 50, (), generator=g) for m in meta[:6]] + [torch.randn(4, generator=g)]
    for epsilon in (0.3, 0.5, 0.9):
        expected = [(m + epsilon * (i - m)).to(m.dtype) for m, i in zip(meta, inner)]  # DomainBed's, truncated
        fish_meta_update_(meta, inner, epsilon)
        assert [m.dtype for m in meta] == [torch.long] * 6 + [torch.float32]
        for a, b in zip(meta, expected):
            assert torch.equal(a, b)
        assert any(m != i for m, i in zip(meta[:6], inner[:6]))  # the counters did not all reach θ̃


@pytest.mark.parametrize("epsilon", [0.3, 0.5])  # 0.5: the fused path for powers of two
def test_meta_update_consuming_inner_gives_the_same_weights(epsilon):
    g = torch.Generator().manual_seed(0)
    meta = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    inner = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    expected = [m + epsilon * (i - m) for m, i in zip(meta, inner)]  # DomainBed's arithmetic
    fish_meta_update_(meta, inner, epsilon, consume_inner=True)
    for a, b in zip(meta, expected):
        assert torch.equal(a, b)  # bit for bit


def test_epsilon_conventions():
    assert fish_epsilon(0.5, 5, "meta_lr") == 0.5
    assert fish_epsilon(0.5, 5, "meta_lr/meta_steps") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="convention"):
        fish_epsilon(0.5, 5, "meta_lr*2")


def test_schedule_fixed_random_and_subsets():
    g = torch.Generator().manual_seed(0)
    assert domain_schedule(4, None, False, g) == [0, 1, 2, 3]
    orders = {tuple(domain_schedule(3, None, True, g)) for _ in range(200)}
    assert orders == set(itertools.permutations(range(3)))  # every order occurs
    for _ in range(20):
        subset = domain_schedule(5, 2, False, g)
        assert len(set(subset)) == 2 and subset == sorted(subset)
    with pytest.raises(ValueError, match="only 3 domain minibatches"):
        domain_schedule(3, 4, False, g)


# --------------------------------------------------------------------------- Theorem 3.1


def _mean_displacement(alpha: float, net: nn.Module, batches) -> torch.Tensor:
    """E[θ − θ̃] over all S! domain orders, inner SGD of step α."""
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    total = torch.zeros_like(theta)
    orders = list(itertools.permutations(range(len(batches))))
    for order in orders:
        model = copy.deepcopy(net)
        config = fish_config(fish_inner_optimizer="sgd", fish_inner_momentum=0.0, lr=alpha,
                             meta_lr=1.0, gip_every=0)
        FishUpdater(model, config).step(batches, order=order)
        total += theta - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return total / len(orders)


def test_theorem_3_1_fish_follows_idgm_to_second_order():
    """E[θ − θ̃] = αSḠ − (α²S(S−1)/4)∇Ĝ + O(α³) (the paper's Theorem 3.1)."""
    net, batches = tiny_net(), domain_minibatches(num_domains=3)
    num_domains = len(batches)
    params = list(net.parameters())
    grads = per_domain_gradients(per_domain_losses(net, batches), params, create_graph=True)
    mean_grad = torch.cat([torch.stack(g).mean(0).reshape(-1) for g in zip(*grads)]).detach()
    grad_gip = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean_pairwise_inner_product(grads), params)])

    second_order_errors, first_order_errors = [], []
    for alpha in (0.04, 0.02, 0.01):
        displacement = _mean_displacement(alpha, net, batches)
        first = alpha * num_domains * mean_grad
        second = first - alpha**2 * num_domains * (num_domains - 1) / 4 * grad_gip
        second_order_errors.append((displacement - second).norm().item())
        first_order_errors.append((displacement - first).norm().item())
        # The α² term is what IDGM adds; the prediction must capture most of it.
        assert second_order_errors[-1] < 0.1 * (second - first).norm().item()

    for big, small in itertools.pairwise(second_order_errors):
        assert 6.0 < big / small < 10.0, second_order_errors  # error ∝ α³
    for big, small in itertools.pairwise(first_order_errors):
        assert 3.0 < big / small < 5.0, first_order_errors  # without the Ĝ term: ∝ α²


# --------------------------------------------------------------------------- reference equivalence


def reference_fish_step(net, batches, order, make_optimizer, epsilon):
    """Fish as the paper states it: deep copy, fresh inner optimizer, interpolate the whole
    state dict (buffers too, as DomainBed's Fish does).  Returns the mean of the inner
    losses, the ``loss`` the plugin reports (README)."""
    inner = copy.deepcopy(net)
    optimizer = make_optimizer(inner.parameters())
    losses = []
    for i in order:
        x, y = batches[i]
        optimizer.zero_grad()
        loss = F.cross_entropy(inner(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    inner_state = inner.state_dict()
    net.load_state_dict({k: v + epsilon * (inner_state[k] - v) for k, v in net.state_dict().items()})
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "name, momentum, weight_decay, make_optimizer, epsilon_rule",
    [
        ("adam", 0.9, 0.0, lambda p: torch.optim.Adam(p, lr=1e-2), "meta_lr"),
        ("adam", 0.0, 0.1, lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.1), "meta_lr"),
        ("amsgrad", 0.9, 0.0, lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True), "meta_lr/meta_steps"),
        ("sgd", 0.9, 0.1, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1), "meta_lr/meta_steps"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_with_fresh_inner_optimizer_and_random_order(
    name, momentum, weight_decay, make_optimizer, epsilon_rule, device,
):
    batches = domain_minibatches(num_domains=4, device=device)
    ours, reference = tiny_net(device=device), tiny_net(device=device)
    config = fish_config(fish_inner_optimizer=name, fish_inner_momentum=momentum, lr=1e-2, meta_lr=0.3,
                         weight_decay=weight_decay, fish_reload_inner_state=False, fish_random_order=True,
                         meta_steps=3, fish_epsilon=epsilon_rule, num_domains=4)
    updater = FishUpdater(ours, config, seed=0)
    schedule = torch.Generator().manual_seed(0)
    for _ in range(6):
        order = domain_schedule(4, 3, True, schedule)
        loss = updater.step(batches)["loss"]
        assert loss == pytest.approx(
            reference_fish_step(reference, batches, order, make_optimizer, fish_epsilon(0.3, 3, epsilon_rule)),
            rel=1e-12)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("epsilon", [0.5, 0.3])  # 0.5: the fused path for powers of two
def test_batchnorm_statistics_are_interpolated_like_the_weights(epsilon):
    """θ ← θ + ε(θ̃ − θ) covers the buffers as DomainBed's state-dict arithmetic does: the
    running statistics of BatchNorm (a ResNet's) move with the inner loop's, not stay put."""
    batches = domain_minibatches()
    ours, reference = batchnorm_net(), batchnorm_net()
    updater = FishUpdater(ours, fish_config(meta_lr=epsilon, fish_reload_inner_state=False, gip_every=0))
    for _ in range(3):
        updater.step(batches)
        reference_fish_step(reference, batches, range(len(batches)), lambda p: torch.optim.Adam(p, lr=1e-3), epsilon)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert ours[1].running_mean.abs().min() > 1e-3  # the statistics did move from their initial zeros


def test_inner_optimizer_state_carries_over_or_not():
    batches = domain_minibatches()
    carried = FishUpdater(tiny_net(), fish_config())
    fresh = FishUpdater(tiny_net(), fish_config(fish_reload_inner_state=False))
    for _ in range(2):
        carried.step(batches)
        fresh.step(batches)
    assert {int(s["step"]) for s in carried.inner_optimizer.state.values()} == {6}
    assert {int(s["step"]) for s in fresh.inner_optimizer.state.values()} == {3}


def test_no_construction_or_deep_copy_per_step(monkeypatch):
    net, batches = tiny_net(), domain_minibatches()
    updater = FishUpdater(net, fish_config(gip_every=1))
    inner, inner_optimizer = updater.inner_network, updater.inner_optimizer
    calls = []
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: calls.append("deepcopy"))
    original_module_init = nn.Module.__init__
    monkeypatch.setattr(nn.Module, "__init__", lambda self, *a, **k: (calls.append("module"), original_module_init(self, *a, **k))[1])
    original_optimizer_init = torch.optim.Optimizer.__init__
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", lambda self, *a, **k: (calls.append("optimizer"), original_optimizer_init(self, *a, **k))[1])
    for _ in range(3):
        updater.step(batches)
    assert calls == []
    assert updater.inner_network is inner and updater.inner_optimizer is inner_optimizer


# --------------------------------------------------------------------------- warm-up, diagnostic, errors, checkpoints


@pytest.mark.parametrize("inner, erm_optimizer", [
    ("adam", lambda params: torch.optim.Adam(params, lr=1e-3)),
    ("amsgrad", lambda params: torch.optim.Adam(params, lr=1e-3, amsgrad=True)),
    ("sgd", lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9)),  # official Camelyon17 pretraining
])
def test_warmup_steps_are_plain_erm_then_fish(inner, erm_optimizer):
    batches = domain_minibatches()
    net, erm = tiny_net(), tiny_net()
    # Ĝ measured every 2 steps, through the warm-up too: it must not disturb the ERM steps.
    # The inner momentum is not the warm-up's: that stays DomainBed's 0.9.
    updater = FishUpdater(net, fish_config(fish_warmup_steps=3, gip_every=2, fish_inner_optimizer=inner,
                                           fish_inner_momentum=0.5))
    optimizer = erm_optimizer(erm.parameters())
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    warmup_stats = []
    for _ in range(3):
        warmup_stats.append(updater.step(batches))
        optimizer.zero_grad()
        F.cross_entropy(erm(x), y).backward()
        optimizer.step()
    for p, q in zip(net.parameters(), erm.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not updater.inner_optimizer.state  # the inner loop has not run yet
    assert ["gip" in s for s in warmup_stats] == [True, False, True]
    assert updater.warmup_optimizer.state  # the warm-up's moments, in use
    fish_stats = [updater.step(batches) for _ in range(2)]
    assert not updater.warmup_optimizer.state  # freed once Fish takes over
    assert not updater.state_dict()["warmup_optimizer"]["state"]
    assert ["gip" in s for s in fish_stats] == [False, True]  # steps 3 and 4: one grid for both phases
    inner_state = list(updater.inner_optimizer.state.values())
    if inner == "sgd":
        assert inner_state and all(s["momentum_buffer"] is not None for s in inner_state)
    else:
        assert {int(s["step"]) for s in inner_state} == {6}


def _bn_dropout_net(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).to(device)


@pytest.mark.parametrize("device", DEVICES)  # on a GPU, the measurement must fork the CUDA generator too
def test_gip_measurement_has_no_effect_on_training(device):
    batches = domain_minibatches(dtype=torch.float32, device=device)
    measured, unmeasured = _bn_dropout_net(device=device), _bn_dropout_net(device=device)
    a = FishUpdater(measured, fish_config(gip_every=1), seed=0)
    b = FishUpdater(unmeasured, fish_config(gip_every=0), seed=0)
    torch.manual_seed(1)
    stats_a = [a.step(batches) for _ in range(4)]
    torch.manual_seed(1)
    stats_b = [b.step(batches) for _ in range(4)]
    assert all("gip" in s for s in stats_a) and not any("gip" in s for s in stats_b)
    for p, q in zip(measured.state_dict().values(), unmeasured.state_dict().values()):
        assert torch.equal(p, q)


def test_gip_is_measured_at_the_weights_before_the_step_every_k_steps():
    batches = domain_minibatches()
    net = tiny_net()
    updater = FishUpdater(net, fish_config(gip_every=3))
    reported = []
    for step in range(7):
        expected = gradient_inner_product(copy.deepcopy(net), batches).item()
        stats = updater.step(batches)
        if "gip" in stats:
            reported.append(step)
            assert stats["gip"] == pytest.approx(expected, rel=1e-12)
    assert reported == [0, 3, 6]


def test_non_finite_loss_names_step_and_domain_and_keeps_weights():
    net, batches = tiny_net(), domain_minibatches()
    updater = FishUpdater(net, fish_config())
    updater.step(batches)
    before = copy.deepcopy(net.state_dict())
    bad = list(batches)
    bad[1] = (torch.full_like(bad[1][0], float("inf")), bad[1][1])
    with pytest.raises(NonFiniteLossError, match=r"Fish: non-finite loss .* at update step 1 on training domain 1"):
        updater.step(bad)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    updater.step(batches)  # recovers: the next good step trains normally
    assert all(torch.isfinite(p).all() for p in net.parameters())
    # In another domain order the error still names the domain, not its place in the order.
    with pytest.raises(NonFiniteLossError, match=r"at update step 2 on training domain 1"):
        updater.step(bad, order=[2, 0, 1])


@pytest.mark.parametrize("make_updater", [
    lambda net: FishUpdater(net, fish_config()),
    lambda net: FishUpdater(net, fish_config(fish_warmup_steps=5)),
    lambda net: IDGMUpdater(net, idgm_config(idgm_penalty_anneal_iters=0)),
], ids=["fish-step", "fish-warm-up-step", "idgm-step"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_step_leaves_batchnorm_statistics_as_they_were(make_updater, bad):
    """Fish's warm-up step and IDGM's step run their forward passes on θ itself, so
    BatchNorm's running statistics would take the bad value before the loss is checked;
    after the error they are as before the step, and eval() still predicts."""
    net, batches = batchnorm_net(), domain_minibatches()
    updater = make_updater(net)
    updater.step(batches)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(NonFiniteLossError):
        updater.step(with_a_bad_value(batches, 1, bad))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.isfinite(net.eval()(batches[0][0])).all()


@pytest.mark.parametrize("warmup_steps", [0, 5], ids=["fish", "mid-warm-up"])
def test_checkpoint_resumes_identically(warmup_steps):
    """Saved after 3 steps, resumed for 3: with a warm-up of 5 that resumes the warm-up's own
    optimizer (its moments) and then crosses into Fish."""
    batches = domain_minibatches(num_domains=4)
    config = fish_config(fish_random_order=True, meta_steps=3, num_domains=4, fish_warmup_steps=warmup_steps)
    assert_resumes_identically(FishUpdater(tiny_net(), config, seed=3),
                               FishUpdater(tiny_net(seed=9), config, seed=123), batches, 3, 3)


@pytest.mark.parametrize("name", ["Fish", "IDGM"])
def test_an_update_without_minibatches_says_what_it_takes(name):
    updater = FishUpdater(tiny_net(), fish_config()) if name == "Fish" else IDGMUpdater(tiny_net(), idgm_config())
    with pytest.raises(ValueError, match=rf"{name}\.update\(\) got no minibatches: pass a list with one \(x, y\)"):
        updater.step([])
