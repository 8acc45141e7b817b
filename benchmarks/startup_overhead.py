"""What the start-up hook adds to every Python process: ``python -c pass`` with the
hook on and off (DOMAINBED_FISH_AUTOLOAD=0), interleaved, plus ``-X importtime``.

    python benchmarks/startup_overhead.py [--runs 60]

Budget (issue 2): under 5 ms added to ``python -c pass``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time


def time_once(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def hook_import_time_us(env: dict[str, str]) -> int:
    """Cumulative import time of the plugin's modules at start-up, as Python reports it."""
    return startup_import_times_us(env)["hook"]


def startup_import_times_us(env: dict[str, str]) -> dict[str, int]:
    """What the package's ``.pth`` lines import at start-up (``-X importtime``, µs).

    ``hook``: ``domainbed_fish._autoload`` with its package; ``editable_finder``:
    setuptools' finder module, present only for ``pip install -e`` installs.
    """
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env,
                         capture_output=True, text=True, check=True).stderr
    times = {"hook": 0, "editable_finder": 0}
    for line in out.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line.rstrip())
        if not match:
            continue
        cumulative, module = int(match.group(1)), match.group(2)
        if module == "domainbed_fish._autoload":
            times["hook"] = cumulative
        elif module == "domainbed_fish" and not times["hook"]:
            times["hook"] = cumulative
        elif module.startswith("__editable___domainbed_fish"):
            times["editable_finder"] += cumulative
    return times


def environments() -> tuple[dict[str, str], dict[str, str]]:
    """This environment with the hook on, and the same with it off."""
    on = dict(os.environ)
    on.pop("DOMAINBED_FISH_AUTOLOAD", None)
    return on, {**on, "DOMAINBED_FISH_AUTOLOAD": "0"}


def interleaved(on: dict[str, str], off: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """``python -c pass`` times with and without the hook, alternating, after one warm run each."""
    for env in (on, off):  # warm the file cache
        time_once(env)
    with_hook, without_hook = [], []
    for _ in range(runs):
        with_hook.append(time_once(on))
        without_hook.append(time_once(off))
    return with_hook, without_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()

    on, off = environments()
    with_hook, without_hook = interleaved(on, off, args.runs)

    import_us = hook_import_time_us(on)
    if import_us == 0:
        print("The start-up hook is not active: install the package first (pip install -e .).")
    med_on, med_off = statistics.median(with_hook) * 1e3, statistics.median(without_hook) * 1e3
    print(f"python -c pass, {args.runs} interleaved runs each")
    print("| hook | median ms | mean ms |")
    print("|---|---|---|")
    print(f"| on  | {med_on:.2f} | {statistics.mean(with_hook) * 1e3:.2f} |")
    print(f"| off | {med_off:.2f} | {statistics.mean(without_hook) * 1e3:.2f} |")
    print(f"added by the hook (median difference): {med_on - med_off:+.2f} ms (budget 5 ms)")
    print(f"import time of domainbed_fish + _autoload (-X importtime): {import_us / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
