"""Run reproduction jobs through DomainBed's unmodified train script.

Each job writes to ``<output_dir>/runs/<name>/`` (DomainBed's ``results.jsonl``,
``done``, ``model.pkl``), so ``python -m domainbed.scripts.collect_results
--input_dir <output_dir>/runs`` reads them too.  The toy's controls (labelled variants of
Fish and IDGM) write to ``<output_dir>/controls/<name>/``: ``collect_results`` groups runs by
algorithm and would select among a control's checkpoints and the algorithm's own.  A directory with ``done`` is
finished and skipped; one without it is what a killed job left and is cleared
and run again, because DomainBed's train script cannot resume.  Jobs train under the
sweeps' job lock (``domainbed_fish.run_job``): a directory whose lock a live process
holds is being trained by someone else (say, a job that outlived a killed earlier
invocation) and is left alone, with an error saying so; so is one DomainBed's train script
trains without the lock on this machine (started by hand, or by DomainBed's own launcher;
recognised from its command line, :mod:`domainbed_fish.lockfile`).  On Linux a job also ends when
the command that launched it ends, however it ends (:mod:`domainbed_fish.lifetime`).

A job's directory name hashes what the preset passes, not the registry's defaults, so a
finished run can predate a changed default.  Such a run is *stale*: the hyperparameters
DomainBed recorded in its ``results.jsonl`` differ from what the job would resolve now.
It is moved to ``<output_dir>/stale/`` (kept, never mixed into the report) and run again.

Two ways to start the train script (``JOB_RUNNERS``): ``subprocess`` starts a new Python
per job, which pays about 10 s of imports before the first step (DomainBed's ``datasets``
imports WILDS, which imports scikit-learn; and torch, torchvision); ``forkserver`` (the
default where the platform has it) imports them once into a server process and forks each
job from it, calling the same ``main`` with the same arguments, so a job starts
in a fraction of a second.  ``benchmarks/job_start.py`` measures both.  Both run
``python -m domainbed_fish.run_job``, DomainBed's train script under the job lock.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from domainbed_fish.lifetime import LAUNCHER_PID_VARIABLE
from domainbed_fish.locate import import_domainbed
from domainbed_fish.lockfile import (
    JobLock,
    LockFileError,
    TrainProcesses,
    holder_pid,
    is_locked,
    is_training,
    unlocked_trainer_pid,
)
from domainbed_fish.reproduction.presets import TrainJob
from domainbed_fish.results import read_jsonl, train_error_tail
from domainbed_fish.run_job import clear_job_dir
from domainbed_fish.run_job import main as run_job_main

JobState = Literal["done", "stale", "running", "to do"]
JobRunner = Literal["forkserver", "subprocess"]
JOB_RUNNERS: tuple[JobRunner, ...] = ("forkserver", "subprocess")
#: DomainBed's train script under the job lock; takes the train script's arguments.
TRAIN_MODULE = "domainbed_fish.run_job"
#: What the train script imports, loaded once into the fork server (the costly part is
#: DomainBed's ``datasets``: WILDS and scikit-learn behind it).
FORKSERVER_PRELOAD = (
    "numpy", "torch", "torchvision", "domainbed_fish", "domainbed.datasets", "domainbed.algorithms",
    "domainbed.hparams_registry", "domainbed.lib.misc", "domainbed.lib.fast_data_loader", TRAIN_MODULE,
)


#: The error of a forked job that stopped before the train script started: the usual cause is
#: a script calling :func:`run_jobs` without the ``__main__`` guard, which the job re-imports.
NOT_STARTED = (
    "the job's process stopped before DomainBed's train script started; its error is on the "
    "launcher's terminal. If a script of yours calls run_jobs, put the call under "
    "`if __name__ == \"__main__\":` (each job imports the script first), or pass runner=\"subprocess\"."
)


def default_job_runner() -> JobRunner:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "subprocess"


#: Where the runs go: the algorithms' own, and the labelled variants (controls).
RUNS, CONTROLS = "runs", "controls"


def run_dir(output_dir: Path, job: TrainJob) -> Path:
    return output_dir / (CONTROLS if job.label else RUNS) / job.name


def controls_in_runs(output_dir: Path, jobs: Sequence[TrainJob]) -> list[TrainJob]:
    """The controls an earlier version trained into ``runs/`` that belong in ``controls/``:
    nothing there yet, and no live process training them where they are."""
    processes = TrainProcesses()
    return [job for job in jobs
            if job.label and (output_dir / RUNS / job.name).is_dir() and not run_dir(output_dir, job).exists()
            and not is_training(output_dir / RUNS / job.name, processes)]


def move_controls_out_of_runs(output_dir: Path, jobs: Sequence[TrainJob]) -> list[Path]:
    """Move the controls an earlier version trained into ``runs/`` to ``controls/`` (kept, not
    retrained); one a live process is training is left where it is.  Returns where they went."""
    moved = []
    for job in controls_in_runs(output_dir, jobs):
        new = run_dir(output_dir, job)
        new.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(output_dir / RUNS / job.name), str(new))
        moved.append(new)
    return moved


def steps_recorded(output_dir: Path, job: TrainJob) -> int:
    """Training steps ``job`` has checkpointed so far: one past the ``step`` of the last
    complete line of its ``results.jsonl`` (DomainBed writes one per checkpoint, the first
    at step 0), at most ``job.steps``; 0 before the first checkpoint.

    Read while the job writes, so a line without its newline yet is skipped, quietly."""
    try:
        text = (run_dir(output_dir, job) / "results.jsonl").read_bytes()
    except OSError:
        return 0
    for line in reversed(text.split(b"\n")[:-1]):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return max(0, min(record["step"] + 1, job.steps))
    return 0


def expected_hparams(job: TrainJob) -> dict[str, Any]:
    """The hyperparameters DomainBed's train script resolves for ``job`` today (as JSON)."""
    registry = import_domainbed("hparams_registry")
    resolved = {**registry.default_hparams(job.algorithm, job.dataset), **job.hparams}
    return json.loads(json.dumps(resolved))


def recorded_hparams(output_dir: Path, job: TrainJob, at: Path | None = None) -> dict[str, Any] | None:
    """The hyperparameters a finished run was trained with (None: no record to compare).
    ``at``: the run's directory, when not ``run_dir(output_dir, job)``."""
    path = (at or run_dir(output_dir, job)) / "results.jsonl"
    records = read_jsonl(path) if path.exists() else []
    return records[0].get("hparams") if records else None


def job_state(output_dir: Path, job: TrainJob, processes: TrainProcesses | None = None,
              at: Path | None = None) -> JobState:
    """'done', 'stale' (finished under other hyperparameters than the job resolves now),
    'running' (a live process holds its lock, or DomainBed's train script trains it without
    the lock) or 'to do'.  ``processes``: a scan of this machine's train processes to reuse;
    ``at``: the run's directory, when not ``run_dir(output_dir, job)``."""
    directory = at or run_dir(output_dir, job)
    if not (directory / "done").exists():
        return "running" if is_training(directory, processes) else "to do"
    recorded = recorded_hparams(output_dir, job, at=directory)
    return "stale" if recorded is not None and recorded != expected_hparams(job) else "done"


def stale_differences(output_dir: Path, job: TrainJob) -> dict[str, tuple[Any, Any]]:
    """For a stale run: each hyperparameter that differs, as (recorded, expected now)."""
    recorded, expected = recorded_hparams(output_dir, job) or {}, expected_hparams(job)
    return {name: (recorded.get(name), expected.get(name)) for name in sorted({*recorded, *expected})
            if recorded.get(name) != expected.get(name)}


def set_aside(output_dir: Path, job: TrainJob) -> Path:
    """Move a stale run to ``<output_dir>/stale/<name>-<UTC time>`` and return where it went."""
    target = output_dir / "stale" / f"{job.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir(output_dir, job)), str(target))
    return target


@dataclass
class JobOutcome:
    job: TrainJob
    seconds: float
    error: str | None = None  # the tail of the job's stderr when it failed


def still_running(directory: Path, unlocked_pid: int | None = None) -> str:
    """The error for a job another live process is training: the holder of its lock, or
    ``unlocked_pid``, DomainBed's train script run on it without the lock."""
    pid = holder_pid(directory) if unlocked_pid is None else unlocked_pid
    example = ("DomainBed's train script run on it directly" if unlocked_pid is not None
               else "one left running by an earlier invocation that was killed")
    return (f"{directory} is being trained by another process (pid {pid}), for example {example}; "
            f"nothing was changed there. Let it finish, or stop it (kill {pid}), then run the same "
            f"command again.")


def _job_env(threads: int) -> dict[str, str]:
    # Several jobs share the cores: give each its slice, or they oversubscribe.
    return {**{var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            LAUNCHER_PID_VARIABLE: str(os.getpid())}


def _error_tail(returncode: int, stderr: str, directory: Path) -> str:
    return "\n".join([*train_error_tail(directory, stderr), f"(exit status {returncode})"])


def _run_subprocess(train_args: list[str], threads: int) -> tuple[int, str]:
    """(exit status, stderr) of the train script in a new Python."""
    proc = subprocess.run([sys.executable, "-m", TRAIN_MODULE, *train_args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **_job_env(threads)})
    return proc.returncode, proc.stderr


def _train_in_forked_child(train_args: list[str], stderr_path: str, threads: int, env: dict[str, str]) -> None:
    """The child's body: what ``python -m domainbed_fish.run_job ...`` would do, with the
    same environment, thread count and output redirection as ``_run_subprocess``."""
    from multiprocessing import forkserver

    import torch  # preloaded: free

    # The server lives while any process holds the write end of its "alive" pipe, and it hands
    # one to every process it forks. Dropping ours lets it exit with the launcher, which is what
    # fires this job's parent-death signal (domainbed_fish.lifetime).
    server = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    os.environ.update(env)
    torch.set_num_threads(threads)  # the environment variable alone is read only at torch's start
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    sys.argv = [TRAIN_MODULE, *train_args]
    # Called, not run with runpy: the module is preloaded, and runpy would warn about that in
    # every job's stderr (which a failed job's report quotes).
    sys.exit(run_job_main(train_args))


def _forkserver_context() -> multiprocessing.context.BaseContext:
    import_domainbed()  # puts a DOMAINBED_DIR checkout on sys.path, which the server inherits
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return context


def _run_forked(train_args: list[str], threads: int) -> tuple[int, str]:
    """(exit status, stderr) of the train script forked from the preloaded server."""
    # The job clears its directory when it starts, so its stderr is kept outside it. The child
    # creates the file: without it, the child failed before reaching the train script.
    with tempfile.TemporaryDirectory(prefix="domainbed_fish-job-") as folder:
        stderr_path = Path(folder) / "stderr.txt"
        process = _forkserver_context().Process(target=_train_in_forked_child,
                                                args=(train_args, str(stderr_path), threads, _job_env(threads)))
        try:
            process.start()
        except (EOFError, OSError) as error:
            # The server died while starting the job (killed, say): this job fails, not the
            # command; the next start launches a new server.
            return 1, f"the fork server ended while starting the job ({error!r}); run the same command again"
        process.join()
        stderr = stderr_path.read_text(errors="replace") if stderr_path.exists() else NOT_STARTED
    return process.exitcode if process.exitcode is not None else 1, stderr


def run_job(output_dir: Path, job: TrainJob, threads: int, runner: JobRunner | None = None) -> JobOutcome:
    """Run one job to completion (clearing what an interrupted earlier attempt left)."""
    runner = runner or default_job_runner()
    if runner not in JOB_RUNNERS:
        raise ValueError(f"unknown job runner {runner!r}: choose one of {list(JOB_RUNNERS)}")
    directory = run_dir(output_dir, job)
    # run_job clears the directory again under the lock; clearing here too means that a job
    # failing before it gets there is not reported with an earlier attempt's err.txt.  Only
    # under the lock: another process may be training this job.
    lock = JobLock(directory)
    try:
        acquired = lock.acquire()
    except LockFileError as error:  # a failed job with the fix, not a traceback that ends every job
        return JobOutcome(job, 0.0, str(error))
    if not acquired:
        return JobOutcome(job, 0.0, still_running(directory))
    try:
        if (directory / "done").exists():  # another invocation finished it since the plan was made
            return JobOutcome(job, 0.0)
        pid = unlocked_trainer_pid(directory)
        if pid is not None:  # DomainBed's train script, started by hand or by its own launcher
            return JobOutcome(job, 0.0, still_running(directory, pid))
        clear_job_dir(directory)
    finally:
        lock.release()
    train_args = job.train_args(str(directory))
    start = time.perf_counter()
    if runner == "forkserver":
        returncode, stderr = _run_forked(train_args, threads)
    else:
        returncode, stderr = _run_subprocess(train_args, threads)
    seconds = time.perf_counter() - start
    if (directory / "done").exists() and returncode == 0:
        return JobOutcome(job, seconds)
    if is_locked(directory):  # another process took the directory between our check and the job's start
        return JobOutcome(job, seconds, still_running(directory))
    return JobOutcome(job, seconds, _error_tail(returncode, stderr, directory))


def run_jobs(
    output_dir: Path,
    jobs: Sequence[TrainJob],
    workers: int,
    progress: Callable[[JobOutcome], None] | None = None,
    runner: JobRunner | None = None,
) -> list[JobOutcome]:
    """Run the unfinished and stale ``jobs``, ``workers`` at a time, each with its share of the
    cores, started by ``runner`` (default: ``default_job_runner()``).

    A script that calls this needs the ``if __name__ == "__main__":`` guard around the call,
    as for any multiprocessing program: the ``forkserver`` runner's jobs import the calling
    script before they start, and without the guard each would try to start jobs itself
    (Python's multiprocessing then stops it with a ``RuntimeError`` about the bootstrapping
    phase, and every job fails).  ``runner="subprocess"`` has no such requirement."""
    runner = runner or default_job_runner()
    processes = TrainProcesses()
    states = {job.name: job_state(output_dir, job, processes) for job in jobs}
    for job in jobs:
        if states[job.name] == "stale":
            set_aside(output_dir, job)
    pending = [job for job in jobs if states[job.name] != "done"]
    threads = max(1, (os.cpu_count() or 1) // workers)
    outcomes = []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(run_job, output_dir, job, threads, runner) for job in pending]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
    finally:
        # On Ctrl-C the queued jobs must not start (a plain ``with`` would run them all before
        # raising); the running ones got the same SIGINT and stop, and a rerun redoes them.
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes
