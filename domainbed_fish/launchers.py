"""Command launchers for DomainBed sweeps: ``local_parallel`` and ``submitit``.

Both follow DomainBed's launcher protocol (a function taking the list of shell commands)
and are registered into ``domainbed.command_launchers.REGISTRY``, so
``--command_launcher local_parallel`` / ``submitit`` also work in DomainBed's own
``sweep``.  Called that way their settings come from environment variables; the plugin's
``sweep`` passes its command-line options instead.

Environment variables (an option given to the plugin's ``sweep`` wins):

- ``DOMAINBED_FISH_WORKERS``: jobs at a time of ``local_parallel``: CPU workers (default: one
  per core), or on a machine with GPUs the number of GPUs used (default: all visible).
- ``DOMAINBED_FISH_SLURM_PARTITION``, ``_TIME`` (minutes), ``_GPUS`` (per job), ``_CPUS``
  (per job), ``_MEM_GB``, ``_ARRAY_PARALLELISM`` (jobs of the array running at once),
  ``_ACCOUNT``, ``_QOS``, ``_CONSTRAINT``, ``_MAX_REQUEUE`` (times a preempted or timed-out
  job is requeued).
- ``DOMAINBED_FISH_SUBMITIT_FOLDER`` (logs and pickles; default ``./submitit_logs``),
  ``DOMAINBED_FISH_SUBMITIT_CLUSTER`` (``slurm``, ``local`` or ``debug``; default:
  Slurm when available, else local), ``DOMAINBED_FISH_SUBMITIT_WAIT`` (``1``/``0``: wait
  for the jobs with a progress bar; default ``1``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from domainbed_fish.allocator import job_environment
from domainbed_fish.lifetime import LAUNCHER_PID_VARIABLE
from domainbed_fish.lockfile import output_dir_argument
from domainbed_fish.results import train_error_tail


def with_this_interpreter(command: str, executable: str | None = None) -> str:
    """Replace a leading ``python`` (DomainBed's commands) by this process's interpreter."""
    executable = executable or sys.executable
    for prefix in ("python ", "python3 "):
        if command.startswith(prefix):
            return shlex.quote(executable) + " " + command[len(prefix):]
    return command


#: DomainBed's train command, as its sweep writes it, and the same job under the job lock.
_DOMAINBED_TRAIN = " -m domainbed.scripts.train "
_UNDER_LOCK = " -m domainbed_fish.run_job "


def under_job_lock(command: str) -> str:
    """DomainBed's ``python -m domainbed.scripts.train ... --output_dir D`` as
    ``python -m domainbed_fish.run_job ...``.

    When DomainBed's own ``sweep`` uses these launchers, its jobs then take the job lock like
    the plugin's: ``status`` sees them running, ``delete_incomplete`` and a relaunch leave
    them alone, and a requeued Slurm job starts from a cleared directory instead of appending
    to an interrupted run's ``results.jsonl``.  Same arguments, same files.  ``run_job`` takes
    ``D`` for the job's own (DomainBed's sweep names one per job): a finished one is skipped,
    an unfinished one cleared first.  A command without ``--output_dir`` is left as it is.
    """
    head, sep, tail = command.partition(_DOMAINBED_TRAIN)
    names_its_directory = output_dir_argument(tail.split()) is not None
    if sep and names_its_directory and head.split()[-1:] and head.split()[-1].split("/")[-1].startswith("python"):
        return head + _UNDER_LOCK + tail
    return command


def visible_gpus() -> list[str]:
    """GPU ids to spread jobs over: ``CUDA_VISIBLE_DEVICES`` if set, else all CUDA devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


#: Jobs at a time of ``local_parallel`` when neither the call nor the plugin's sweep says.
WORKERS_VARIABLE = "DOMAINBED_FISH_WORKERS"


def env_int(name: str) -> int | None:
    """The integer in environment variable ``name`` (``None`` when unset or empty)."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _progress(total: int, desc: str):
    import tqdm

    return tqdm.tqdm(total=total, desc=desc, unit="job", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- local_parallel


def _start(command: str, env: dict[str, str], verbose: bool) -> tuple[subprocess.Popen, Any]:
    # The shell runs under a supervisor that ends its whole process group when this launcher
    # ends, however it ends (domainbed_fish.lifetime): no train job outlives a killed sweep.
    argv = [sys.executable, "-m", "domainbed_fish.lifetime", "/bin/sh", "-c", command]
    env = {**env, LAUNCHER_PID_VARIABLE: str(os.getpid())}
    if verbose:
        return subprocess.Popen(argv, env=env), None
    # DomainBed's train copies its output into the job's out.txt/err.txt; keep stderr
    # aside only to show it when the command fails before that (e.g. a bad argument).
    import tempfile

    err = tempfile.TemporaryFile()
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err), err


def _output_dir(command: str) -> str | None:
    """The ``--output_dir`` of a train command, if it names one (read as the train script's
    ``argparse`` and ``run_job`` read it: the last one, a prefix allowed)."""
    try:
        return output_dir_argument(shlex.split(command))
    except ValueError:
        return None


def _report_failure(command: str, status: int, err: Any) -> None:
    stderr = ""
    if err is not None:
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    tail = "\n".join(train_error_tail(_output_dir(command), stderr))
    print(f"local_parallel: exit status {status}: {command}\n{tail}", file=sys.stderr)


def local_parallel(
    commands: Sequence[str], workers: int | None = None, progress: bool = True, verbose: bool | None = None
) -> list[int]:
    """Run ``commands`` on this machine, several at once; return their exit statuses.

    With GPUs: one job per GPU at a time, each seeing only its GPU (``CUDA_VISIBLE_DEVICES``).
    Without: ``workers`` jobs at a time (default ``DOMAINBED_FISH_WORKERS`` or one per
    core), each limited to ``cores // workers`` threads (``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS``) so they do not oversubscribe the cores.  Commands starting with
    ``python`` run with the interpreter running this launcher.  Their output is not shown
    (DomainBed's ``train`` writes it to the job's ``out.txt``/``err.txt``) unless
    ``verbose`` (default: ``DOMAINBED_FISH_VERBOSE=1``); a failing command's stderr is.
    Each command runs under :func:`domainbed_fish.lifetime.supervise`, so it ends when this
    launcher ends, however it ends, and with glibc set to keep freed memory
    (:func:`domainbed_fish.allocator.job_environment`).
    """
    if verbose is None:
        verbose = os.environ.get("DOMAINBED_FISH_VERBOSE", "0") == "1"
    commands = [with_this_interpreter(under_job_lock(c)) for c in commands]
    gpus = visible_gpus()
    workers = workers or env_int(WORKERS_VARIABLE)
    if workers is not None and workers < 1:
        raise ValueError(f"local_parallel: workers must be at least 1, got {workers}")
    base_env = dict(os.environ)
    base_env.update(job_environment(base_env))  # glibc keeps freed memory (allocator.py)
    if gpus:
        slots = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus[: workers or len(gpus)]]
    else:
        cores = os.cpu_count() or 1
        n = workers or cores
        threads = str(max(1, cores // n))
        slots = [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(n)]

    pending = deque(enumerate(commands))
    running: dict[int, tuple[int, subprocess.Popen, Any]] = {}  # slot -> (command index, process, stderr)
    statuses = [0] * len(commands)
    bar = _progress(len(commands), f"local_parallel ({len(slots)} {'GPUs' if gpus else 'workers'})") \
        if progress else None
    try:
        while pending or running:
            for slot, slot_env in enumerate(slots):
                if slot not in running and pending:
                    index, command = pending.popleft()
                    running[slot] = (index, *_start(command, {**base_env, **slot_env}, verbose))
            time.sleep(0.1)
            for slot, (index, proc, err) in list(running.items()):
                if proc.poll() is not None:
                    statuses[index] = proc.returncode
                    if proc.returncode != 0:
                        _report_failure(commands[index], proc.returncode, err)
                    if err is not None:
                        err.close()
                    del running[slot]
                    if bar is not None:
                        bar.update(1)
    except BaseException:
        for _, proc, _ in running.values():
            proc.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
    failed = sum(1 for s in statuses if s != 0)
    if failed:
        print(f"local_parallel: {failed} of {len(commands)} commands failed (see their out.txt/err.txt)",
              file=sys.stderr)
    return statuses


# ----------------------------------------------------------------------------- submitit


@dataclass
class SubmititOptions:
    """Where and how ``submitit`` runs the jobs; ``None`` leaves submitit's default."""

    folder: str = "submitit_logs"
    cluster: str | None = None
    partition: str | None = None
    time: int | None = None  # minutes
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: int | None = None
    array_parallelism: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    max_requeue: int | None = None
    wait: bool = True

    @classmethod
    def from_env(cls, **overrides: Any) -> SubmititOptions:
        """Options from ``DOMAINBED_FISH_SLURM_*`` / ``DOMAINBED_FISH_SUBMITIT_*``, then
        ``overrides`` (those that are not ``None``)."""
        env = os.environ
        values: dict[str, Any] = {
            "folder": env.get("DOMAINBED_FISH_SUBMITIT_FOLDER") or cls.folder,
            "cluster": env.get("DOMAINBED_FISH_SUBMITIT_CLUSTER") or None,
            "partition": env.get("DOMAINBED_FISH_SLURM_PARTITION") or None,
            "account": env.get("DOMAINBED_FISH_SLURM_ACCOUNT") or None,
            "qos": env.get("DOMAINBED_FISH_SLURM_QOS") or None,
            "constraint": env.get("DOMAINBED_FISH_SLURM_CONSTRAINT") or None,
            "wait": env.get("DOMAINBED_FISH_SUBMITIT_WAIT", "1") != "0",
        }
        for name, var in [("time", "TIME"), ("gpus", "GPUS"), ("cpus", "CPUS"), ("mem_gb", "MEM_GB"),
                          ("array_parallelism", "ARRAY_PARALLELISM"), ("max_requeue", "MAX_REQUEUE")]:
            values[name] = env_int(f"DOMAINBED_FISH_SLURM_{var}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown submitit options {sorted(unknown)}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def executor_parameters(self) -> dict[str, Any]:
        """Parameters for ``submitit.AutoExecutor.update_parameters``."""
        params: dict[str, Any] = {"name": "domainbed_fish", "stderr_to_stdout": False}
        generic = {"timeout_min": self.time, "gpus_per_node": self.gpus, "cpus_per_task": self.cpus,
                   "mem_gb": self.mem_gb}
        slurm = {"slurm_partition": self.partition, "slurm_array_parallelism": self.array_parallelism,
                 "slurm_account": self.account, "slurm_qos": self.qos, "slurm_constraint": self.constraint,
                 "slurm_max_num_timeout": self.max_requeue}
        params.update({k: v for k, v in {**generic, **slurm}.items() if v is not None})
        return params


def _checkpointable_base():
    try:
        import submitit
    except ImportError:
        raise ImportError(
            "the submitit launcher needs the submitit package: pip install 'domainbed-fish[cluster]'"
        ) from None
    return submitit.helpers.Checkpointable


class TrainCommand:
    """One shell command as a submitit job that is requeued when preempted or timed out.

    ``submitit.helpers.Checkpointable`` gives ``checkpoint()``, which submitit calls on
    Slurm's preemption/timeout signal; it resubmits the same command.  On restart the
    job's directory has no ``done`` and no live lock, so ``run_job`` trains it again.
    """

    def __call__(self, command: str) -> int:
        env = dict(os.environ)
        env.update(job_environment(env))  # glibc keeps freed memory (allocator.py)
        status = subprocess.call(with_this_interpreter(under_job_lock(command)), shell=True, env=env)
        if status != 0:
            raise RuntimeError(f"command failed with exit status {status}: {command}")
        return status


def _train_command_class() -> type:
    # Mix in Checkpointable lazily so importing this module never needs submitit.
    base = _checkpointable_base()
    return type("CheckpointableTrainCommand", (TrainCommand, base), {"__module__": __name__})


def __getattr__(name: str):  # pickled jobs find the mixed-in class by name
    if name == "CheckpointableTrainCommand":
        cls = _train_command_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def submitit_launcher(commands: Sequence[str], **options: Any) -> list[int] | None:
    """Submit ``commands`` through submitit as one job array per call.

    On Slurm: a job array with ``array_parallelism`` jobs running at once; partition,
    time, GPUs, CPUs, memory come from ``options`` or the environment (see module doc).
    Without Slurm submitit's local executor runs the jobs on this machine.  When waiting
    (the default), shows a progress bar and returns the exit statuses (1 for a failed
    job); otherwise returns ``None`` right after submitting.
    """
    import submitit

    opts = SubmititOptions.from_env(**options)
    cls = __getattr__("CheckpointableTrainCommand")
    try:
        executor = submitit.AutoExecutor(folder=opts.folder, cluster=opts.cluster)
    except RuntimeError as exc:  # e.g. cluster 'slurm' where sbatch/srun are not on PATH
        raise SystemExit(
            f"error: submitit cannot use cluster {opts.cluster!r} on this machine ({exc}); nothing was "
            "submitted. Launch from a node where Slurm's sbatch and srun are on PATH, or run here with "
            "--submitit_cluster local (or --command_launcher local_parallel)."
        ) from None
    executor.update_parameters(**opts.executor_parameters())
    commands = list(commands)
    if not commands:
        return []
    jobs = executor.map_array(cls(), commands)
    print(f"submitit ({executor.cluster}): submitted {len(jobs)} jobs, logs in {opts.folder}", file=sys.stderr)
    if not opts.wait:
        return None
    statuses = [0] * len(jobs)
    bar = _progress(len(jobs), f"submitit ({executor.cluster})")
    try:
        remaining = dict(enumerate(jobs))
        while remaining:
            for index, job in list(remaining.items()):
                if job.done():
                    try:
                        job.result()
                    except Exception as exc:  # the job's own error, reported and counted
                        statuses[index] = 1
                        print(f"submitit job {job.job_id} failed: {(str(exc).strip().splitlines() or [repr(exc)])[-1]}",
                              file=sys.stderr)
                    del remaining[index]
                    bar.update(1)
            time.sleep(0.5)
    finally:
        bar.close()
    return statuses
