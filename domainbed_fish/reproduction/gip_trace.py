"""The gradient inner product over training (the paper's Figure 5), from checkpoints.

Fish and IDGM log Ĝ while they train, ERM does not; to compare the three on equal
terms, Ĝ is measured afterwards, the same way for every algorithm, on each
checkpoint that DomainBed saved (``--save_model_every_checkpoint``): the
per-domain gradients of the cross-entropy on fixed probe minibatches, one per
training domain, and Ĝ = 2/(S(S−1)) Σ_{i<j} G_i·G_j (Shi et al., ICLR 2022, §3.1).
Beside Ĝ, which also grows and shrinks with the size of the gradients, the trace holds
the mean pairwise cosine of the G_i: the alignment alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from domainbed_fish.files import write_text_atomic
from domainbed_fish.gradients import mean_pairwise_inner_product, per_domain_gradients, per_domain_losses
from domainbed_fish.locate import import_domainbed

TRACE_FILE = "gip_trace.json"
_STEP = re.compile(r"model_step(\d+)\.pkl$")


def probe_minibatches(
    dataset: str, hparams: dict, test_env: int, per_domain: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed minibatches, ``per_domain`` images from each training environment."""
    datasets = import_domainbed("datasets")
    environments = datasets.get_dataset_class(dataset)(None, [test_env], hparams)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index, env in enumerate(environments):
        if index == test_env:
            continue
        picks = torch.randperm(len(env), generator=generator)[:per_domain].tolist()
        xs, ys = zip(*(env[i] for i in picks), strict=True)
        batches.append((torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])))
    return batches


def network_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    """The trained network of a DomainBed checkpoint (``model.pkl`` or ``model_step*.pkl``)."""
    algorithms = import_domainbed("algorithms")
    args = checkpoint["args"]
    algorithm = algorithms.get_algorithm_class(args["algorithm"])(
        checkpoint["model_input_shape"], checkpoint["model_num_classes"],
        checkpoint["model_num_domains"], checkpoint["model_hparams"],
    )
    algorithm.load_state_dict(checkpoint["model_dict"])
    return algorithm.network


def alignment(network: torch.nn.Module, minibatches) -> tuple[float, float]:
    """(Ĝ, mean pairwise cosine of the per-domain gradients) at the network's weights."""
    params = [p for p in network.parameters() if p.requires_grad]
    grads = per_domain_gradients(per_domain_losses(network, minibatches), params)
    with torch.no_grad():
        gip = mean_pairwise_inner_product(grads)
        norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g))) for g in grads]
        unit = [[t / n.clamp_min(1e-30) for t in g] for g, n in zip(grads, norms, strict=True)]
        cosine = mean_pairwise_inner_product(unit)
    return float(gip), float(cosine)


def measure_trace(run: Path, probe_per_domain: int = 64) -> list[tuple[int, float, float]]:
    """``[(step, Ĝ, cosine), …]`` of every ``model_step*.pkl`` in ``run``, cached in ``gip_trace.json``."""
    cache = run / TRACE_FILE
    try:
        return [tuple(pair) for pair in json.loads(cache.read_text())]
    except (FileNotFoundError, json.JSONDecodeError):  # not measured yet, or cut short by a kill
        pass
    checkpoints = sorted((int(m.group(1)), path) for path in run.glob("model_step*.pkl")
                         if (m := _STEP.search(path.name)))
    trace = []
    batches = None
    for step, path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if batches is None:
            args = checkpoint["args"]
            batches = probe_minibatches(args["dataset"], checkpoint["model_hparams"], args["test_envs"][0],
                                        probe_per_domain)
        network = network_from_checkpoint(checkpoint)
        trace.append((step, *alignment(network, batches)))
    write_text_atomic(cache, json.dumps(trace))
    return trace
