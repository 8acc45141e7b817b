"""CdSprites step and evaluation time in channels-last (the network's layout) against NCHW.

    DOMAINBED_DIR=/path/to/DomainBed python benchmarks/cdsprites_memory_format.py
    ... --domains 5 15 --batch 32 --repeats 7 --algorithms ERM Fish IDGM

``CdSpritesCNN`` keeps weights and activations channels-last.  For each S (number of
training domains) every algorithm is built twice on the same random weights, once
in each layout, and both get the same S minibatches; their ``update()`` calls are
timed in interleaved rounds (process CPU time, one thread), so a busy machine slows
both alike.  Evaluation is timed the same way on ``predict()`` of 64 images
(DomainBed's evaluation batch).  Each row prints the medians and the median of the
within-round ratio channels-last / NCHW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from domainbed_fish.locate import import_domainbed
from domainbed_fish.networks import CdSpritesCNN

LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
EVAL_BATCH = 64  # DomainBed's FastDataLoader batch in train.py's evaluation


def build(algorithm: str, domains: int, batch: int, layout: torch.memory_format) -> torch.nn.Module:
    """The DomainBed algorithm at CdSprites' default hyperparameters, seed 0, in ``layout``.

    Fish starts with its own step: with its default warm-up its first 50 updates are ERM's.
    """
    registry = import_domainbed("hparams_registry")
    algorithms = import_domainbed("algorithms")
    hparams = {**registry.default_hparams(algorithm, f"CdSprites{max(domains, 5)}"), "batch_size": batch}
    if algorithm == "Fish":
        hparams["fish_warmup_steps"] = 0  # time Fish's own step, not its 50 ERM warm-up steps
    torch.manual_seed(0)
    model = algorithms.get_algorithm_class(algorithm)((3, 64, 64), 2, domains, hparams)
    # Fish's inner copy, where its inner steps run, is not a submodule: convert it too.
    inner = getattr(getattr(model, "fish", None), "inner_network", None)
    for module in [*model.modules(), *(inner.modules() if inner is not None else ())]:
        if isinstance(module, CdSpritesCNN):
            module.MEMORY_FORMAT = layout  # read by forward()
            module.to(memory_format=layout)  # keeps the Parameter objects the optimizers hold
    return model


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def compare(label: str, calls: dict[str, object], repeats: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in calls}
    ratios = []
    for r in range(repeats):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in order:
            times[name].append(cpu_seconds(calls[name]))
        ratios.append(times["channels-last"][-1] / times["NCHW"][-1])
    nchw, last = (statistics.median(times[name]) * 1000 for name in ("NCHW", "channels-last"))
    print(f"| {label} | {nchw:.1f} | {last:.1f} | {statistics.median(ratios):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", type=int, default=[5, 15, 30], help="values of S")
    parser.add_argument("--batch", type=int, default=32, help="images per domain per step")
    parser.add_argument("--algorithms", nargs="+", default=["ERM", "CORAL", "Fish", "IDGM"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per model first")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, 1 thread, CPU time; median of {args.repeats} interleaved rounds\n")
    print("| case | NCHW ms | channels-last ms | channels-last / NCHW |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(EVAL_BATCH, 3, 64, 64, generator=g)
    for domains in args.domains:
        minibatches = [(torch.rand(args.batch, 3, 64, 64, generator=g), torch.randint(0, 2, (args.batch,), generator=g))
                       for _ in range(domains)]
        for algorithm in args.algorithms:
            models = {name: build(algorithm, domains, args.batch, layout) for name, layout in LAYOUTS.items()}
            for model in models.values():
                for _ in range(args.warmup):
                    model.update(minibatches)
            steps = {name: (lambda m=model, b=minibatches: m.update(b)) for name, model in models.items()}
            compare(f"{algorithm} update(), S = {domains}, {args.batch}/domain", steps, args.repeats)
    models = {name: build("ERM", 5, args.batch, layout) for name, layout in LAYOUTS.items()}
    with torch.no_grad():
        for model in models.values():
            model.predict(images)
        compare(f"predict(), {EVAL_BATCH} images",
                {name: (lambda m=model: m.predict(images)) for name, model in models.items()}, 4 * args.repeats)


if __name__ == "__main__":
    main()
