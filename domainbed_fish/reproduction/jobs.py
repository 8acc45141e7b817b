"""Run reproduction jobs through DomainBed's unmodified train script.

Each job writes to ``<output_dir>/runs/<name>/`` (DomainBed's ``results.jsonl``,
``done``, ``model.pkl``), so ``python -m domainbed.scripts.collect_results
--input_dir <output_dir>/runs`` reads them too.  A directory with ``done`` is
finished and skipped; one without it is what a killed job left and is cleared
and run again, because DomainBed's train script cannot resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from domainbed_fish.reproduction.presets import TrainJob


def run_dir(output_dir: Path, job: TrainJob) -> Path:
    return output_dir / "runs" / job.name


def is_done(output_dir: Path, job: TrainJob) -> bool:
    return (run_dir(output_dir, job) / "done").exists()


@dataclass
class JobOutcome:
    job: TrainJob
    seconds: float
    error: str | None = None  # the tail of the job's stderr when it failed


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # Several jobs share the cores: give each its slice, or they oversubscribe.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_job(output_dir: Path, job: TrainJob, threads: int) -> JobOutcome:
    """Run one job to completion (clearing what an interrupted earlier attempt left)."""
    directory = run_dir(output_dir, job)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    command = [sys.executable, "-m", "domainbed.scripts.train", *job.train_args(str(directory))]
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=_child_env(threads))
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not (directory / "done").exists():
        tail = proc.stderr.strip().splitlines()[-15:]
        return JobOutcome(job, seconds, "\n".join(tail) or f"exit status {proc.returncode}")
    return JobOutcome(job, seconds)


def run_jobs(
    output_dir: Path,
    jobs: Sequence[TrainJob],
    workers: int,
    progress: Callable[[JobOutcome], None] | None = None,
) -> list[JobOutcome]:
    """Run the unfinished ``jobs``, ``workers`` at a time, each with its share of the cores."""
    pending = [job for job in jobs if not is_done(output_dir, job)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    outcomes = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_job, output_dir, job, threads) for job in pending]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
    return outcomes
