"""How often each setting wins CdSprites-N's race to shape, over many seeds, through DomainBed's train script.

    python benchmarks/cdsprites_race.py --grid benchmarks/grids/n15_race.json \
        --runs_dir /tmp/race --summary race.jsonl [--workers 14] \
        [--only "Fish lr 2e-3 b1 0.5, 401 steps" "ERM, 401 steps"]

The reproduction's N = 15 targets turn on a race out of the initial plateau that one seed
wins and another loses (docs/reproduction/findings.md), so a setting judged on the preset's
three seeds is judged on noise.  This runs a grid of settings over many seeds each, every job
exactly as the reproduction preset runs one (:class:`TrainJob`: DomainBed's train script under
the job lock, training-domain validation, the decorrelated environment as the test
environment; seed k here is seed k of the preset), ``--workers`` at a time.  On a machine with
a GPU, DomainBed's train script trains on it and many jobs share it, which is what makes a
dozen seeds per setting affordable (on an H200, 14 jobs at a time finished 69 jobs of
``n15_race.json`` in about 8 min); the sprites are the same, the rounding is not, so seed k
of a GPU run need not end where seed k of a CPU run does, but the fraction of seeds that win
is what this measures.

The grid is a JSON list of settings::

    [{"label": "fish-default", "algorithm": "Fish", "n": 15, "steps": 251,
      "checkpoint_freq": 50, "seeds": 12, "hparams": {"fish_inner_momentum": 0.5}}]

(``"seeds": 12`` is seeds 0 … 11; a list names the seeds.)

``hparams`` go over the default preset's CdSprites sizes (1,000 sprites per domain, 32 per
domain per step) and the registry's defaults.  Jobs run in the grid's order, seed by seed
interleaved across settings, so a run cut short has a few seeds of every setting rather than
all seeds of the first.  Each finished job appends one JSON line to ``--summary`` (the
selected and final accuracy on the decorrelated environment, the training-domain validation
at each checkpoint, the training seconds: the job's own, which on a shared GPU include waiting
for the others); finished jobs are skipped when run again.  A job whose loss went NaN or
infinite (the algorithm's ``NonFiniteLossError``) is an outcome of its setting, not a failure
to retry: it gets a line too, with ``"diverged"`` holding the error and the curve up to its
last checkpoint, and is not run again.  Any other failure is printed and left out of the
summary, so running the same command again retries it.  The table at the end gives, per
setting, the seeds it has, the mean ± standard error of the selected accuracy over the seeds
that finished, how many of those ended at 90% or more and how many at 60% or less, and how
many diverged (``✗`` in the per-seed list).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from domainbed_fish.report import mean_se
from domainbed_fish.reproduction.jobs import JOB_RUNNERS, run_dir, run_jobs
from domainbed_fish.reproduction.presets import PRESETS, TrainJob
from domainbed_fish.reproduction.report import _selected_acc, training_seconds
from domainbed_fish.results import read_jsonl

BASE_HPARAMS = dict(PRESETS["default"].cdsprites_hparams)
WIN, LOSS = 0.90, 0.60
DIVERGED = "NonFiniteLossError"  # in the traceback of a job whose loss went NaN or infinite
REQUIRED_KEYS = {"label", "algorithm", "n", "steps", "seeds"}
OPTIONAL_KEYS = {"checkpoint_freq", "hparams"}


def load_grid(path: Path, only: set[str] | None = None) -> list[dict[str, Any]]:
    """The grid's settings (those named in ``only``, if given), checked."""
    try:
        grid = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--grid {path}: {error}; it must be a JSON list of settings (see --help)") from None
    if not isinstance(grid, list) or not all(isinstance(setting, dict) for setting in grid):
        raise SystemExit(f"--grid {path}: expected a JSON list of settings (objects), got {type(grid).__name__}")
    labels = [setting.get("label") for setting in grid]
    if len(set(labels)) != len(labels) or None in labels:
        raise SystemExit(f"{path}: every setting needs its own 'label' (got {labels})")
    for setting in grid:
        missing = sorted(REQUIRED_KEYS - set(setting))
        unknown = sorted(set(setting) - REQUIRED_KEYS - OPTIONAL_KEYS)
        problems = ([f"lacks {missing}"] if missing else []) + ([f"has unknown keys {unknown}"] if unknown else [])
        if problems:
            raise SystemExit(f"{path}: setting {setting['label']!r} {'; '.join(problems)} (a setting has "
                             f"{sorted(REQUIRED_KEYS)} and may have {sorted(OPTIONAL_KEYS)})")
    if only:
        unknown = only - set(labels)
        if unknown:
            raise SystemExit(f"--only names settings not in {path}: {sorted(unknown)}; it has {labels}")
        grid = [setting for setting in grid if setting["label"] in only]
    return grid


def _seeds(setting: dict[str, Any]) -> list[int]:
    """A setting's seeds: ``"seeds": 12`` is seeds 0 … 11, ``"seeds": [2, 5]`` those two."""
    seeds = setting["seeds"]
    return list(range(seeds)) if isinstance(seeds, int) else [int(seed) for seed in seeds]


def grid_jobs(grid: list[dict[str, Any]]) -> list[tuple[str, TrainJob]]:
    """(label, job) for every setting and seed, seed-major, so every setting gets its first seeds first."""
    jobs = []
    seeds = {setting["label"]: _seeds(setting) for setting in grid}
    for seed in sorted(set().union(*seeds.values())):
        for setting in grid:
            if seed in seeds[setting["label"]]:
                n = int(setting["n"])
                job = TrainJob(f"CdSprites{n}", setting["algorithm"], seed, n, int(setting["steps"]),
                               int(setting.get("checkpoint_freq", 50)),
                               {**BASE_HPARAMS, **setting.get("hparams", {})}, label=setting["label"])
                jobs.append((setting["label"], job))
    names = [job.name for _, job in jobs]
    if len(set(names)) != len(names):
        raise SystemExit("two settings of the grid run the same jobs (same algorithm, N, steps and "
                         "hyperparameters): give each setting something of its own")
    return jobs


def job_key(label: str, job: TrainJob) -> tuple:
    """What makes a summary line a result of this job of this setting: a setting edited under
    the same label (other steps or hyperparameters) runs its jobs again."""
    return label, job.algorithm, job.test_env, job.seed, job.steps, json.dumps(job.hparams, sort_keys=True)


def line_key(line: dict[str, Any]) -> tuple:
    """:func:`job_key` of the job a summary line came from."""
    return (line["label"], line["algorithm"], line["n"], line["seed"], line["steps"],
            json.dumps(line["hparams"], sort_keys=True))


def current_lines(lines: list[dict[str, Any]], grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary lines of the grid's jobs as the grid defines them now."""
    keys = {job_key(label, job) for label, job in grid_jobs(grid)}
    return [line for line in lines if line_key(line) in keys]


def job_summary(label: str, job: TrainJob, runs_dir: Path, diverged: str | None = None) -> dict[str, Any]:
    """One line of the summary: what a job selected and ended at, or, if it diverged, the error
    and its curve up to the last checkpoint it wrote."""
    path = run_dir(runs_dir, job) / "results.jsonl"
    records = sorted(read_jsonl(path), key=lambda r: r["step"]) if path.exists() else []
    test = job.test_env
    train_envs = range(test)  # CdSprites-N: environments 0 … N − 1 train, N is the decorrelated one
    curve = [
        {"step": r["step"], "test": round(r[f"env{test}_in_acc"], 4), "loss": round(r["loss"], 4),
         "val": round(sum(r[f"env{e}_out_acc"] for e in train_envs) / len(train_envs), 4)}
        for r in records
    ]
    line = {"label": label, "algorithm": job.algorithm, "n": job.test_env, "seed": job.seed,
            "steps": job.steps, "hparams": job.hparams,
            "selected": None if diverged else _selected_acc(records),
            "final": None if diverged else curve[-1]["test"],
            "train_seconds": round(training_seconds(records), 1) if records else 0.0,
            "cuda": torch.cuda.is_available(), "curve": curve}
    if diverged:
        line["diverged"] = diverged
    return line


def divergence(error: str) -> str | None:
    """The non-finite-loss message in a failed job's error tail, or None for any other failure."""
    for text in reversed(error.splitlines()):
        if DIVERGED in text:
            return text.split(f"{DIVERGED}:", 1)[-1].strip()
    return None


def table(lines: list[dict[str, Any]], grid: list[dict[str, Any]]) -> str:
    """Per setting: seeds, selected accuracy mean ± SE over the finished seeds, finished seeds
    ≥ 90% and ≤ 60%, diverged seeds."""
    out = ["| setting | seeds | selected, mean ± SE | ≥ 90% | ≤ 60% | diverged | per seed | train s/job |",
           "|---|---|---|---|---|---|---|---|"]
    for setting in grid:
        mine = sorted((line for line in lines if line["label"] == setting["label"]), key=lambda line: line["seed"])
        finished = [100 * line["selected"] for line in mine if not line.get("diverged")]
        per_seed = " ".join("✗" if line.get("diverged") else f"{100 * line['selected']:.0f}" for line in mine)
        cells = [setting["label"], len(mine), "", "", "", len(mine) - len(finished), per_seed, ""]
        if finished:
            mean, se = mean_se(finished)
            cells[2:5] = [f"{mean:.1f} ± {se:.1f}", sum(a >= 100 * WIN for a in finished),
                          sum(a <= 100 * LOSS for a in finished)]
            seconds = [line["train_seconds"] for line in mine if not line.get("diverged")]
            cells[7] = f"{sum(seconds) / len(seconds):.0f}"
        out.append("|" + "|".join(f" {cell} " if cell != "" else " " for cell in cells) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, required=True, help="JSON list of settings (see the module's doc)")
    parser.add_argument("--runs_dir", type=Path, required=True, help="where DomainBed's runs go")
    parser.add_argument("--summary", type=Path, required=True, help="JSON lines, one per finished job")
    parser.add_argument("--workers", type=int, default=2, help="jobs at once (default: 2)")
    parser.add_argument("--only", nargs="+", default=[], metavar="LABEL",
                        help="labels of the grid to run, each one argument (labels contain commas)")
    parser.add_argument("--runner", choices=JOB_RUNNERS, default=None,
                        help="how jobs start DomainBed's train script (default: the reproduction's)")
    parser.add_argument("--table_only", action="store_true", help="print the table of --summary and exit")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid, set(args.only) or None)
    lines = [json.loads(line) for line in args.summary.read_text().splitlines()] if args.summary.exists() else []
    outdated = len([line for line in lines if line["label"] in {s["label"] for s in grid}]) - len(
        current_lines(lines, grid))
    if outdated:
        print(f"{outdated} lines of {args.summary} come from an earlier version of their setting (other steps "
              "or hyperparameters under the same label); they are kept in the file and left out here", flush=True)
    if not args.table_only:
        done = {line_key(line) for line in lines}
        pending = [(label, job) for label, job in grid_jobs(grid) if job_key(label, job) not in done]
        labels = {job.name: label for label, job in pending}
        print(f"{len(pending)} jobs to run, {args.workers} at a time", flush=True)
        start = time.perf_counter()

        def record(outcome) -> None:
            diverged = divergence(outcome.error) if outcome.error else None
            if outcome.error and not diverged:
                print(f"FAILED {outcome.job.name} (left out of {args.summary}; run the same command again "
                      f"to retry it): {outcome.error}", file=sys.stderr, flush=True)
                return
            line = job_summary(labels[outcome.job.name], outcome.job, args.runs_dir, diverged)
            lines.append(line)
            with args.summary.open("a") as f:
                f.write(json.dumps(line) + "\n")
            result = (f"diverged: {diverged}" if diverged else
                      f"selected {100 * line['selected']:.1f}%, final {100 * line['final']:.1f}%")
            print(f"[{time.perf_counter() - start:6.0f} s] {line['label']} seed {line['seed']}: {result} "
                  f"({outcome.seconds:.0f} s)", flush=True)

        run_jobs(args.runs_dir, [job for _, job in pending], args.workers, progress=record, runner=args.runner)
    print(table(current_lines(lines, grid), grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
