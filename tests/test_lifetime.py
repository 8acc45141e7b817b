"""A job started with the launcher's pid ends when the launcher ends, and never starts after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PYTHON

from domainbed_fish import lifetime
from domainbed_fish.lifetime import LAUNCHER_PID_VARIABLE, end_with_launcher, is_alive

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

# The launcher starts a job that asks to end with it, reports the job's pid, then waits.
_LAUNCHER = f"""
import os, subprocess, sys
job = subprocess.Popen([sys.executable, "-c",
    "from domainbed_fish.lifetime import end_with_launcher; import time; end_with_launcher(); "
    "print('ready', flush=True); time.sleep(300)"],
    env={{**os.environ, {LAUNCHER_PID_VARIABLE!r}: str(os.getpid())}}, stdout=subprocess.PIPE, text=True)
assert job.stdout.readline() == "ready\\n"
print(job.pid, flush=True)
job.wait()
"""


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting for a reaper that is not us."""
    if not is_alive(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@linux_only
def test_a_job_ends_when_its_launcher_is_killed():
    launcher = subprocess.Popen([PYTHON, "-c", _LAUNCHER], stdout=subprocess.PIPE, text=True)
    job = int(launcher.stdout.readline())
    assert not _gone(job)
    launcher.kill()  # SIGKILL: the launcher can clean nothing up
    launcher.wait()
    deadline = time.monotonic() + 10
    while not _gone(job):
        assert time.monotonic() < deadline, f"the job (pid {job}) outlived its killed launcher"
        time.sleep(0.05)


@pytest.fixture
def signal_requests(monkeypatch) -> list[int]:
    """The parent-death signals asked for in this process (recorded, not set on pytest)."""
    requests: list[int] = []
    monkeypatch.setattr(lifetime, "signal_on_parent_death", lambda: requests.append(1) or True)
    return requests


def test_a_job_whose_launcher_has_ended_does_not_start(monkeypatch, signal_requests):
    ended = subprocess.Popen([PYTHON, "-c", "pass"])
    ended.wait()  # reaped: the pid names no process now
    monkeypatch.setenv(LAUNCHER_PID_VARIABLE, str(ended.pid))
    with pytest.raises(SystemExit, match=rf"the launching command \(pid {ended.pid}\) has ended; not training"):
        end_with_launcher()
    assert signal_requests == [1]  # asked before looking: no gap for the launcher to end unseen


def test_without_a_launcher_nothing_changes(monkeypatch, signal_requests):
    monkeypatch.delenv(LAUNCHER_PID_VARIABLE, raising=False)
    end_with_launcher()  # returns: no signal asked for, no exit
    assert signal_requests == []
    monkeypatch.setenv(LAUNCHER_PID_VARIABLE, str(os.getpid()))
    end_with_launcher()  # a live launcher (this process): the signal is asked for, the job goes on
    assert signal_requests == [1]
    monkeypatch.setenv(LAUNCHER_PID_VARIABLE, "pid-7")
    with pytest.raises(SystemExit, match=rf"{LAUNCHER_PID_VARIABLE}='pid-7' is not a pid; unset it"):
        end_with_launcher()


def _wait_for_pid(path, launcher: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while not (path.exists() and path.read_text().endswith("\n")):
        assert launcher.poll() is None and time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)
    return int(path.read_text())


def _assert_ends(pid: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, f"{what} (pid {pid}) is still running"
        time.sleep(0.05)


# A command as local_parallel gets it: a shell line whose Python (not exec'd by dash) is the
# shell's child. It writes its pid, then works for five minutes.
_WORKER = "import os, sys, time; open(sys.argv[1], 'w').write(f'{os.getpid()}\\n'); time.sleep(300)"


@linux_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_supervise_passes_a_signal_to_everything_the_command_started(tmp_path, signum):
    """SIGTERM (a scheduler, kill), SIGINT (Ctrl-C), SIGHUP (a closed terminal)."""
    pid_file = tmp_path / "pid"
    command = f"{PYTHON} -c \"{_WORKER}\" {pid_file}; echo not reached"
    supervisor = subprocess.Popen([PYTHON, "-m", "domainbed_fish.lifetime", "/bin/sh", "-c", command])
    worker = _wait_for_pid(pid_file, supervisor)
    supervisor.send_signal(signum)
    assert supervisor.wait(timeout=10) == 128 + signum  # the shell's status, as a shell reports it
    _assert_ends(worker, "the shell's child")


_KILLED_SWEEP = """
import shlex, sys
from domainbed_fish.launchers import local_parallel
local_parallel([f"python -c {shlex.quote(sys.argv[2])} {shlex.quote(sys.argv[1])}"], workers=1, progress=False)
"""


@linux_only
def test_local_parallel_jobs_end_with_a_killed_launcher(tmp_path):
    """SIGKILL gives DomainBed's sweep no chance to clean up; its local_parallel jobs must not
    train on as orphans (DomainBed's delete_incomplete would then delete a directory in use)."""
    pid_file = tmp_path / "pid"
    launcher = subprocess.Popen([PYTHON, "-c", _KILLED_SWEEP, str(pid_file), _WORKER])
    worker = _wait_for_pid(pid_file, launcher)
    launcher.kill()
    launcher.wait()
    _assert_ends(worker, "the job")


# A signal that comes before the command has started (right after the handlers are set).
_EARLY_SIGNAL = """
import os, signal, sys
from domainbed_fish import lifetime
lifetime.end_with_launcher = lambda: os.kill(os.getpid(), signal.SIGTERM)
sys.exit(lifetime.supervise(["sleep", "60"]))
"""


@linux_only
def test_supervise_passes_on_a_signal_that_came_before_the_command_started():
    supervisor = subprocess.run([PYTHON, "-c", _EARLY_SIGNAL], timeout=30)
    assert supervisor.returncode == 128 + signal.SIGTERM


def test_a_process_of_another_user_is_alive(monkeypatch):
    def not_permitted(pid, signum):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(lifetime.os, "kill", not_permitted)
    assert is_alive(1)
