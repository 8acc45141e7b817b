"""``python -m domainbed_fish.reproduction``: run a preset and write its report."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from domainbed_fish.errors import file_in_the_way, missing_plotting_library
from domainbed_fish.lockfile import TrainProcesses
from domainbed_fish.reproduction.jobs import (
    CONTROLS,
    JOB_RUNNERS,
    RUNS,
    JobOutcome,
    controls_in_runs,
    default_job_runner,
    job_state,
    move_controls_out_of_runs,
    run_jobs,
    stale_differences,
    steps_recorded,
)
from domainbed_fish.reproduction.presets import PRESETS, TrainJob, get_preset
from domainbed_fish.reproduction.report import REPORT_FILES, write_report

#: Seconds between two redraws of the progress bar while jobs run: a CdSprites-30 IDGM job
#: trains for a quarter of an hour, and a bar that moved only when a job ended would look hung.
PROGRESS_REFRESH_SECONDS = 10.0


def estimated_progress(output_dir: Path, jobs: list[TrainJob], finished: set[str]) -> float:
    """Estimated compute done, in the units of ``TrainJob.cost``: the whole cost of each job
    in ``finished``, and of each other job the share of its steps its checkpoints record."""
    return sum(job.cost if job.name in finished else job.cost * steps_recorded(output_dir, job) / job.steps
               for job in jobs)


def cpu_model() -> str:
    """The processor's name, for the report's header: a preset's time depends on it.

    Linux's ``/proc/cpuinfo`` names it ("Intel(R) Xeon(R) Processor"); elsewhere, or when it
    does not, what ``platform`` knows (often only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m domainbed_fish.reproduction",
        description="Reproduce the paper's linear toy and CdSprites-N through DomainBed's train script, "
                    "then write report.md, report.json and the Figures 4 and 5 as PNG.",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("reproduction"),
                        help="where runs and the report go; running again finishes what is missing")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items()))
    choice.add_argument("--quick", action="store_const", const="quick", dest="preset",
                        help="same as --preset quick")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="jobs run at once; the CPU cores are split between them (default: 2)")
    parser.add_argument("--job_runner", choices=JOB_RUNNERS, default=default_job_runner(),
                        help="how each job starts DomainBed's train script: 'forkserver' forks it from a "
                             "process that imported torch and DomainBed once (about 10 s saved per job); "
                             "'subprocess' starts a new Python per job (default: %(default)s)")
    parser.add_argument("--dry_run", action="store_true", help="list the jobs and exit")
    parser.add_argument("--report_only", action="store_true", help="write the report from the runs present")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    blocking_file = file_in_the_way(args.output_dir)
    if blocking_file is not None:
        parser.error(f"--output_dir {args.output_dir}: {blocking_file} is a file, not a directory; pass a "
                     "directory: a new one, or the one of an earlier run to finish it")
    return args


def main(argv: list[str] | None = None) -> int:
    """``python -m domainbed_fish.reproduction``; Ctrl-C ends it with a line, not a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: finished jobs are kept; run the same command again to finish the rest",
              file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = get_preset(args.preset)
    jobs = preset.jobs()
    output_dir: Path = args.output_dir

    import domainbed_fish
    from domainbed_fish.locate import DomainBedNotFoundError

    try:
        domainbed_fish.register()  # fails early, with the fix, when DomainBed is missing
    except DomainBedNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.dry_run:
        for moved in move_controls_out_of_runs(output_dir, jobs):
            print(f"moved the control run {moved.name} from runs/ to {moved.parent}: DomainBed's "
                  "collect_results would mix it into its algorithm's row")
    processes = TrainProcesses()
    states = {job.name: job_state(output_dir, job, processes) for job in jobs}
    done = sum(state == "done" for state in states.values())
    print(f"preset {preset.name}: {len(jobs)} jobs, {done} already done, output in {output_dir}")
    for job in jobs:
        if states[job.name] == "stale":
            changed = ", ".join(f"{name} {old!r} -> {new!r}"
                                for name, (old, new) in stale_differences(output_dir, job).items())
            later = args.dry_run or args.report_only
            print(f"stale: {job.name} was trained with other hyperparameters ({changed}); "
                  + (f"left out of the report; a run without --{'dry_run' if args.dry_run else 'report_only'} "
                     "moves it" if later else "moving it")
                  + f" to {output_dir / 'stale'} and " + ("runs the job again" if later else "running the job again"))
    if args.dry_run:
        in_runs = {job.name for job in controls_in_runs(output_dir, jobs)}
        for job in jobs:
            if job.name in in_runs:  # an earlier version's control, kept: where it is decides its state
                print(f"{job_state(output_dir, job, at=output_dir / RUNS / job.name):<8}{job.name} (in runs/; "
                      f"a run without --dry_run moves it to {output_dir / CONTROLS})")
            else:
                print(f"{states[job.name]:<8}{job.name}")
        return 0
    if missing_plotting_library():
        # Found now, not after an hour of training, when the report draws Figures 4 and 5.
        print("error: the report's figures need matplotlib, which is not installed: "
              "pip install 'domainbed-fish[domainbed]' (or pip install matplotlib)", file=sys.stderr)
        return 2
    if args.report_only and not done:
        # An empty report would look like a result; nothing here was trained by this preset.
        print(f"error: --report_only found no finished job of preset {preset.name} under {output_dir / 'runs'}; "
              "run the same command without --report_only to train them, or pass the --output_dir "
              "(and --preset) of an earlier run", file=sys.stderr)
        return 2
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: cannot create --output_dir {output_dir}: {error}; pass a directory you can write to",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    failures: list[JobOutcome] = []
    if not args.report_only:
        # The bar advances by each job's estimated compute, not by job count: the jobs differ
        # a hundredfold (the toy's first), so a count would make the remaining time meaningless.
        # Between two job ends it follows the running jobs' checkpoints.
        finished = {job.name for job in jobs if states[job.name] == "done"}

        def description() -> str:
            return f"reproduction ({preset.name}), {len(finished)}/{len(jobs)} jobs"

        with tqdm(total=sum(job.cost for job in jobs),
                  initial=sum(job.cost for job in jobs if job.name in finished), desc=description(),
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]") as bar:
            redraw_lock = threading.Lock()
            stop_redrawing = threading.Event()

            def redraw() -> None:
                with redraw_lock:
                    # never backwards: a job cleared to run again drops its old checkpoints
                    bar.n = max(bar.n, estimated_progress(output_dir, jobs, finished))
                    bar.set_description_str(description(), refresh=False)
                    bar.refresh()

            def redraw_periodically() -> None:
                while not stop_redrawing.wait(PROGRESS_REFRESH_SECONDS):
                    redraw()

            def progress(outcome: JobOutcome) -> None:
                with redraw_lock:
                    finished.add(outcome.job.name)
                    state = "failed" if outcome.error else "done"
                    bar.write(f"{state}: {outcome.job.name} ({outcome.seconds:.0f} s)")
                redraw()
                if outcome.error:
                    failures.append(outcome)

            redrawer = threading.Thread(target=redraw_periodically, name="progress-bar", daemon=True)
            redrawer.start()
            try:
                run_jobs(output_dir, jobs, args.workers, progress, args.job_runner)
            finally:
                stop_redrawing.set()
                redrawer.join()
    elapsed = time.perf_counter() - start

    header = [
        f"Made by `python -m domainbed_fish.reproduction --preset {preset.name} --workers {args.workers}` "
        f"on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()} ({platform.machine()}), "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}; "
        + ("written from the runs present (--report_only)." if args.report_only
           else f"this invocation ran {len(jobs) - done} of the {len(jobs)} jobs in {elapsed / 60:.1f} min"
                + (f", {len(failures)} of them failed (listed under Missing)" if failures else "")
                + (f" ({done} were already done, from an earlier invocation)." if done else ".")),
    ]
    print("writing the report (measuring Ĝ from checkpoints) …")
    write_report(output_dir, preset, header)
    print("report: " + ", ".join(str(output_dir / name) for name in REPORT_FILES))
    for outcome in failures:
        print(f"\njob {outcome.job.name} failed:\n{outcome.error}", file=sys.stderr)
    if failures:
        print(f"\n{len(failures)} job(s) failed; fix the cause and run the same command again: "
              "finished jobs are kept.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
