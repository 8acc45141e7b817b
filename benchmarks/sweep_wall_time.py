"""Wall time of the ``cpu_quick`` preset, serially and with ``local_parallel``.

    DOMAINBED_DIR=~/DomainBed python benchmarks/sweep_wall_time.py [--workers 2] [--out DIR]

Runs ``python -m domainbed_fish.sweep launch --preset cpu_quick`` twice into fresh
directories: with DomainBed's serial ``local`` launcher, then with ``local_parallel``
and ``--workers`` CPU workers; prints both wall times, the speed-up and the machine load
(the figures depend on everything else running on the machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, launcher: list[str]) -> float:
    """Launch the preset into ``out``; return the wall time in seconds."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "domainbed_fish.sweep", "launch", "--preset", "cpu_quick", "--output_dir", str(out),
         "--skip_confirmation", *launcher],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    """Time both launchers and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cpu_quick_timing")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    serial = run(args.out / "serial", ["--command_launcher", "local"])
    parallel = run(args.out / "parallel", ["--command_launcher", "local_parallel", "--workers", str(args.workers)])
    print(f"cpu_quick (48 jobs) on {os.cpu_count()} cores, load average before {load_before:.1f}, "
          f"after {os.getloadavg()[0]:.1f}")
    print(f"  serial (DomainBed's local launcher): {serial:7.1f} s")
    print(f"  local_parallel, {args.workers} workers:        {parallel:7.1f} s  (speed-up {serial / parallel:.2f}x)")
    print(f"  report: python -m sweeps report --input_dir {args.out / 'parallel'}")


if __name__ == "__main__":
    main()
