"""``sweep_manifest.json``: what produced a sweep directory.

Written by every ``launch`` (and kept up to date by later ones): the plugin version, the
DomainBed commit when it can be known (a git checkout; ``DOMAINBED_COMMIT`` otherwise)
and always a SHA-256 of DomainBed's sources, the torch version, the command line, and
the full list of jobs (DomainBed ``train`` arguments, by output directory name).
``status`` and ``report`` read the job list to say what is missing.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from domainbed_fish.files import write_text_atomic

MANIFEST_NAME = "sweep_manifest.json"


def domainbed_fingerprint() -> dict[str, Any]:
    """``{"path", "commit", "sources_sha256"}`` of the DomainBed this process imports."""
    from domainbed_fish.locate import import_domainbed

    package = Path(import_domainbed().__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    commit = os.environ.get("DOMAINBED_COMMIT") or None
    if commit is None:
        try:
            out = subprocess.run(
                ["git", "-C", str(package.parent), "rev-parse", "HEAD"],
                capture_output=True, text=True, timeout=10, check=False,
            )
            commit = out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"path": str(package.parent), "commit": commit, "sources_sha256": digest.hexdigest()}


class CorruptManifestError(ValueError):
    """``sweep_manifest.json`` is not what ``launch`` writes (edited by hand, or damaged)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(
            f"{path} is not a sweep manifest ({problem}). The job directories do not depend on it: move it "
            f"aside (mv {path} {path}.bad) and run launch again with the sweep's options, which writes a new "
            "one; status and delete_incomplete also work from the options (--preset or --datasets ...)."
        )


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``output_dir``, or ``None`` if there is none.

    Raises:
        CorruptManifestError: it is no JSON, or not shaped as ``write_manifest`` writes it
            (every reader indexes ``jobs`` and ``launches``, and would fail with a traceback).
    """
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptManifestError(path, f"not JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("jobs"), dict) \
            or not all(isinstance(job, dict) for job in manifest["jobs"].values()) \
            or not isinstance(manifest.get("launches", []), list):
        raise CorruptManifestError(path, 'not an object with "jobs" (name: train arguments) and "launches"')
    return manifest


def write_manifest(output_dir: str | os.PathLike, jobs: dict[str, dict], options: dict[str, Any],
                   argv: list[str] | None = None) -> Path:
    """Record a launch in ``output_dir``'s manifest (merged with earlier launches).

    ``jobs``: job directory name -> DomainBed ``train`` arguments; ``argv``: the command
    line (default ``sys.argv``).  Safe against
    concurrent launches (an exclusive lock around read-modify-write, atomic replace).
    """
    import torch

    import domainbed_fish

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / MANIFEST_NAME
    with open(output_dir / (MANIFEST_NAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(output_dir) or {"jobs": {}, "launches": []}
        manifest.setdefault("launches", [])
        manifest.update(
            plugin_version=domainbed_fish.__version__,
            domainbed=domainbed_fingerprint(),
            torch_version=torch.__version__,
            python_version=platform.python_version(),
        )
        manifest["jobs"].update(jobs)
        manifest["launches"].append(
            {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "argv": list(sys.argv if argv is None else argv),
                "options": options,
                "n_jobs": len(jobs),
            }
        )
        write_text_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))
    return path
