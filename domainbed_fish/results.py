"""Read a sweep's ``results.jsonl`` files, robustly.

DomainBed's ``reporting.load_records`` stops with a ``JSONDecodeError`` on the first
truncated line (e.g. a job killed while writing).  Here such a line is skipped with a
:class:`MalformedResultsWarning` naming the file and the line number, and the rest of
the file (and sweep) is kept.  By default only finished jobs (``done``) are read, so
a partly trained run never takes part in model selection.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainbed_fish.lockfile import TrainProcesses, is_training


class MalformedResultsWarning(UserWarning):
    """A line of a ``results.jsonl`` could not be read and was skipped."""


@dataclass
class RunDir:
    """One job directory of a sweep."""

    path: Path
    done: bool
    running: bool
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        """``done``, ``running`` or ``incomplete``."""
        return "done" if self.done else "running" if self.running else "incomplete"


def train_error_tail(output_dir: str | os.PathLike | None, stderr: str, lines: int = 15) -> list[str]:
    """The last ``lines`` lines of what a failed DomainBed train run wrote to stderr.

    Once running, DomainBed's train script sends ``sys.stderr`` to ``err.txt`` in its
    output directory and to *stdout* (``misc.Tee``), so its traceback is in ``err.txt``;
    the process's own stderr keeps only what came before (an import or argument error).
    """
    err_txt = Path(output_dir) / "err.txt" if output_dir is not None else None
    logged = err_txt.read_text(errors="replace").strip() if err_txt is not None and err_txt.is_file() else ""
    return (logged or stderr.strip()).splitlines()[-lines:]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one ``results.jsonl``; unreadable lines are skipped with a warning."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                warnings.warn(f"{path}:{lineno}: malformed results line skipped ({exc.msg}); a job killed "
                              "while writing leaves one. Such a job has no 'done': `domainbed-fish-sweep launch` "
                              "retrains it, DomainBed's own sweep after its delete_incomplete",
                              MalformedResultsWarning, stacklevel=2)
                continue
            if not isinstance(record, dict) or "args" not in record or "step" not in record:
                warnings.warn(f"{path}:{lineno}: results line without 'args' and 'step' skipped",
                              MalformedResultsWarning, stacklevel=2)
                continue
            records.append(record)
    return records


def scan(input_dir: str | os.PathLike, progress: bool = False) -> list[RunDir]:
    """Every job directory under ``input_dir`` (those with a ``results.jsonl`` or ``done``)."""
    input_dir = Path(input_dir)
    if input_dir.exists() and not input_dir.is_dir():
        raise NotADirectoryError(f"sweep directory {input_dir} is a file; pass the sweep's --output_dir, "
                                 "the directory that holds its job directories")
    if not input_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {input_dir} does not exist; pass the sweep's --output_dir")
    subdirs = sorted(p for p in input_dir.iterdir() if p.is_dir())
    if progress:
        import tqdm

        subdirs = tqdm.tqdm(subdirs, desc="reading results", unit="run", leave=False)
    runs, processes = [], TrainProcesses()
    for sub in subdirs:
        results = sub / "results.jsonl"
        done = (sub / "done").exists()
        if not results.exists() and not done:
            continue
        run = RunDir(sub, done=done, running=not done and is_training(sub, processes))
        if results.exists():
            run.records = read_jsonl(results)
        runs.append(run)
    return runs


def load_records(input_dir: str | os.PathLike, include_incomplete: bool = False, progress: bool = False) -> Any:
    """All records of the sweep as DomainBed's ``lib.query.Q`` (what its selection methods take).

    ``include_incomplete``: also read jobs without ``done`` (as DomainBed does).
    """
    return records_of(scan(input_dir, progress=progress), include_incomplete)


def records_of(runs: list[RunDir], include_incomplete: bool = False) -> Any:
    """The records of already scanned runs as DomainBed's ``Q``: finished jobs only unless
    ``include_incomplete``."""
    from domainbed_fish.locate import import_domainbed

    Q = import_domainbed("lib.query").Q
    return Q([record for run in runs if run.done or include_incomplete for record in run.records])
