"""Shared fixtures: tiny models and data, and the DomainBed switch.

Tests that need DomainBed use the ``domainbed`` fixture (or the ``requires_domainbed``
mark): without DomainBed they are skipped with the reason, and the pure-torch tests
still run.  Provide DomainBed with DOMAINBED_DIR=/path/to/DomainBed.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from domainbed_fish.hparams import FISH_HPARAMS, IDGM_HPARAMS, FishConfig, IDGMConfig
from domainbed_fish.locate import domainbed_dir_from_env, import_domainbed

REPO = Path(__file__).resolve().parents[1]


def _domainbed_missing() -> str | None:
    """Why DomainBed cannot be imported (its error names the fix), or None when it can."""
    try:
        import_domainbed("algorithms")
    except ImportError as error:
        return f"{error} (see README, 'Providing DomainBed')"
    return None


_MISSING = _domainbed_missing()
HAVE_DOMAINBED = _MISSING is None
SKIP_REASON = _MISSING or "DomainBed is importable"  # pytest wants a reason even when nothing skips
requires_domainbed = pytest.mark.skipif(not HAVE_DOMAINBED, reason=SKIP_REASON)

#: Where the reference-equivalence tests run: the CPU, and also the GPU on a machine that has
#: one. Without a GPU the CUDA cases are simply not generated, so nothing is skipped.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture
def domainbed():
    """DomainBed's package with the plugin registered, or a skip."""
    if not HAVE_DOMAINBED:
        pytest.skip(SKIP_REASON)
    import domainbed_fish
    from domainbed_fish.locate import import_domainbed

    domainbed_fish.register()
    return import_domainbed()


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child Pythons: DomainBed reachable the same way as here."""
    env = dict(os.environ)
    root = domainbed_dir_from_env()
    if root is None and HAVE_DOMAINBED:
        import domainbed

        root = Path(domainbed.__file__).resolve().parents[1]
    if root is not None:
        env["DOMAINBED_DIR"] = str(root)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


PYTHON = sys.executable


def fish_config(**overrides) -> FishConfig:
    hparams = {s.name: s.default for s in FISH_HPARAMS}
    hparams.update(lr=1e-3, weight_decay=0.0, meta_lr=0.5)
    hparams.update(overrides)
    return FishConfig.from_hparams(hparams, num_domains=hparams.pop("num_domains", 3))


def idgm_config(**overrides) -> IDGMConfig:
    hparams = {s.name: s.default for s in IDGM_HPARAMS}
    hparams.update(lr=1e-3, weight_decay=0.0)
    hparams.update(overrides)
    return IDGMConfig.from_hparams(hparams)


def roundtrip(obj):
    """``obj`` after torch.save and torch.load with the safe loader (weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_resumes_identically(original, fresh, batches, steps_before: int, steps_after: int) -> None:
    """Train ``original``, checkpoint it into ``fresh`` (an updater with other weights and
    seed), then step both: the weights must stay bit-identical."""
    for _ in range(steps_before):
        original.step(batches)
    saved = roundtrip({"network": original.network.state_dict(), "updater": original.state_dict()})
    fresh.network.load_state_dict(saved["network"])
    fresh.load_state_dict(saved["updater"])
    for _ in range(steps_after):
        original.step(batches)
        fresh.step(batches)
    for p, q in zip(original.network.parameters(), fresh.network.parameters(), strict=True):
        assert torch.equal(p, q)


def tiny_net(
    in_features: int = 4, hidden: int = 6, classes: int = 3, dtype=torch.float64, seed: int = 0, device: str = "cpu",
) -> nn.Module:
    """A smooth two-layer network (tanh), small enough for finite differences; built on the
    CPU, so that its weights are the same on every device."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    return net.to(device=device, dtype=dtype)


def batchnorm_net(seed: int = 0) -> nn.Module:
    """A small network with BatchNorm running statistics (float64)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()


def with_a_bad_value(batches: list[tuple[torch.Tensor, torch.Tensor]], domain: int, value: float):
    """``batches`` with one input of ``domain`` set to ``value`` (NaN or inf); the rest shared."""
    bad = list(batches)
    x = bad[domain][0].clone()
    x[0, 0] = value
    bad[domain] = (x, bad[domain][1])
    return bad


def domain_minibatches(
    num_domains: int = 3, batch: int = 5, in_features: int = 4, classes: int = 3,
    dtype=torch.float64, seed: int = 1, device: str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-domain minibatches with domain-specific shifts, so the gradients differ (drawn on
    the CPU, then moved to ``device``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in range(num_domains):
        x = torch.randn(batch, in_features, generator=g, dtype=dtype) + d
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


# ----------------------------------------------------------------------------- sweeps

#: The small real sweep the sweep tests share: Debug28, ERM and Fish, environment 0
#: held out, one hparams sample, one trial, 5 steps -- the jobs all three selection
#: methods need (test envs [0], [0, 1], [0, 2]): 6 jobs.
SWEEP_ARGS = [
    "--datasets", "Debug28", "--algorithms", "ERM", "Fish", "--n_hparams", "1", "--n_trials", "1",
    "--steps", "5", "--checkpoint_freq", "2", "--test_envs", "0", "--skip_confirmation",
    "--hparams", '{"batch_size": 8, "gip_every": 2, "idgm_penalty_anneal_iters": 2}',
]


def assert_routing_keeps_idgm_gradient(make_net, batches, gamma: float = 0.7) -> None:
    """IDGM's gradient is the same (to 1e-10) whether the network's graph was built inside
    ``cheap_double_backward`` or by PyTorch alone, and differs from ERM's."""
    from domainbed_fish.gradients import per_domain_losses
    from domainbed_fish.idgm import idgm_gradient
    from domainbed_fish.second_order import cheap_double_backward

    def gradient(routed: bool, weight: float) -> list[torch.Tensor]:
        net = make_net()
        with cheap_double_backward() if routed else contextlib.nullcontext():
            losses = per_domain_losses(net, batches)
        return idgm_gradient(losses, list(net.parameters()), weight).grads

    routed = gradient(True, gamma)
    for a, b in zip(routed, gradient(False, gamma), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    erm = gradient(False, 0.0)
    assert max((a - b).abs().max() for a, b in zip(routed, erm, strict=True)) > 1e-3  # the penalty matters


def sweep_env(**extra: str) -> dict[str, str]:
    """``subprocess_env`` with this checkout first on the path (the sweep's own jobs too)."""
    env = subprocess_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_sweep(*args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """``python -m domainbed_fish.sweep ARGS`` in a subprocess; the CompletedProcess."""
    import subprocess

    return subprocess.run([PYTHON, "-m", "domainbed_fish.sweep", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or sweep_env(), cwd=REPO)


@pytest.fixture(scope="session")
def shared_sweep(tmp_path_factory):
    """The shared sweep, run by two ``launch`` calls started at once on the same directory
    (``local_parallel``, one worker each); returns (output_dir, [stdout of each launch])."""
    import subprocess

    if not HAVE_DOMAINBED:
        pytest.skip(SKIP_REASON)
    out = tmp_path_factory.mktemp("shared_sweep")
    data = tmp_path_factory.mktemp("data")
    cmd = [PYTHON, "-m", "domainbed_fish.sweep", "launch", *SWEEP_ARGS, "--output_dir", str(out),
           "--data_dir", str(data), "--command_launcher", "local_parallel", "--workers", "1"]
    env = sweep_env(DOMAINBED_FISH_VERBOSE="1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return out, data, outputs


def domainbed_train_without_lock(cwd: Path, output_dir: str) -> subprocess.Popen:
    """A process whose command line is DomainBed's train script on ``output_dir`` (relative to
    ``cwd``), as DomainBed's own ``local`` launcher starts it: no job lock (a stand-in script
    at domainbed/scripts/train.py that only waits)."""
    script = cwd / "checkout" / "domainbed" / "scripts" / "train.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("import time\ntime.sleep(60)\n")
    return subprocess.Popen([PYTHON, str(script), "--dataset", "Debug28", "--output_dir", output_dir], cwd=cwd)
