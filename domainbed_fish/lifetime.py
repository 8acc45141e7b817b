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
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

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
