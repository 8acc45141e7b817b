"""A training job with glibc's default allocator policy and with the plugin's (reuse freed memory).

    DOMAINBED_DIR=/path/to/DomainBed python benchmarks/allocator_policy.py \
        [--dataset CdSprites30] [--algorithm ERM] [--steps 101] [--copies 2]

Runs the same DomainBed train job (``python -m domainbed_fish.run_job``, one thread,
the reproduction preset's 1,000 sprites per domain and 32 per domain per step) with
``DOMAINBED_FISH_MALLOC=system`` and with ``reuse`` (see ``domainbed_fish/allocator.py``),
one policy after the other; ``--copies 2`` runs two copies of the job side by side under
each policy, as the reproduction's two workers run on a 2-core machine (jobs that fault
pages slow their neighbour too, so a job beside one of the other policy would mislead).
Prints, per policy, the wall time, the median DomainBed ``step_time`` after step 0, the
minor page faults and the peak resident memory of a job (from ``wait4``; means over the
copies), and checks that every run wrote the same ``results.jsonl`` apart from timings:
the policy changes where tensors live, not what is computed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from domainbed_fish.allocator import POLICY_VARIABLE

TIMING_KEYS = ("step_time", "mem_gb")


def _start(policy: str, args: argparse.Namespace, out: Path) -> subprocess.Popen:
    n = args.dataset.removeprefix("CdSprites")
    command = [
        sys.executable, "-m", "domainbed_fish.run_job", "--dataset", args.dataset, "--algorithm", args.algorithm,
        "--test_envs", n, "--hparams_seed", "0", "--trial_seed", "0", "--seed", "0", "--steps", str(args.steps),
        "--checkpoint_freq", str(args.checkpoint_freq),
        "--hparams", json.dumps({"batch_size": 32, "cdsprites_per_domain": 1000}), "--output_dir", str(out),
    ]
    env = {**os.environ, POLICY_VARIABLE: policy, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen, started: float) -> dict:
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"the job failed:\n{process.stderr.read().decode()[-3000:]}")
    return {"wall_s": seconds, "minor_faults": usage.ru_minflt, "peak_rss_mib": usage.ru_maxrss / 1024}


def _run_copies(policy: str, args: argparse.Namespace, scratch: Path) -> tuple[dict, list[list[dict]]]:
    """``args.copies`` copies of the job at once: mean figures, and every copy's records."""
    outs = [scratch / f"{policy}-{copy}" for copy in range(args.copies)]
    started = time.perf_counter()
    processes = [_start(policy, args, out) for out in outs]
    figures = [_finish(process, started) for process in processes]
    mean = {key: statistics.mean(f[key] for f in figures) for key in figures[0]}
    return mean, [_records(out) for out in outs]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="CdSprites30")
    parser.add_argument("--algorithm", default="ERM")
    parser.add_argument("--steps", type=int, default=101)
    parser.add_argument("--checkpoint_freq", type=int, default=50)
    parser.add_argument("--copies", type=int, default=1, help="copies of the job run side by side per policy")
    args = parser.parse_args()
    if not args.dataset.startswith("CdSprites"):
        parser.error(f"--dataset must be a CdSprites-N dataset (e.g. CdSprites30), got {args.dataset!r}")
    if args.copies < 1:
        parser.error(f"--copies must be at least 1, got {args.copies}")

    policies = ("system", "reuse")
    figures, records = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for policy in policies:
            figures[policy], records[policy] = _run_copies(policy, args, Path(scratch))

    print(f"{args.algorithm} on {args.dataset}, {args.steps} steps, one thread per job, "
          f"{args.copies} cop{'y' if args.copies == 1 else 'ies'} of the job at once per policy")
    print("| policy | wall s | median step_time s | minor page faults | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for policy in policies:
        f = figures[policy]
        step = statistics.median(r["step_time"] for rows in records[policy] for r in rows[1:])
        print(f"| {policy} | {f['wall_s']:.1f} | {step:.3f} | {f['minor_faults']:,.0f} | {f['peak_rss_mib']:.0f} |")
    speedup = figures["system"]["wall_s"] / figures["reuse"]["wall_s"]
    print(f"reuse / system wall time: {1 / speedup:.2f} ({speedup:.2f}× faster)")

    def strip(rows: list[dict]) -> list[dict]:
        # Everything but the timings and the output directory each run was given.
        return [{k: ({**v, "output_dir": None} if k == "args" else v) for k, v in r.items()
                 if k not in TIMING_KEYS} for r in rows]

    runs = [strip(rows) for policy in policies for rows in records[policy]]
    same = all(run == runs[0] for run in runs)
    print("results.jsonl identical apart from timings:", "yes" if same else "NO")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
