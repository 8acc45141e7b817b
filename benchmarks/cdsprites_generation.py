"""Time and memory of generating CdSprites-N (default: CdSprites-15 at 2,000 images per domain).

    python benchmarks/cdsprites_generation.py [--domains 15] [--per_domain 2000] [--repeats 3]

Prints the generation time (median over fresh generations, the cache bypassed), the
bytes held by the dataset's tensors, and the process's peak resident memory.
Targets: under 10 s and under 1 GB for CdSprites-15 at its default size.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from domainbed_fish.datasets.cdsprites import build_cdsprites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=15)
    parser.add_argument("--per_domain", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    times, environments = [], None
    for _ in range(args.repeats):
        environments = None
        start = time.perf_counter()
        environments = build_cdsprites.__wrapped__(args.domains, args.per_domain, 0)
        times.append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = sum(t.nbytes for env in environments for t in (env.masks, env.colours, env.labels))
    images = sum(len(env) for env in environments)
    as_float = images * 3 * 64 * 64 * 4

    print(f"CdSprites{args.domains}: {args.domains} + 1 environments × {args.per_domain} images, "
          f"{args.threads} thread(s)")
    print("| figure | value | target |")
    print("|---|---|---|")
    print(f"| generation time (median of {args.repeats}) | {statistics.median(times):.2f} s | < 10 s |")
    print(f"| tensors held | {held / 2**20:.0f} MiB | < 1 GB |")
    print(f"| the same images as float32 (not stored) | {as_float / 2**20:.0f} MiB | |")
    print(f"| process peak RSS (torch included) | {rss_after:.0f} MiB (before: {rss_before:.0f} MiB) | |")


if __name__ == "__main__":
    main()
