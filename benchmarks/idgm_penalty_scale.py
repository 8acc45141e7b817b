"""How large IDGM's penalty gradient is against ERM's, along an IDGM run on CdSprites-N.

    python benchmarks/idgm_penalty_scale.py [--domains 15] [--seed 0] [--steps 251] [--every 25] \
        [--hparams '{"idgm_penalty_bound": 0.5}'] [--layers]

IDGM steps along Ḡ − γ_t∇Ĝ with γ_t = min(γ, ρ‖Ḡ‖_W/‖∇Ĝ‖_W) (``idgm.bounded_gamma``; W is
Adam's per-coordinate scaling under the default ``idgm_bound_metric = optimizer``).  Fish
with an inner step α follows the same objective with γ_Fish = α(S − 1)/4 (the paper's
Theorem 3.1).  Every ``--every`` steps this prints, at the weights before the step and on
the step's own minibatches:

- r = ‖∇Ĝ‖_W / ‖Ḡ‖_W, how much steeper the gradient inner product is than the loss;
- the γ_t the bound allows (ρ / r, capped at γ);
- ρ_Fish = γ_Fish · r, the bound IDGM would need to weigh Ĝ as Fish does: above 1 the
  step is no longer guaranteed to descend L_erm, which is where a fixed γ runs away;
- with ``--layers``, r per parameter tensor: whether one layer sets the global bound
  (then a per-layer bound would let the penalty act elsewhere) or all are alike.

The algorithm, data and hyperparameters are those of ``cdsprites_learning_curve.py`` (the
preset's 1,000 sprites and 32 per domain per step; minibatches drawn from the tensors, so
seed k is not the reproduction's seed k).  Ĝ's gradient is computed again by plain
double backward for the measurement, outside the algorithm; training is unchanged.
"""

from __future__ import annotations

import argparse

import torch
from cdsprites_learning_curve import setup  # a sibling script: the same data and hyperparameters
from torch import Tensor

import domainbed_fish  # noqa: F401  (registers the datasets and algorithms)
from domainbed_fish.gradients import mean_pairwise_inner_product, per_domain_gradients, per_domain_losses
from domainbed_fish.optim import step_metric


def weighted_norm(tensor: Tensor, weight: Tensor | None) -> float:
    """‖x‖_W = (Σ W x²)^½, or the Euclidean norm without a metric."""
    squared = tensor.square() if weight is None else weight * tensor.square()
    return float(squared.sum().sqrt())


def penalty_scale(network: torch.nn.Module, optimizer: torch.optim.Optimizer, minibatches: list) -> dict:
    """Ĝ, L_erm, ‖Ḡ‖_W and ‖∇Ĝ‖_W, in total and per parameter tensor, at the current weights."""
    names, params = zip(*[(n, p) for n, p in network.named_parameters() if p.requires_grad], strict=True)
    losses = per_domain_losses(network, minibatches)
    grads = per_domain_gradients(losses, list(params), create_graph=True)
    gip = mean_pairwise_inner_product(grads)
    gip_grad = torch.autograd.grad(gip, params, materialize_grads=True)
    mean_grad = [torch.stack([g[k].detach() for g in grads]).mean(0) for k in range(len(params))]
    metric = step_metric(optimizer, list(params), mean_grad) or [None] * len(params)
    layers = {
        name: (weighted_norm(g, w), weighted_norm(h, w))
        for name, g, h, w in zip(names, mean_grad, gip_grad, metric, strict=True)
    }
    return {
        "nll": float(torch.stack(losses).detach().mean()),
        "gip": float(gip.detach()),
        "grad": sum(g**2 for g, _ in layers.values()) ** 0.5,
        "gip_grad": sum(h**2 for _, h in layers.values()) ** 0.5,
        "layers": layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=251)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--hparams", default="{}", help="JSON, over the defaults and the preset's sizes")
    parser.add_argument("--layers", action="store_true", help="print the ratio per parameter tensor")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset, algorithm_class, hparams, generator = setup("IDGM", args.domains, args.seed, args.hparams)
    name = f"CdSprites{args.domains}"
    *training, decorrelated = list(dataset)
    train_parts = [(env.images(), env.labels) for env in training]
    algorithm = algorithm_class(dataset.input_shape, dataset.num_classes, args.domains, hparams)
    gamma, bound = float(hparams["idgm_gamma"]), float(hparams["idgm_penalty_bound"])
    gamma_fish = hparams["lr"] * (args.domains - 1) / 4
    print(f"{name}, seed {args.seed}: γ = {gamma:g}, ρ = {bound:g}, metric {hparams['idgm_bound_metric']}; "
          f"Fish's γ = lr(S − 1)/4 = {gamma_fish:.4g}")
    print(" step  L_erm       Ĝ  decorr.        r  γ_t(bound)   ρ_Fish   r per tensor (min–max)")
    batch = hparams["batch_size"]
    for step in range(args.steps):
        minibatches = []
        for x, y in train_parts:
            index = torch.randint(len(y), (batch,), generator=generator)
            minibatches.append((x[index], y[index]))
        if step % args.every == 0 or step == args.steps - 1:
            scale = penalty_scale(algorithm.network, algorithm.idgm.optimizer, minibatches)
            ratio = scale["gip_grad"] / scale["grad"]
            per_tensor = [h / g for g, h in scale["layers"].values() if g > 0]
            with torch.no_grad():
                algorithm.eval()
                accuracy = (algorithm.predict(decorrelated.images()).argmax(1) == decorrelated.labels).float().mean()
                algorithm.train()
            print(f"{step:5d}  {scale['nll']:.3f}  {scale['gip']:8.3g}  {100 * float(accuracy):6.1f}  "
                  f"{ratio:8.3g}  {min(gamma, bound / ratio):10.3g}  {gamma_fish * ratio:7.3g}   "
                  f"{min(per_tensor):.3g}–{max(per_tensor):.3g}", flush=True)
            if args.layers:
                for layer, (g, h) in scale["layers"].items():
                    layer_ratio = h / g if g > 0 else float("inf")
                    print(f"       {layer:24s} ‖Ḡ‖_W {g:9.3g}  ‖∇Ĝ‖_W {h:9.3g}  r {layer_ratio:9.3g}")
        algorithm.update(minibatches)


if __name__ == "__main__":
    main()
