"""Packaging: a wheel, built from the source tree or from the source distribution (what
``python -m build`` and a registry's users get), ships everything the package reads at
run time: the start-up ``.pth`` at its root, every module and the presets' JSON."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import PYTHON, REPO

PTH = "domainbed_fish-autoload.pth"
SKIPPED = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "domainbed_fish.egg-info"}


def build(hook: str, source: Path, into: Path) -> Path:
    """Run setuptools' PEP 517 ``hook`` (build_sdist or build_wheel) in ``source``."""
    into.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(into)!r}))"
    out = subprocess.run([PYTHON, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return into / out.stdout.strip().splitlines()[-1]


def copy_of_the_checkout(tmp_path: Path) -> Path:
    """The checkout without build outputs, so that nothing left by an earlier build helps."""
    target = tmp_path / "src"
    shutil.copytree(REPO, target, ignore=lambda _dir, names: [n for n in names if n in SKIPPED])
    return target


def runtime_files() -> set[str]:
    """What the installed package needs: the .pth, every module, every preset."""
    package = REPO / "domainbed_fish"
    files = {PTH}
    for pattern in ("**/*.py", "presets/*.json"):
        files |= {str(p.relative_to(REPO)) for p in package.glob(pattern) if "__pycache__" not in p.parts}
    return files


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The checkout's copy, its source distribution and the wheel built from the tree."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("packaging")
    source = copy_of_the_checkout(tmp)
    return {"tmp": tmp, "sdist": build("build_sdist", source, tmp / "sdist"),
            "from_tree": build("build_wheel", source, tmp / "wheel_from_tree")}


def wheel_from_sdist(builds) -> Path:
    """The wheel of ``pip install <sdist>`` and ``python -m build``: built from the unpacked sdist."""
    unpacked = builds["tmp"] / "unpacked"
    if not unpacked.exists():
        with tarfile.open(builds["sdist"]) as archive:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
                archive.extractall(unpacked, filter="data")
            else:
                archive.extractall(unpacked)
    (root,) = unpacked.iterdir()
    return build("build_wheel", root, builds["tmp"] / "wheel_from_sdist")


def test_the_source_distribution_has_the_startup_pth(builds):
    with tarfile.open(builds["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert PTH in names


@pytest.mark.parametrize("which", ["from_tree", "from_sdist"])
def test_the_wheel_ships_everything_read_at_run_time(builds, which):
    wheel = builds["from_tree"] if which == "from_tree" else wheel_from_sdist(builds)
    with zipfile.ZipFile(wheel) as archive:
        assert not runtime_files() - set(archive.namelist())
        assert archive.read(PTH) == (REPO / PTH).read_bytes()
