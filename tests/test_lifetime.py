"""A job started with the launcher's pid ends when the launcher ends, and never starts after it."""

from __future__ import annotations

import os
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
