"""Median ``update()`` time of DomainBed algorithms, side by side in one process.

    DOMAINBED_DIR=/path/to/DomainBed python benchmarks/step_time.py \
        [--dataset Debug28] [--domains 3] [--batch 32] [--repeats 20] \
        [--algorithms ERM CORAL FishDomainBed Fish IDGM]

Every algorithm gets the same minibatches, timed in interleaved rounds, and DomainBed's default hyperparameters
for the dataset (IDGM with its penalty on from the first step, the expensive
case).  ``fish floor`` is S plain optimizer steps of the same network on the same
S minibatches: the least any Fish step can cost.  Prints a Markdown table and
writes it with a JSON copy to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import domainbed_fish

INPUT_SHAPES = {"Debug28": (3, 28, 28), "RotatedMNIST": (1, 28, 28), "ColoredMNIST": (2, 28, 28)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="Debug28", choices=sorted(INPUT_SHAPES))
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="examples per domain per step")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--algorithms", nargs="+", default=["ERM", "CORAL", "FishDomainBed", "Fish", "IDGM"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    domainbed_fish.register()
    from domainbed import algorithms, hparams_registry

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = INPUT_SHAPES[args.dataset]
    g = torch.Generator().manual_seed(0)
    minibatches = [
        (torch.randn(args.batch, *shape, generator=g).to(device),
         torch.randint(0, 2, (args.batch,), generator=g).to(device))
        for _ in range(args.domains)
    ]

    # Build everything first, then time in interleaved rounds (one call of each per
    # round) so that drift of a noisy machine hits every algorithm alike.
    calls: dict[str, object] = {}
    for name in args.algorithms:
        hparams = hparams_registry.default_hparams(name, args.dataset)
        hparams.update(idgm_penalty_anneal_iters=0)
        torch.manual_seed(0)
        algorithm = algorithms.get_algorithm_class(name)(shape, 2, args.domains, hparams).to(device)
        calls[name] = lambda a=algorithm: a.update(minibatches)
        if name == "Fish":
            network, optimizer = algorithm.network, torch.optim.Adam(algorithm.network.parameters(), lr=hparams["lr"])

            def plain_steps(network=network, optimizer=optimizer):
                for x, y in minibatches:
                    optimizer.zero_grad()
                    F.cross_entropy(network(x), y).backward()
                    optimizer.step()

            calls["fish floor (S plain steps)"] = plain_steps
    for fn in calls.values():
        time_calls(fn, args.warmup, 0, device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            times[name] += time_calls(fn, 0, 1, device)
    rows = [{"algorithm": name, "median_s": statistics.median(t)} for name, t in times.items()]
    floor = statistics.median(times["fish floor (S plain steps)"]) if "Fish" in calls else None

    erm = next((r["median_s"] for r in rows if r["algorithm"] == "ERM"), None)
    for r in rows:
        r["vs_erm"] = r["median_s"] / erm if erm else None
        r["vs_fish_floor"] = r["median_s"] / floor if floor and "Fish" in r["algorithm"] else None

    title = (f"{args.dataset} {shape}, S={args.domains} domains x {args.batch} examples, {device.type}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    lines = [title, "", "| algorithm | step (ms) | / ERM | / Fish floor |", "|---|---|---|---|"]
    for r in rows:
        vs_erm = f"{r['vs_erm']:.2f}" if r["vs_erm"] else ""
        vs_floor = f"{r['vs_fish_floor']:.3f}" if r["vs_fish_floor"] else ""
        lines.append(f"| {r['algorithm']} | {r['median_s'] * 1e3:.1f} | {vs_erm} | {vs_floor} |")
    table = "\n".join(lines)
    print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step_time_{args.dataset}_S{args.domains}_b{args.batch}_{device.type}"
    (out / f"{stem}.md").write_text(table + "\n")
    meta = {"title": title, "platform": platform.platform(), "plugin": domainbed_fish.__version__, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
