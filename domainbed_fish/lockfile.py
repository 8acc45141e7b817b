"""Per-job locks, so two sweeps on one output directory never train the same job at once.

A job holds an exclusive ``flock`` on ``<job dir>/.domainbed_fish.lock`` while it trains.
The kernel releases the lock when the process ends, however it ends (SIGKILL, node
failure of a local disk, preemption), so a lock can never go stale; a job directory
without ``done`` and without a live lock is an interrupted run.

``flock`` works on local disks and on NFSv4 (where Linux emulates it with POSIX locks);
on other network file systems check that locks are shared between machines before
running two sweeps on one directory from different hosts.

DomainBed's own launchers (``local``, ``multi_gpu``) run its train script without the lock.
:func:`is_training` recognises such a job on this machine too, from the processes' command
lines (Linux's ``/proc``), so that ``status``, ``delete_incomplete`` and a relaunch do not
take it for an interrupted run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

#: Name of the lock file inside a job's output directory.
LOCK_NAME = ".domainbed_fish.lock"


class LockFileError(OSError):
    """A job's lock path that no process can lock: a directory, a dangling symbolic link, a
    FIFO… (a damaged job directory; the plugin only ever makes a regular file there), or a
    file this user may not open.  The message names the path and the fix."""


def damaged_lock(path: Path) -> LockFileError | None:
    """The error for ``path`` when something other than a regular file (or a link to one) is
    there; ``None`` when it is such a file or absent (``acquire`` creates it)."""
    try:
        mode = os.stat(path).st_mode  # follows a link: its target must be the file
    except FileNotFoundError:
        if not os.path.islink(path):
            return None
        what = "a dangling symbolic link"  # opening it would create a file outside the job directory
    except OSError as exc:  # a link loop, say
        what = f"unusable ({exc.strerror})"
    else:
        if stat.S_ISREG(mode):
            return None
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    remove = "rm -r" if what == "a directory" else "rm"
    return LockFileError(
        f"the job's lock file {path} is {what}, which no process can lock (a damaged job directory); "
        f"remove it ({remove} '{path}') and run the same command again")


class JobLock:
    """An exclusive, non-blocking lock on one job's output directory."""

    def __init__(self, job_dir: str | os.PathLike):
        self.job_dir = Path(job_dir)
        self.path = self.job_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self, patience_s: float = 1.0) -> bool:
        """Take the lock; ``False`` if another live process holds it.

        ``patience_s``: how long to retry first, because :func:`is_locked` probes by
        taking the lock for a few microseconds and must not make a launch skip a job.
        Raises :class:`LockFileError` when the lock path cannot be a lock (see there).
        """
        deadline = time.monotonic() + patience_s
        while True:
            self.job_dir.mkdir(parents=True, exist_ok=True)
            # Checked before the open: a FIFO would block it, and a link dangling into a
            # missing directory would fail it with FileNotFoundError forever (the retry below).
            damage = damaged_lock(self.path)
            if damage is not None:
                raise damage
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # delete_incomplete removed the directory after mkdir
                continue
            except PermissionError as exc:
                raise LockFileError(
                    f"cannot open the job's lock file {self.path}: {exc.strerror}; run the command as a "
                    f"user who may write to {self.job_dir} (or fix its permissions), then run it again") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
                continue
            # The directory may have been deleted (delete_incomplete) between open and
            # flock: then we locked an orphaned file and must start over.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return True

    def release(self) -> None:
        """Give the lock back (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        if not self.acquire():
            raise RuntimeError(f"{self.job_dir} is locked by another process (pid {holder_pid(self.job_dir)})")
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def is_locked(job_dir: str | os.PathLike) -> bool:
    """Whether a live process holds ``job_dir``'s lock (i.e. is training that job)."""
    path = Path(job_dir) / LOCK_NAME
    if damaged_lock(path) is not None:  # nothing can hold it (and a FIFO would block the open)
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return False


def holder_pid(job_dir: str | os.PathLike) -> int | None:
    """The pid written by the last process that took ``job_dir``'s lock, if any."""
    try:
        text = (Path(job_dir) / LOCK_NAME).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def _train_script_arguments(argv: Sequence[str]) -> Sequence[str] | None:
    """The arguments after DomainBed's train script in a Python command line, else ``None``."""
    if not argv or not os.path.basename(argv[0]).startswith("python"):
        return None  # an editor or a shell naming train.py trains nothing
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[i + 2:] if argv[i + 1:i + 2] == ["domainbed.scripts.train"] else None
        if arg.startswith("-m"):  # -mdomainbed.scripts.train
            return argv[i + 1:] if arg == "-mdomainbed.scripts.train" else None
        if not arg.startswith("-"):  # the script: Python's own options come before it
            return argv[i + 1:] if arg.endswith("domainbed/scripts/train.py") else None
        i += 2 if arg in ("-W", "-X") else 1  # the options that take a separate value
    return None


def train_output_dir(argv: Sequence[str]) -> str | None:
    """The ``--output_dir`` of a command line running DomainBed's train script, else ``None``.

    Read as train.py's ``argparse`` reads it: the last value wins, and any unambiguous prefix
    of ``--output_dir`` (no other option of train.py starts with ``--o``) names it.
    """
    arguments = _train_script_arguments(argv)
    if arguments is None:
        return None
    return output_dir_argument(arguments) or "train_output"  # train.py's default


def output_dir_argument(arguments: Sequence[str]) -> str | None:
    """The ``--output_dir`` value among ``arguments`` as train.py's ``argparse`` reads it (the
    last one; ``--output_dir=x`` or a prefix such as ``--out x``), else ``None``."""
    output_dir = None
    for i, arg in enumerate(arguments):
        name, has_value, value = arg.partition("=")
        if len(name) >= 3 and "--output_dir".startswith(name):
            if has_value:
                output_dir = value
            elif i + 1 < len(arguments):
                output_dir = arguments[i + 1]
    return output_dir


def _train_processes() -> dict[str, int]:
    """``{real path of the job directory: pid}`` of the train processes of this machine."""
    found: dict[str, int] = {}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no /proc: not Linux
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
            output_dir = train_output_dir(argv)
            if output_dir is None:
                continue
            if not os.path.isabs(output_dir):
                output_dir = os.path.join(os.readlink(f"/proc/{pid}/cwd"), output_dir)
        except OSError:  # ended meanwhile, or another user's cwd (an absolute --output_dir still counts)
            continue
        found[os.path.realpath(output_dir)] = pid
    return found


class TrainProcesses:
    """The DomainBed train processes of this machine, scanned once, when first asked:
    a status over many jobs reads ``/proc`` once, not once a job."""

    def __init__(self) -> None:
        self._found: dict[str, int] | None = None

    def pid_for(self, job_dir: str | os.PathLike) -> int | None:
        """The pid of the train process whose ``--output_dir`` is ``job_dir``, if any."""
        if self._found is None:
            self._found = _train_processes()
        return self._found.get(os.path.realpath(job_dir))


def unlocked_trainer_pid(job_dir: str | os.PathLike, processes: TrainProcesses | None = None) -> int | None:
    """The pid of a process on this machine running DomainBed's train script on ``job_dir``
    without the job lock (DomainBed's own launchers), if there is one.

    ``processes``: a scan to reuse (for many jobs at once); by default this machine is scanned now.
    """
    return (processes or TrainProcesses()).pid_for(job_dir)


def is_training(job_dir: str | os.PathLike, processes: TrainProcesses | None = None) -> bool:
    """Whether a live process trains ``job_dir``: one holding its lock (the plugin's jobs),
    or DomainBed's own train script without it on this machine."""
    return is_locked(job_dir) or unlocked_trainer_pid(job_dir, processes) is not None
