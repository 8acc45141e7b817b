"""A training job with glibc's default allocator policy and with the plugin's (reuse freed memory).

    DOMAINBED_DIR=/path/to/DomainBed python benchmarks/allocator_policy.py \
        [--dataset CdSprites30] [--algorithm ERM] [--steps 101] [--together]

Runs the same DomainBed train job (``python -m domainbed_fish.run_job``, one thread,
the reproduction preset's 1,000 sprites per domain and 32 per domain per step) with
``DOMAINBED_FISH_MALLOC=system`` and with ``reuse`` (see ``domainbed_fish/allocator.py``),
one after the other, or both at once with ``--together`` (as the reproduction's two
workers run on a 2-core machine).  Prints each run's wall time, the median DomainBed
``step_time`` after step 0, the process's minor page faults and peak resident memory
(from ``wait4``), and checks that both runs wrote the same ``results.jsonl`` apart from
their timings: the policy changes where tensors live, not what is computed.
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


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="CdSprites30")
    parser.add_argument("--algorithm", default="ERM")
    parser.add_argument("--steps", type=int, default=101)
    parser.add_argument("--checkpoint_freq", type=int, default=50)
    parser.add_argument("--together", action="store_true", help="run both jobs at once (one core each)")
    args = parser.parse_args()
    if not args.dataset.startswith("CdSprites"):
        parser.error(f"--dataset must be a CdSprites-N dataset (e.g. CdSprites30), got {args.dataset!r}")

    policies = ("system", "reuse")
    with tempfile.TemporaryDirectory() as scratch:
        outs = {policy: Path(scratch) / policy for policy in policies}
        figures = {}
        if args.together:
            started = time.perf_counter()
            processes = {policy: _start(policy, args, outs[policy]) for policy in policies}
            figures = {policy: _finish(processes[policy], started) for policy in policies}
        else:
            for policy in policies:
                started = time.perf_counter()
                figures[policy] = _finish(_start(policy, args, outs[policy]), started)
        records = {policy: _records(outs[policy]) for policy in policies}

    print(f"{args.algorithm} on {args.dataset}, {args.steps} steps, one thread per job, "
          f"{'both jobs at once' if args.together else 'one job at a time'}")
    print("| policy | wall s | median step_time s | minor page faults | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for policy in policies:
        f = figures[policy]
        step = statistics.median(r["step_time"] for r in records[policy][1:])
        print(f"| {policy} | {f['wall_s']:.1f} | {step:.3f} | {f['minor_faults']:,} | {f['peak_rss_mib']:.0f} |")
    speedup = figures["system"]["wall_s"] / figures["reuse"]["wall_s"]
    print(f"reuse / system wall time: {1 / speedup:.2f} ({speedup:.2f}× faster)")

    def strip(rows: list[dict]) -> list[dict]:
        # Everything but the timings and the output directory each run was given.
        return [{k: ({**v, "output_dir": None} if k == "args" else v) for k, v in r.items()
                 if k not in TIMING_KEYS} for r in rows]

    same = strip(records["system"]) == strip(records["reuse"])
    print("results.jsonl identical apart from timings:", "yes" if same else "NO")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
