"""Run reproduction jobs through DomainBed's unmodified train script.

Each job writes to ``<output_dir>/runs/<name>/`` (DomainBed's ``results.jsonl``,
``done``, ``model.pkl``), so ``python -m domainbed.scripts.collect_results
--input_dir <output_dir>/runs`` reads them too.  A directory with ``done`` is
finished and skipped; one without it is what a killed job left and is cleared
and run again, because DomainBed's train script cannot resume.

A job's directory name hashes what the preset passes, not the registry's defaults, so a
finished run can predate a changed default.  Such a run is *stale*: the hyperparameters
DomainBed recorded in its ``results.jsonl`` differ from what the job would resolve now.
It is moved to ``<output_dir>/stale/`` (kept, never mixed into the report) and run again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from domainbed_fish.locate import import_domainbed
from domainbed_fish.reproduction.presets import TrainJob
from domainbed_fish.results import read_jsonl

JobState = Literal["done", "stale", "to do"]


def run_dir(output_dir: Path, job: TrainJob) -> Path:
    return output_dir / "runs" / job.name


def is_done(output_dir: Path, job: TrainJob) -> bool:
    return (run_dir(output_dir, job) / "done").exists()


def expected_hparams(job: TrainJob) -> dict[str, Any]:
    """The hyperparameters DomainBed's train script resolves for ``job`` today (as JSON)."""
    registry = import_domainbed("hparams_registry")
    resolved = {**registry.default_hparams(job.algorithm, job.dataset), **job.hparams}
    return json.loads(json.dumps(resolved))


def recorded_hparams(output_dir: Path, job: TrainJob) -> dict[str, Any] | None:
    """The hyperparameters a finished run was trained with (None: no record to compare)."""
    path = run_dir(output_dir, job) / "results.jsonl"
    records = read_jsonl(path) if path.exists() else []
    return records[0].get("hparams") if records else None


def job_state(output_dir: Path, job: TrainJob) -> JobState:
    """'done', 'stale' (finished under other hyperparameters than the job resolves now) or 'to do'."""
    if not is_done(output_dir, job):
        return "to do"
    recorded = recorded_hparams(output_dir, job)
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
    """Run the unfinished and stale ``jobs``, ``workers`` at a time, each with its share of the cores."""
    states = {job.name: job_state(output_dir, job) for job in jobs}
    for job in jobs:
        if states[job.name] == "stale":
            set_aside(output_dir, job)
    pending = [job for job in jobs if states[job.name] != "done"]
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
