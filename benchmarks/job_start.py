"""What starting one reproduction job costs, with each job runner.

    python benchmarks/job_start.py [--repeats 5]

Runs a one-step LinearToy ERM job through DomainBed's train script ``--repeats`` times
with each runner of ``domainbed_fish.reproduction.jobs`` (``subprocess``: a new Python
per job; ``forkserver``: forked from a server that imported torch and DomainBed once) and
prints each runner's median time per job, plus the fork server's own start-up (its first
job).  A one-step toy job trains for milliseconds, so these are start-up costs: what the
default preset pays 54 times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from domainbed_fish.reproduction.jobs import JOB_RUNNERS, run_job
from domainbed_fish.reproduction.presets import TrainJob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for runner in JOB_RUNNERS:
            times = []
            for repeat in range(args.repeats + (runner == "forkserver")):
                job = TrainJob("LinearToy", "ERM", repeat, 2, 1, 1)
                outcome = run_job(Path(scratch) / runner, job, threads=1, runner=runner)
                if outcome.error:
                    raise SystemExit(f"{runner}: the job failed:\n{outcome.error}")
                times.append(outcome.seconds)
            if runner == "forkserver":
                print(f"forkserver: first job (starts the server, imports once) {times.pop(0):.2f} s")
            print(f"{runner}: median {statistics.median(times):.2f} s per job over {len(times)} jobs "
                  f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
