"""Training jobs keep freed memory for reuse: large tensors stop costing page faults."""

from __future__ import annotations

import json
import os
import runpy
import subprocess

import pytest
from conftest import PYTHON

import domainbed_fish
from domainbed_fish import allocator, run_job
from domainbed_fish.allocator import POLICY_VARIABLE

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="the policy is glibc's mallopt")

# Allocates, fills and frees a 64 MiB tensor (above glibc's largest dynamic mmap
# threshold, 32 MiB, so by default it is mmapped afresh each time) again and again, and
# prints whether the policy is in force and the minor page faults of the last five
# cycles.  With the policy, torch's aligned allocations settle on one reused block within
# a few cycles (heap growth bounded: four blocks measured).
_CYCLES = """
import json, resource, sys, torch
from domainbed_fish.allocator import reuse_freed_memory
applied = reuse_freed_memory()
def cycle():
    torch.empty(16 * 2**20).fill_(1.0)
for _ in range(10):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _cycles(policy: str) -> dict:
    out = subprocess.run([PYTHON, "-c", _CYCLES], env={**os.environ, POLICY_VARIABLE: policy},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@glibc_only
def test_reused_memory_takes_no_page_faults():
    system, reuse = _cycles("system"), _cycles("reuse")
    assert not system["applied"] and reuse["applied"]
    # By default every cycle faults its 16,384 pages in again (fewer with huge pages).
    assert system["faults"] >= 5 * 32
    assert reuse["faults"] * 10 < system["faults"]


def test_policy_from_the_environment(monkeypatch):
    monkeypatch.setenv(POLICY_VARIABLE, "system")
    assert allocator.chosen_policy() == "system" and allocator.reuse_freed_memory() is False
    monkeypatch.delenv(POLICY_VARIABLE)
    assert allocator.chosen_policy() == "reuse"
    monkeypatch.setenv(POLICY_VARIABLE, " Reuse ")
    assert allocator.chosen_policy() == "reuse"


def test_unknown_policy_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(POLICY_VARIABLE, "jemalloc")
    with pytest.raises(ValueError, match=rf"{POLICY_VARIABLE}='jemalloc'.*'reuse'.*'system'"):
        allocator.reuse_freed_memory()


def test_glibc_tunables_spell_the_same_policy():
    assert allocator.GLIBC_TUNABLES == "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"
    assert allocator.TRIM_THRESHOLD == 2**30


def test_run_job_applies_the_policy_before_training(monkeypatch, tmp_path):
    events: list[str] = []
    monkeypatch.setattr(run_job, "reuse_freed_memory", lambda: events.append("policy") or True)
    monkeypatch.setattr(domainbed_fish, "register", lambda: None)
    monkeypatch.setattr(run_job, "import_domainbed", lambda: None)
    monkeypatch.setattr(runpy, "run_module", lambda name, **kwargs: events.append(name))
    assert run_job.main(["--output_dir", str(tmp_path / "job")]) == 0
    assert events == ["policy", "domainbed.scripts.train"]


@glibc_only
def test_glibc_tunables_apply_the_policy_without_the_plugin():
    env = {**os.environ, POLICY_VARIABLE: "system", "GLIBC_TUNABLES": allocator.GLIBC_TUNABLES}
    out = subprocess.run([PYTHON, "-c", _CYCLES], env=env, capture_output=True, text=True, check=True).stdout
    tuned = json.loads(out)
    assert not tuned["applied"]  # mallopt was not called: the environment did it
    assert tuned["faults"] * 10 < _cycles("system")["faults"]


@glibc_only
def test_job_environment_adds_the_tunables_unless_set_or_switched_off(monkeypatch):
    monkeypatch.delenv(POLICY_VARIABLE, raising=False)
    assert allocator.job_environment({}) == {"GLIBC_TUNABLES": allocator.GLIBC_TUNABLES}
    assert allocator.job_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}
    monkeypatch.setenv(POLICY_VARIABLE, "system")
    assert allocator.job_environment({}) == {}


_PRINT_TUNABLES = "python -c \"import os; print(os.environ.get('GLIBC_TUNABLES', 'unset'))\" > {out}"


@glibc_only
@pytest.mark.parametrize("policy", ["reuse", "system"])
def test_launchers_start_domainbeds_commands_with_the_policy(tmp_path, monkeypatch, policy):
    """DomainBed's own sweep hands the launchers plain ``domainbed.scripts.train`` commands:
    the policy reaches them through the environment."""
    from domainbed_fish.launchers import TrainCommand, local_parallel

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv(POLICY_VARIABLE, policy)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert local_parallel([_PRINT_TUNABLES.format(out=tmp_path / "local")], workers=1, progress=False) == [0]
    assert TrainCommand()(_PRINT_TUNABLES.format(out=tmp_path / "submitit")) == 0
    expected = allocator.GLIBC_TUNABLES if policy == "reuse" else "unset"
    assert (tmp_path / "local").read_text().strip() == expected
    assert (tmp_path / "submitit").read_text().strip() == expected
