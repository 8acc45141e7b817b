"""Exact IDGM: its gradient against a brute-force pairwise computation and finite
differences; its annealing, checks and checkpoints."""

from __future__ import annotations

import copy
import functools
import itertools

import numpy as np
import pytest
import torch
from conftest import (
    DEVICES,
    assert_resumes_identically,
    domain_minibatches,
    idgm_config,
    tiny_net,
)
from test_gradients import brute_force_gip

from domainbed_fish.errors import NonFiniteLossError
from domainbed_fish.gradients import per_domain_gradients, per_domain_losses
from domainbed_fish.hparams import IDGM_HPARAMS, IDGMConfig
from domainbed_fish.idgm import IDGMUpdater, idgm_gradient, idgm_objective, metric_gip
from domainbed_fish.optim import apply_to_state_, step_metric

GAMMA = 0.7
INF = float("inf")


def brute_force_idgm_gradient(net, batches, gamma):
    """∇(L_erm − γ·mean_{i<j} G_i·G_j) with the pairs enumerated one by one."""
    params = list(net.parameters())
    losses = per_domain_losses(net, batches)
    grads = per_domain_gradients(losses, params, create_graph=True)
    objective = torch.stack(losses).mean() - gamma * brute_force_gip(grads)
    return torch.autograd.grad(objective, params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_domains", [2, 3, 5])
def test_gradient_matches_brute_force_pairs(num_domains, device):
    net, batches = tiny_net(device=device), domain_minibatches(num_domains=num_domains, device=device)
    params = list(net.parameters())
    ours = idgm_gradient(per_domain_losses(net, batches), params, GAMMA).grads
    for a, b in zip(ours, brute_force_idgm_gradient(net, batches, GAMMA)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_of_losses_linear_in_a_parameter_matches_brute_force_pairs():
    """``idgm_gradient`` takes any per-domain losses: where a loss is linear in a parameter,
    that parameter's G_s is a constant with no graph (autograd would refuse to seed it), and
    its part of ∇Ĝ is zero."""
    net, batches = tiny_net(), domain_minibatches(num_domains=3)
    offset = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    params = [*net.parameters(), offset]

    def losses():
        return [loss + (offset * x.mean(0)).sum() for loss, (x, _) in zip(per_domain_losses(net, batches), batches)]

    grads = per_domain_gradients(losses(), params, create_graph=True)
    assert not grads[0][-1].requires_grad  # the constant G_s of the linear term
    expected = torch.autograd.grad(torch.stack(losses()).mean() - GAMMA * brute_force_gip(grads), params)
    for a, b in zip(idgm_gradient(losses(), params, GAMMA).grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_matches_finite_differences(device):
    net, batches = tiny_net(device=device), domain_minibatches(num_domains=3, device=device)
    params = list(net.parameters())
    ours = torch.cat([g.reshape(-1) for g in idgm_gradient(per_domain_losses(net, batches), params, GAMMA).grads])
    step = 1e-5
    numeric = []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for k in range(flat.numel()):
                old = flat[k].item()
                flat[k] = old + step
                with torch.enable_grad():
                    plus = idgm_objective(net, batches, GAMMA).item()
                flat[k] = old - step
                with torch.enable_grad():
                    minus = idgm_objective(net, batches, GAMMA).item()
                flat[k] = old
                numeric.append((plus - minus) / (2 * step))
    numeric = torch.tensor(numeric, dtype=ours.dtype, device=device)
    torch.testing.assert_close(ours, numeric, rtol=1e-6, atol=1e-8)
    # The penalty's contribution is far above the tolerance, so this is a real check.
    erm = torch.cat([g.reshape(-1) for g in idgm_gradient(per_domain_losses(net, batches), params, 0.0).grads])
    assert (ours - erm).abs().max() > 1e-3


def test_gamma_zero_is_erm_gradient_on_equal_batches():
    net, batches = tiny_net(), domain_minibatches(num_domains=3)
    params = list(net.parameters())
    result = idgm_gradient(per_domain_losses(net, batches), params, 0.0)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    erm = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), params)
    for a, b in zip(result.grads, erm):
        torch.testing.assert_close(a, b)
    assert result.gip.item() != 0.0  # the diagnostic is still measured


def test_penalty_annealing_and_optimizer_reset():
    net, batches = tiny_net(), domain_minibatches()
    updater = IDGMUpdater(net, idgm_config(idgm_gamma=0.3, idgm_penalty_anneal_iters=2, idgm_penalty_bound=INF))
    weights = [updater.step(batches)["penalty_weight"] for _ in range(4)]
    assert weights == [0.0, 0.0, 0.3, 0.3]
    # Adam's step count restarted at the switch (step index 2): steps 2 and 3 only.
    counts = {int(s["step"]) for s in updater.optimizer.state.values()}
    assert counts == {2}


def test_anneal_zero_starts_with_penalty_and_no_reset():
    net, batches = tiny_net(), domain_minibatches()
    updater = IDGMUpdater(net, idgm_config(idgm_gamma=0.3, idgm_penalty_anneal_iters=0, idgm_penalty_bound=INF))
    stats = [updater.step(batches) for _ in range(3)]
    assert [s["penalty_weight"] for s in stats] == [0.3] * 3
    assert {int(s["step"]) for s in updater.optimizer.state.values()} == {3}
    assert stats[0]["loss"] == pytest.approx(stats[0]["nll"] - 0.3 * stats[0]["gip"])


def test_step_is_the_optimizer_applied_to_the_exact_gradient():
    """SGD without momentum, with weight decay λ: θ ← θ − lr(∇L_idgm + λθ)."""
    net, batches = tiny_net(), domain_minibatches()
    before = [p.detach().clone() for p in net.parameters()]
    expected = idgm_gradient(per_domain_losses(net, batches), list(net.parameters()), GAMMA).grads
    updater = IDGMUpdater(net, idgm_config(idgm_gamma=GAMMA, idgm_penalty_anneal_iters=0, idgm_optimizer="sgd", lr=0.1,
                                       idgm_penalty_bound=INF, weight_decay=0.05))
    updater.optimizer.param_groups[0]["momentum"] = 0.0
    updater.step(batches)
    for p, b, g in zip(net.parameters(), before, expected):
        torch.testing.assert_close(p.detach(), b - 0.1 * (g + 0.05 * b))


@pytest.mark.parametrize("bound", [0.05, 0.5, 1e6])
def test_bound_lowers_gamma_to_keep_the_penalty_within_rho_of_the_erm_gradient(bound):
    net, batches = tiny_net(), domain_minibatches(num_domains=4)
    params = list(net.parameters())
    losses = per_domain_losses(net, batches)
    grads = per_domain_gradients(losses, params, create_graph=True)
    mean = [torch.stack(g).mean(0).detach() for g in zip(*grads)]
    gip_grad = torch.autograd.grad(brute_force_gip(grads), params)
    norm = lambda ts: torch.cat([t.flatten() for t in ts]).norm()  # noqa: E731
    expected_gamma = min(GAMMA, bound * norm(mean).item() / norm(gip_grad).item())

    result = idgm_gradient(per_domain_losses(net, batches), params, GAMMA, bound)
    assert result.gamma.item() == pytest.approx(expected_gamma, rel=1e-5)
    for got, m, g in zip(result.grads, mean, gip_grad):
        torch.testing.assert_close(got, m - expected_gamma * g, rtol=1e-4, atol=1e-6)
    penalty = norm([got - m for got, m in zip(result.grads, mean)]).item()
    assert penalty <= bound * norm(mean).item() * (1 + 1e-4)
    # with ρ < 1 the step still descends the ERM loss
    if bound < 1:
        assert sum((m * got).sum() for m, got in zip(mean, result.grads)).item() > 0
    if bound == 1e6:  # never active: the fixed-γ gradient
        assert result.gamma.item() == GAMMA


@pytest.mark.parametrize("amsgrad", [False, True])
def test_step_metric_is_the_scaling_of_adams_next_step(amsgrad):
    """With β₁ = 0 Adam's step is exactly −lr·W·g, W = step_metric(...), at every step."""
    net = tiny_net()
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.0, 0.999), amsgrad=amsgrad)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 10 ** torch.randn((), generator=gen) for p in params]
        weights = step_metric(opt, params, grads)
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, b, g, w in zip(params, before, grads, weights):
            torch.testing.assert_close(p.detach(), b - 0.01 * w * g, rtol=1e-9, atol=1e-12)


def test_step_metric_of_sgd_is_the_identity():
    net = tiny_net()
    params = list(net.parameters())
    assert step_metric(torch.optim.SGD(params, lr=0.1, momentum=0.9), params, [torch.ones_like(p) for p in params]) is None


def test_a_conversion_of_the_optimizer_state_leaves_step_counts_alone():
    """``apply_to_state_`` converts Adam's moments as a module conversion converts weights, but
    not its step counts: a float16 count would stop at 2048 and stall the bias correction."""
    params = list(tiny_net().parameters())
    opt = torch.optim.Adam(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    steps = [state["step"].clone() for state in opt.state.values()]
    apply_to_state_(opt, lambda t: t.half())
    for state, step in zip(opt.state.values(), steps, strict=True):
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float16
        assert state["step"].dtype == step.dtype and torch.equal(state["step"], step)


def test_bound_in_the_optimizer_metric_makes_adams_step_descend_the_erm_loss():
    """The Euclidean bound only guarantees Ḡ·(Ḡ − γ_t∇Ĝ) > 0; Adam then rescales each
    coordinate, and its step can climb L_erm.  Measured in Adam's metric W, the step W·g
    it takes keeps Ḡ·W(Ḡ − γ_t∇Ĝ) ≥ (1 − ρ)‖Ḡ‖²_W."""
    rho = 0.5
    worst = {"euclidean": INF, "optimizer": INF}
    for seed in range(6):
        torch.manual_seed(seed)
        net, batches = tiny_net(seed=seed), domain_minibatches(num_domains=3, seed=seed)
        params = list(net.parameters())
        opt = torch.optim.Adam(params, lr=0.01, betas=(0.0, 0.999))
        for _ in range(3):  # give Adam a second moment from other gradients
            for p in params:
                p.grad = torch.randn_like(p) * 10 ** (2 * torch.randn_like(p))
            opt.step()
        mean = idgm_gradient(per_domain_losses(net, batches), params, 0.0).grads
        weights = step_metric(opt, params, mean)
        w_norm2 = sum((w * m * m).sum() for w, m in zip(weights, mean)).item()
        for kind in worst:
            metric = functools.partial(step_metric, opt, params) if kind == "optimizer" else None
            result = idgm_gradient(per_domain_losses(net, batches), params, 1e6, rho, metric)
            descent = sum((m * w * g).sum() for m, w, g in zip(mean, weights, result.grads)).item()
            worst[kind] = min(worst[kind], descent / w_norm2)
    assert worst["optimizer"] >= 1 - rho - 1e-9
    assert worst["euclidean"] < 1 - rho  # the Euclidean bound does not give this guarantee


def brute_force_metric_gip(grads, weights):
    """mean_{i<j} Σ W·G_i·G_j with the pairs enumerated one by one."""
    pairs = [sum((w * a * b).sum() for w, a, b in zip(weights, grads[i], grads[j]))
             for i, j in itertools.combinations(range(len(grads)), 2)]
    return torch.stack(pairs).mean()


def _positive_weights(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 + 0.1).to(p.device) for p in params]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_domains", [2, 3, 5])
def test_metric_gip_gradient_matches_brute_force_pairs(num_domains, device):
    net, batches = tiny_net(device=device), domain_minibatches(num_domains=num_domains, device=device)
    params = list(net.parameters())
    weights = _positive_weights(params)
    losses = per_domain_losses(net, batches)
    grads = per_domain_gradients(losses, params, create_graph=True)
    brute_gip = brute_force_metric_gip(grads, weights)
    expected = torch.autograd.grad(torch.stack(losses).mean() - GAMMA * brute_gip, params)

    result = idgm_gradient(per_domain_losses(net, batches), params, GAMMA, gip_metric=lambda mean: weights)
    assert result.gip.item() == pytest.approx(brute_gip.item(), rel=1e-12)
    assert metric_gip(grads, weights).item() == pytest.approx(brute_gip.item(), rel=1e-12)
    for a, b in zip(result.grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a metric that is not the identity changes the gradient; the identity is the paper's Ĝ
    euclidean = idgm_gradient(per_domain_losses(net, batches), params, GAMMA).grads
    assert max((a - b).abs().max().item() for a, b in zip(result.grads, euclidean)) > 1e-4
    ones = idgm_gradient(per_domain_losses(net, batches), params, GAMMA,
                         gip_metric=lambda mean: [torch.ones_like(p) for p in params]).grads
    for a, b in zip(ones, euclidean):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _fish_expected_displacement(net, batches, alpha, weights):
    """E[θ̃ − θ] over every domain order, inner steps θ ← θ − α W g (a preconditioned
    inner optimizer with its scaling W held fixed, as Adam's over a few steps)."""
    params = list(net.parameters())
    start = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    orders = list(itertools.permutations(range(len(batches))))
    for order in orders:
        for d in order:
            (loss,) = per_domain_losses(net, [batches[d]])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, w, g in zip(params, weights, grads):
                    p -= alpha * w * g
        with torch.no_grad():
            for t, p, s0 in zip(total, params, start):
                t += (p - s0) / len(orders)
                p.copy_(s0)
    return total


def test_fish_with_a_preconditioned_inner_step_follows_the_metric_gip():
    """Theorem 3.1's expansion with the inner step −αWg: E[θ̃ − θ] = −αSW∇(L_erm − γĜ_W)
    + O(α³), γ = α(S − 1)/4.  The residual shrinks as α³ with Ĝ_W and only as α² with
    the Euclidean Ĝ, so the objective Fish follows with Adam is IDGM in Adam's metric."""
    net, batches = tiny_net(seed=2), domain_minibatches(num_domains=3, seed=4)
    params = list(net.parameters())
    weights = _positive_weights(params, seed=5)
    num_domains = len(batches)

    def residual(alpha, metric):
        gamma = alpha * (num_domains - 1) / 4
        gip_metric = (lambda mean: weights) if metric else None
        grad = idgm_gradient(per_domain_losses(net, batches), params, gamma, gip_metric=gip_metric).grads
        fish = _fish_expected_displacement(net, batches, alpha, weights)
        predicted = [-alpha * num_domains * w * g for w, g in zip(weights, grad)]
        return torch.cat([(f - p).flatten() for f, p in zip(fish, predicted)]).norm().item()

    alpha = 0.02
    metric_ratio = residual(alpha, True) / residual(alpha / 2, True)
    euclidean_ratio = residual(alpha, False) / residual(alpha / 2, False)
    assert 6.5 < metric_ratio < 9.5  # O(α³): halving α divides the residual by about 8
    assert 3.0 < euclidean_ratio < 4.8  # O(α²): the Euclidean Ĝ misses a second-order term


@pytest.mark.parametrize(("bound_metric", "gip_metric"), [("optimizer", "euclidean"), ("euclidean", "optimizer")])
def test_update_reports_and_applies_the_values_of_their_definitions(bound_metric, gip_metric):
    """One bounded update recomputed from the definitions, at Adam's second step (its W is then
    not a multiple of 1/|Ḡ|): ``nll`` = mean cross-entropy; ``gip`` = Ĝ (in W with
    ``idgm_gip_metric="optimizer"``); ``penalty_weight`` = min(γ, ρ‖Ḡ‖/‖∇Ĝ‖) (norms in W
    with ``idgm_bound_metric="optimizer"``); ``loss`` = nll − penalty_weight·gip; the gradient
    handed to the optimizer = Ḡ − penalty_weight·∇Ĝ."""
    rho = 0.05
    net, batches = tiny_net(), domain_minibatches(num_domains=3)
    params = list(net.parameters())
    updater = IDGMUpdater(net, idgm_config(idgm_gamma=GAMMA, idgm_penalty_anneal_iters=0, idgm_penalty_bound=rho,
                                           idgm_bound_metric=bound_metric, idgm_gip_metric=gip_metric))
    updater.step(batches)

    losses = per_domain_losses(net, batches)
    grads = per_domain_gradients(losses, params, create_graph=True)
    mean = [torch.stack(g).mean(0).detach() for g in zip(*grads)]
    adam_metric = step_metric(updater.optimizer, params, mean)
    gip = brute_force_metric_gip(grads, adam_metric) if gip_metric == "optimizer" else brute_force_gip(grads)
    gip_grad = torch.autograd.grad(gip, params)
    weights = adam_metric if bound_metric == "optimizer" else [torch.ones_like(p) for p in params]
    norm = lambda ts: sum((w * t * t).sum() for w, t in zip(weights, ts)).sqrt().item()  # noqa: E731
    gamma = min(GAMMA, rho * norm(mean) / norm(gip_grad))
    assert gamma < GAMMA / 2  # the bound is active
    nll = torch.stack(losses).mean().item()

    stats = updater.step(batches)
    assert stats["nll"] == pytest.approx(nll, rel=1e-12)
    assert stats["gip"] == pytest.approx(gip.item(), rel=1e-10)
    assert stats["penalty_weight"] == pytest.approx(gamma, rel=1e-9)
    assert stats["loss"] == pytest.approx(nll - gamma * gip.item(), rel=1e-10)
    for p, m, g in zip(params, mean, gip_grad):
        torch.testing.assert_close(p.grad, m - gamma * g, rtol=1e-9, atol=1e-12)


def test_runs_saved_before_the_bound_metric_existed_keep_the_euclidean_bound():
    """Checkpoints and ``results.jsonl`` written before ``idgm_bound_metric`` lack it; they
    load, and resume with the bound they were trained with."""
    added_later = ("idgm_bound_metric", "idgm_gip_metric", "idgm_momentum")
    hparams = {s.name: s.default for s in IDGM_HPARAMS if s.name not in added_later}
    hparams.update(lr=1e-3, weight_decay=0.0)
    assert IDGMConfig.from_hparams(hparams).bound_metric == "euclidean"
    assert IDGMConfig.from_hparams(hparams).gip_metric == "euclidean"
    assert IDGMConfig.from_hparams(hparams).momentum == 0.9  # the optimizers' fixed momentum then
    assert idgm_config().bound_metric == "optimizer"  # new runs get the metric bound
    with pytest.raises(ValueError, match="missing hyperparameters \\['idgm_gamma'\\]"):
        IDGMConfig.from_hparams({k: v for k, v in hparams.items() if k != "idgm_gamma"})


@pytest.mark.parametrize("spelling", ["inf", "Infinity", float("inf")])
def test_no_bound_can_be_spelled_in_json(spelling):
    assert idgm_config(idgm_penalty_bound=spelling).penalty_bound == float("inf")
    with pytest.raises(ValueError, match='or "inf" for no bound'):
        idgm_config(idgm_penalty_bound="infinite")


def test_numbers_may_be_numpy_scalars_and_booleans_are_not_numbers():
    config = idgm_config(idgm_gamma=np.float32(0.25), lr=np.float64(1e-3), idgm_penalty_bound=np.int64(1))
    assert (config.gamma, config.lr, config.penalty_bound) == (0.25, 1e-3, 1.0)
    assert all(type(v) is float for v in (config.gamma, config.lr, config.penalty_bound))
    for flag in (True, np.bool_(True)):
        with pytest.raises(ValueError, match="idgm_gamma"):
            idgm_config(idgm_gamma=flag)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_idgm_momentum_is_the_optimizers_momentum(optimizer):
    """``idgm_momentum`` is SGD's momentum or Adam's β₁: with 0, SGD's step is −lr·∇L exactly."""
    net, batches = tiny_net(), domain_minibatches()
    for momentum in (0.0, 0.5):
        updater = IDGMUpdater(net, idgm_config(idgm_optimizer=optimizer, idgm_momentum=momentum))
        group = updater.optimizer.param_groups[0]
        assert (group["momentum"] if optimizer == "sgd" else group["betas"][0]) == momentum
    # penalty annealed (γ = 0 for 500 steps): two SGD steps without momentum are plain gradient steps
    updater = IDGMUpdater(net, idgm_config(idgm_optimizer="sgd", idgm_momentum=0.0, lr=0.1))
    for _ in range(2):
        reference = copy.deepcopy(net)
        loss = sum(torch.nn.functional.cross_entropy(reference(x), y) for x, y in batches) / len(batches)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        updater.step(batches)
        for p, q, g in zip(net.parameters(), reference.parameters(), grads):
            torch.testing.assert_close(p, q - 0.1 * g)


def test_bound_keeps_adam_from_diverging_where_fixed_gamma_does():
    """With Adam, fixed γ runs away (Ĝ and the cross-entropy explode);
    the bounded penalty keeps training on the ERM loss."""
    def train(bound):
        net, batches = tiny_net(seed=1), domain_minibatches(num_domains=3, seed=2)
        updater = IDGMUpdater(net, idgm_config(idgm_gamma=1.0, idgm_penalty_anneal_iters=0, lr=0.05,
                                                idgm_penalty_bound=bound))
        return [updater.step(batches)["nll"] for _ in range(150)]

    fixed, bounded = train(INF), train(0.5)
    assert max(fixed) > 10 * fixed[0]
    assert bounded[-1] < 0.5 * bounded[0]


def test_non_finite_loss_names_step_and_domain_and_keeps_weights():
    net, batches = tiny_net(), domain_minibatches()
    updater = IDGMUpdater(net, idgm_config(idgm_penalty_anneal_iters=0))
    updater.step(batches)
    before = [p.detach().clone() for p in net.parameters()]
    bad = list(batches)
    bad[2] = (torch.full_like(bad[2][0], float("nan")), bad[2][1])
    with pytest.raises(NonFiniteLossError, match=r"step 1 on training domain 2") as info:
        updater.step(bad)
    assert (info.value.step, info.value.domain) == (1, 2)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b)


def test_checkpoint_resumes_identically():
    batches = domain_minibatches()
    config = idgm_config(idgm_penalty_anneal_iters=2)
    assert_resumes_identically(IDGMUpdater(tiny_net(), config), IDGMUpdater(tiny_net(seed=5), config), batches, 3, 2)


def test_single_training_domain_reduces_to_erm():
    """With one domain there is no pair: Ĝ = 0 and IDGM takes ERM's step."""
    net, batches = tiny_net(), domain_minibatches(num_domains=1)
    params = list(net.parameters())
    result = idgm_gradient(per_domain_losses(net, batches), params, GAMMA)
    erm = torch.autograd.grad(per_domain_losses(net, batches)[0], params)
    assert result.gip.item() == 0.0
    assert result.gamma.item() == 0.0  # reported as penalty_weight: no penalty was applied
    for a, b in zip(result.grads, erm):
        torch.testing.assert_close(a, b)
