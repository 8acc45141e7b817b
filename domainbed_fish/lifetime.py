"""Training processes that end when the command that launched them ends.

The reproduction command starts each train job as a child process, directly or forked
from a fork server.  If the command itself is killed (SIGTERM from a scheduler or
``kill``, SIGKILL, a closed terminal), Python runs no clean-up and its children would
keep training as orphans: a relaunch would find their directories locked (see
:mod:`domainbed_fish.lockfile`) until they finish.  On Linux the kernel can instead
signal a process when its parent ends (``prctl(PR_SET_PDEATHSIG)``).  The launcher puts
its pid in :data:`LAUNCHER_PID_VARIABLE`; :func:`end_with_launcher`, called first thing
in the job, asks for SIGTERM when the job's parent ends (the launcher, or the fork
server, which exits when the launcher does) and exits at once if the launcher has
already gone.  Elsewhere it does nothing and the job lock alone protects a relaunch.

``local_parallel`` runs shell commands, and ``sh -c`` need not ``exec`` the train script
(dash does not), so the signal must reach a whole process group instead:
``python -m domainbed_fish.lifetime COMMAND...`` (:func:`supervise`) runs the command in its
own process group, passes every SIGTERM, SIGINT or SIGHUP it gets to that group, and gets
SIGTERM itself when the launcher ends.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

#: Environment variable naming the pid of the command that launched a job.
LAUNCHER_PID_VARIABLE = "DOMAINBED_FISH_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def signal_on_parent_death(signal_number: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signal_number`` to this process when its parent ends.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); returns whether it was set.  The setting
    survives ``exec`` and is not inherited by this process's own children.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal_number), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    return True


def is_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_with_launcher() -> None:
    """If this job was started with :data:`LAUNCHER_PID_VARIABLE`, end when its parent ends.

    Raises ``SystemExit`` if the launcher has already ended: the parent could have died
    between the fork and the ``prctl``, when no signal would come.
    """
    value = os.environ.get(LAUNCHER_PID_VARIABLE, "")
    if not value:
        return
    if not value.isdigit():
        raise SystemExit(f"domainbed-fish: {LAUNCHER_PID_VARIABLE}={value!r} is not a pid; unset it")
    signal_on_parent_death()
    if not is_alive(int(value)):
        raise SystemExit(f"domainbed-fish: the launching command (pid {value}) has ended; not training")


#: Signals :func:`supervise` passes on to the command's process group.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supervise(command: Sequence[str]) -> int:
    """Run ``command`` in its own process group and return its exit status (128 + N if
    killed by signal N), ending the whole group when this process is signalled or, via
    :func:`end_with_launcher`, when the launcher ends."""
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if child is None:
            pending.append(signum)  # arrived before the command started: passed on once it has
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:  # before anything can fork: no signal may go unforwarded
        signal.signal(signum, forward)
    end_with_launcher()
    child = subprocess.Popen(list(command), start_new_session=True)
    for signum in pending:
        forward(signum, None)
    returncode = child.wait()
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m domainbed_fish.lifetime COMMAND [ARGUMENT ...]")
    sys.exit(supervise(sys.argv[1:]))
