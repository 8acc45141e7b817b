"""Run one DomainBed training job under its job lock.

    python -m domainbed_fish.run_job <the arguments of domainbed.scripts.train>

This is what the plugin's sweep launches instead of ``python -m domainbed.scripts.train``
(same arguments, same output directory, same files).  Around DomainBed's unmodified
``train`` it adds:

- the job lock (:mod:`domainbed_fish.lockfile`): if another process is training the job,
  this one exits at once with status 0; so it does if DomainBed's own train script is
  training it on this machine without the lock (DomainBed's ``local`` launcher);
- a finished job (``done`` present) is not trained again;
- an interrupted job (directory without ``done``, nobody training it) is cleared
  and trained from the start, since DomainBed's ``train`` cannot resume;
- glibc's ``malloc`` keeps freed memory for the next step instead of returning it to the
  kernel (:mod:`domainbed_fish.allocator`: a third less time for a CdSprites-30 ERM job on
  a CPU, the same results).

``train`` runs in this process (``runpy``), so killing this process kills the training
and the kernel releases the lock.  Started by a launcher that sets
``DOMAINBED_FISH_LAUNCHER_PID`` (the reproduction command, ``local_parallel``), it also asks
to end when its parent ends (:mod:`domainbed_fish.lifetime`).
"""

from __future__ import annotations

import argparse
import runpy
import shutil
import sys
from pathlib import Path

from domainbed_fish.allocator import reuse_freed_memory
from domainbed_fish.lifetime import end_with_launcher
from domainbed_fish.locate import DomainBedNotFoundError, import_domainbed
from domainbed_fish.lockfile import LOCK_NAME, JobLock, LockFileError, holder_pid, unlocked_trainer_pid

#: Printed (with the job directory) when a job is skipped because another process runs it.
SKIPPED_RUNNING = "domainbed-fish: skipped, another process is training"
#: Printed when a job is skipped because it has finished.
SKIPPED_DONE = "domainbed-fish: skipped, already done"
#: Printed when this process starts training a job.
TRAINING = "domainbed-fish: training"


def clear_job_dir(job_dir: Path) -> None:
    """Delete everything in ``job_dir`` except the lock file (which we hold)."""
    for entry in job_dir.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def main(argv: list[str] | None = None) -> int:
    """Train the job described by ``argv`` (DomainBed ``train`` arguments) unless it is
    done or running elsewhere; return the exit status.  Without DomainBed (or without one of
    its dependencies), or with a damaged lock file, it says so and how to fix it, and exits
    with status 2."""
    try:
        return _main(argv)
    except (DomainBedNotFoundError, LockFileError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


def _main(argv: list[str] | None) -> int:
    end_with_launcher()
    reuse_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        # Not DomainBed's own --help: at the targeted commit it fails on the "%" in the
        # help text of --uda_holdout_fraction.
        print(__doc__ + "\nThe arguments are those of domainbed/scripts/train.py; --output_dir is required.")
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m domainbed_fish.run_job", add_help=False,
        usage="%(prog)s --output_dir JOB_DIR <the other arguments of domainbed.scripts.train>")
    parser.add_argument("--output_dir", required=True)
    known, _ = parser.parse_known_args(argv)
    job_dir = Path(known.output_dir)
    import_domainbed()  # DomainBed's (empty) package: no job directory is made for a job that cannot run

    lock = JobLock(job_dir)
    if not lock.acquire():
        print(f"{SKIPPED_RUNNING} (pid {holder_pid(job_dir)}): {job_dir}", flush=True)
        return 0
    try:
        if (job_dir / "done").exists():
            print(f"{SKIPPED_DONE}: {job_dir}", flush=True)
            return 0
        pid = unlocked_trainer_pid(job_dir)
        if pid is not None:  # DomainBed's own launcher is training it, without the lock
            print(f"{SKIPPED_RUNNING} (pid {pid}, DomainBed's train script): {job_dir}", flush=True)
            return 0
        clear_job_dir(job_dir)
        print(f"{TRAINING}: {job_dir}", flush=True)

        import domainbed_fish

        domainbed_fish.register()  # also when the start-up hook is switched off
        saved_argv = sys.argv
        sys.argv = ["domainbed.scripts.train", *argv]
        try:
            runpy.run_module("domainbed.scripts.train", run_name="__main__", alter_sys=True)
        finally:
            sys.argv = saved_argv
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
