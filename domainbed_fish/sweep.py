"""Sweeps of Fish/IDGM vs ERM/CORAL on DomainBed: launch, check, clean up, report.

    python -m sweeps launch --preset cpu_quick --output_dir out/cpu_quick
    python -m sweeps launch --datasets PACS --algorithms Fish IDGM ERM CORAL \
        --data_dir ~/data --output_dir out/pacs --command_launcher local_parallel
    python -m sweeps dry_run ...           # list the jobs and count them, run nothing
    python -m sweeps status --output_dir out/pacs
    python -m sweeps delete_incomplete --output_dir out/pacs
    python -m sweeps report --input_dir out/pacs

(``python -m domainbed_fish.sweep`` and ``domainbed-fish-sweep`` are the same command.)

The jobs are DomainBed's: its ``make_args_list`` builds the argument lists and its
``Job`` hashes them into output directories, so the directory is what DomainBed's
``sweep`` would write (``checkpoint_freq``, when given, is part of the hashed
arguments) and DomainBed's ``collect_results`` reads it.  What the plugin adds:
presets, ``--selection``/``--test_envs`` to launch only the jobs the chosen
model-selection methods need, per-job locks (``run_job``), relaunching interrupted jobs
(DomainBed wants ``delete_incomplete`` first), a manifest, and the report.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainbed_fish import presets as presets_module
from domainbed_fish.errors import file_in_the_way
from domainbed_fish.lockfile import TrainProcesses, is_training
from domainbed_fish.selection import needs_pairs, parse_selection, required_test_envs

DONE, RUNNING, INCOMPLETE, NOT_LAUNCHED = "done", "running", "incomplete", "not launched"
#: ``--data_dir`` of a preset whose datasets generate their data (``"data_dir": null``).
NO_DATA_DIR = "unused-generated-datasets"
STATES = (DONE, RUNNING, INCOMPLETE, NOT_LAUNCHED)
_TRAIN = "python -m domainbed.scripts.train"

#: Defaults of the sweep options (DomainBed's where it has the option).
DEFAULTS: dict[str, Any] = {
    "algorithms": ["Fish", "IDGM", "ERM", "CORAL"],
    "task": "domain_generalization",
    "n_hparams_from": 0,
    "n_hparams": 20,
    "n_trials": 3,
    "seed": 0,
    "steps": None,
    "hparams": None,
    "holdout_fraction": 0.2,
    "selection": None,  # "all", or "training,oracle" with --single_test_envs
    "test_envs": None,
    "checkpoint_freq": None,
    "command_launcher": "local_parallel",
}


@dataclass
class SweepJob:
    """A DomainBed ``Job`` plus its lock-aware state."""

    job: Any  # domainbed.scripts.sweep.Job
    state: str

    @property
    def name(self) -> str:
        """The job's directory name (DomainBed's hash of its arguments)."""
        return Path(self.job.output_dir).name

    @property
    def command(self) -> str:
        """The shell command: DomainBed's ``train`` command run through ``run_job``."""
        import shlex

        assert self.job.command_str.startswith(_TRAIN)
        return f"{shlex.quote(sys.executable)} -m domainbed_fish.run_job" + self.job.command_str[len(_TRAIN):]

    def describe(self) -> str:
        """One line: state, directory name, dataset, algorithm, test envs, seeds."""
        a = self.job.train_args
        return (f"{self.state:>12}  {self.name}  {a['dataset']} {a['algorithm']} test_envs={a['test_envs']} "
                f"hparams_seed={a['hparams_seed']} trial_seed={a['trial_seed']}")


def job_state(job_dir: Path, processes: TrainProcesses | None = None) -> str:
    """``done`` / ``running`` (a live lock, or DomainBed's own train script on it on this
    machine) / ``incomplete`` / ``not launched``."""
    if (job_dir / "done").exists():
        return DONE
    if job_dir.exists():
        return RUNNING if is_training(job_dir, processes) else INCOMPLETE
    return NOT_LAUNCHED


# ----------------------------------------------------------------------------- arguments


def _sweep_options(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--preset", help=f"named settings: {', '.join(presets_module.available())}")
    parser.add_argument("--datasets", nargs="+", help="DomainBed dataset names")
    parser.add_argument("--algorithms", nargs="+", help=f"default: {' '.join(d['algorithms'])}")
    parser.add_argument("--task", help=f"default: {d['task']}")
    parser.add_argument("--n_hparams_from", type=int, help="first hparams seed (default 0)")
    parser.add_argument("--n_hparams", type=int, help=f"hparams seeds up to this (default {d['n_hparams']})")
    parser.add_argument("--n_trials", type=int, help=f"default {d['n_trials']}")
    parser.add_argument("--output_dir", help="the sweep's directory")
    parser.add_argument("--data_dir", help="DomainBed's data directory (default: DOMAINBED_FISH_DATA_DIR; "
                        "not needed when every dataset is the plugin's, which generate their data)")
    parser.add_argument("--seed", type=int, help="seed of the launch order (DomainBed's option)")
    parser.add_argument("--steps", type=int, help="training steps (default: the dataset's)")
    parser.add_argument("--hparams", help="JSON dict of fixed hyperparameters (merged over a preset's)")
    parser.add_argument("--holdout_fraction", type=float, help=f"default {d['holdout_fraction']}")
    parser.add_argument("--single_test_envs", action="store_true",
                        help="one test environment per job (DomainBed's option; excludes --selection loo)")
    parser.add_argument("--skip_confirmation", action="store_true")
    parser.add_argument("--command_launcher", help=f"default {d['command_launcher']}; any DomainBed launcher")
    parser.add_argument("--selection", help="training, loo, oracle, a comma list, or all (the default)")
    parser.add_argument("--test_envs", type=int, nargs="+", help="held-out environments (default: all)")
    parser.add_argument("--checkpoint_freq", type=int, help="steps between evaluations (default: the dataset's)")
    parser.add_argument("--workers", type=int, help="local_parallel CPU workers (default: DOMAINBED_FISH_WORKERS "
                                                     "or one per core)")
    parser.add_argument("--submitit_folder", help="logs and pickles (default: OUTPUT_DIR/submitit_logs)")
    parser.add_argument("--submitit_cluster", choices=["slurm", "local", "debug"])
    parser.add_argument("--submitit_partition")
    parser.add_argument("--submitit_time", type=int, help="minutes per job")
    parser.add_argument("--submitit_gpus", type=int)
    parser.add_argument("--submitit_cpus", type=int)
    parser.add_argument("--submitit_mem_gb", type=int)
    parser.add_argument("--submitit_array_parallelism", type=int)
    parser.add_argument("--submitit_account")
    parser.add_argument("--submitit_qos")
    parser.add_argument("--submitit_constraint")
    parser.add_argument("--submitit_max_requeue", type=int)
    parser.add_argument("--submitit_no_wait", action="store_true", help="return once the jobs are submitted")
    parser.add_argument("--list", action="store_true", help="status: list every job")


def invoked_as() -> str:
    """The command as the user started it, for usage lines and the manifest.

    ``python -m sweeps`` works only from the repository's root, so an installed package's
    user who ran ``domainbed-fish-sweep`` or ``python -m domainbed_fish.sweep`` is shown that."""
    script = Path(sys.argv[0])
    if script.name == "__main__.py" and script.parent.name == "sweeps":
        return "python -m sweeps"
    if script.name == "sweep.py" and script.parent.name == "domainbed_fish":
        return "python -m domainbed_fish.sweep"
    return "domainbed-fish-sweep"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (one sub-command per action)."""
    parser = argparse.ArgumentParser(prog=invoked_as(), description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("launch", "train the jobs that are not done"),
                            ("dry_run", "list and count the jobs, run nothing"),
                            ("status", "done / running / incomplete / not launched"),
                            ("delete_incomplete", "delete interrupted jobs (never running ones)")]:
        _sweep_options(sub.add_parser(name, help=help_text))
    report = sub.add_parser("report", help="tables (Markdown, LaTeX, CSV) and plots")
    report.add_argument("--input_dir", required=True, help="the sweep's directory")
    report.add_argument("--report_dir", help="where to write (default: INPUT_DIR/report)")
    report.add_argument("--selection", default="all", help="training, loo, oracle, a comma list, or all")
    report.add_argument("--include_incomplete", action="store_true",
                        help="also use records of jobs that did not finish")
    report.add_argument("--no_plots", action="store_true")
    # Listed for --help and the invalid-choice message only: main() hands "reproduce ..." over
    # before parsing, so the reproduction's own options and --help apply.
    sub.add_parser("reproduce", help="the paper's own experiments: python -m domainbed_fish.reproduction "
                                     "(its options; reproduce --help lists them)")
    return parser


@dataclass
class SweepConfig:
    """The resolved settings of a sweep."""

    datasets: list[str]
    algorithms: list[str]
    task: str
    n_hparams_from: int
    n_hparams: int
    n_trials: int
    seed: int
    steps: int | None
    hparams: str | None
    holdout_fraction: float
    selection: list[str]
    test_envs: list[int] | None
    checkpoint_freq: int | None
    data_dir: str
    output_dir: str
    command_launcher: str


def _refuse_file_as_output_dir(output_dir: str) -> None:
    blocking_file = file_in_the_way(Path(output_dir))
    if blocking_file is not None:
        raise SystemExit(f"error: --output_dir {output_dir}: {blocking_file} is a file, not a directory; "
                         "pass the sweep's directory (a new one to start a sweep)")


def _refuse_unwritable_output_dir(output_dir: str) -> None:
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --output_dir {output_dir}: {existing} cannot be written to (permissions or a "
                         "read-only file system); pass a directory you can write to. Nothing was launched.")


#: Values of DomainBed's train script's ``--task``.
TASKS = ("domain_generalization", "domain_adaptation")


def _refuse_bad_train_options(pick: Callable[[str], Any]) -> None:
    """Refuse the options DomainBed's train script would misread in every job, before any
    job exists: it reads ``--steps 0`` and ``--checkpoint_freq 0`` as the dataset's default
    (``args.steps or N_STEPS``), trains nothing yet writes ``done`` for negative steps,
    evaluates every step for a negative ``checkpoint_freq``, fails every job on a
    ``--holdout_fraction`` outside (0, 1) and on an unknown ``--task``."""
    negative_means = {"steps": "no training, and mark the job done", "checkpoint_freq": "every step"}
    for name, negative in negative_means.items():
        value = pick(name)
        if value is not None and value < 1:
            misread = "0 as the dataset's default" if value == 0 else f"a negative value as {negative}"
            raise SystemExit(f"error: --{name} {value}: DomainBed's train script would read {misread}; "
                             f"pass --{name} 1 or more, or leave it out for the dataset's default")
    holdout = pick("holdout_fraction")
    if not 0 < holdout < 1:
        raise SystemExit(f"error: --holdout_fraction {holdout}: it is the share of each environment held out for "
                         "validation, so it must lie strictly between 0 and 1 (0 leaves no validation data and 1 "
                         "no training data); DomainBed's default is 0.2")
    if pick("task") not in TASKS:
        raise SystemExit(f"error: --task {pick('task')!r}: DomainBed's train script knows {', '.join(TASKS)}")


def resolve(args: argparse.Namespace) -> SweepConfig:
    """Command line over preset over defaults.

    Raises:
        SystemExit: with a message naming the problem and the fix.
    """
    try:
        preset = presets_module.load(args.preset) if args.preset else {}
    except ValueError as exc:
        raise SystemExit(f"error: --preset: {exc}") from None

    def pick(name: str):
        value = getattr(args, name, None)
        if value is not None:
            return value
        if name in preset:
            return preset[name]
        return DEFAULTS.get(name)

    if args.output_dir is None:
        raise SystemExit("error: --output_dir is required (the sweep's directory)")
    _refuse_file_as_output_dir(args.output_dir)
    datasets = pick("datasets")
    if not datasets:
        raise SystemExit("error: give --datasets (or a --preset)")
    datasets = list(dict.fromkeys(datasets))  # a name given twice would count its jobs twice
    if pick("n_hparams_from") >= pick("n_hparams"):
        raise SystemExit(f"error: --n_hparams_from {pick('n_hparams_from')} --n_hparams {pick('n_hparams')} "
                         "selects no hyperparameter seed: the seeds are n_hparams_from … n_hparams − 1, so "
                         "--n_hparams must be larger")
    if pick("n_trials") < 1:
        raise SystemExit(f"error: --n_trials {pick('n_trials')}: at least 1 trial is needed")
    _refuse_bad_train_options(pick)
    hparams: dict[str, Any] = dict(preset.get("hparams") or {})
    hparams_string: str | None = None
    if args.hparams:
        try:
            user = json.loads(args.hparams)
        except json.JSONDecodeError as exc:
            raise SystemExit(
                f"error: --hparams is not valid JSON ({exc}); example: --hparams '{{\"lr\": 1e-4}}'"
            ) from None
        if not isinstance(user, dict):
            raise SystemExit("error: --hparams must be a JSON object, e.g. '{\"lr\": 1e-4}'")
        hparams.update(user)
        # The string is hashed into the job's directory: kept as typed, it names the
        # directory DomainBed's own sweep would, so either command resumes the other's sweep.
        hparams_string = args.hparams if not preset.get("hparams") else None
    if "batch_size" in hparams:
        from domainbed_fish.errors import InvalidBatchSizeError, check_batch_size

        try:  # every job would fail at its first loader, whatever the algorithm
            check_batch_size(hparams["batch_size"])
        except InvalidBatchSizeError as exc:
            raise SystemExit(f"error: --hparams: {exc} Nothing was launched.") from None
    selection_value = pick("selection")
    if selection_value is None:
        selection_value = "training,oracle" if args.single_test_envs else "all"
    try:
        selection = parse_selection(selection_value)
    except ValueError as exc:
        raise SystemExit(f"error: --selection: {exc}") from None
    if args.single_test_envs and needs_pairs(selection):
        raise SystemExit("error: --selection loo needs jobs with two test environments; drop --single_test_envs "
                         "or choose --selection training,oracle")
    from domainbed_fish.locate import import_domainbed
    from domainbed_fish.registry import DATASETS as GENERATED_DATASETS

    data_dir = args.data_dir or os.environ.get("DOMAINBED_FISH_DATA_DIR")
    if data_dir is None:
        if ("data_dir" in preset and preset["data_dir"] is None) or set(datasets) <= set(GENERATED_DATASETS):
            # The datasets read no files; a fixed value keeps the hashed job
            # directories the same on every machine and under every TMPDIR.
            data_dir = NO_DATA_DIR
        else:
            # A misspelt plugin dataset (LinearTo) would otherwise ask for a data directory.
            _refuse_unknown("dataset", datasets, import_domainbed("datasets").DATASETS)
            raise SystemExit("error: --data_dir is required (DomainBed's data directory), "
                             "or set DOMAINBED_FISH_DATA_DIR")
    return SweepConfig(
        datasets=list(datasets), algorithms=list(dict.fromkeys(pick("algorithms"))), task=pick("task"),
        n_hparams_from=pick("n_hparams_from"), n_hparams=pick("n_hparams"), n_trials=pick("n_trials"),
        seed=pick("seed"), steps=pick("steps"),
        hparams=hparams_string or (json.dumps(hparams, sort_keys=True) if hparams else None),
        holdout_fraction=pick("holdout_fraction"), selection=selection, test_envs=pick("test_envs"),
        checkpoint_freq=pick("checkpoint_freq"), data_dir=str(data_dir), output_dir=str(args.output_dir),
        command_launcher=pick("command_launcher"),
    )


# ----------------------------------------------------------------------------- jobs


def _refuse_unknown(kind: str, names: Sequence[str], known: Sequence[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        close = {n: difflib.get_close_matches(n, known, n=1) for n in unknown}
        hints = "".join(f" Did you mean {close[n][0]!r} for {n!r}?" for n in unknown if close[n])
        raise SystemExit(f"error: unknown {kind}(s) {unknown}.{hints} Available: {', '.join(known)}")


def _check_names(config: SweepConfig) -> None:
    from domainbed_fish.locate import import_domainbed

    _refuse_unknown("dataset", config.datasets, import_domainbed("datasets").DATASETS)
    _refuse_unknown("algorithm", config.algorithms, import_domainbed("algorithms").ALGORITHMS)


def make_jobs(config: SweepConfig) -> list[SweepJob]:
    """The jobs of the sweep, built by DomainBed's ``make_args_list`` and ``Job``, keeping
    only the test environments the selection methods need."""
    from domainbed_fish.locate import import_domainbed

    _check_names(config)
    sweep = import_domainbed("scripts.sweep")
    datasets = import_domainbed("datasets")
    # First, so bad --test_envs or loo on a 2-domain dataset get our message, not an assert.
    wanted: dict[str, list[list[int]]] = {}
    for dataset in config.datasets:
        try:
            wanted[dataset] = required_test_envs(datasets.num_environments(dataset), config.selection,
                                                 config.test_envs)
        except ValueError as exc:
            raise SystemExit(f"error: {dataset}: {exc}") from None
    args_list = sweep.make_args_list(
        n_trials=config.n_trials, dataset_names=config.datasets, algorithms=config.algorithms,
        n_hparams_from=config.n_hparams_from, n_hparams=config.n_hparams, steps=config.steps,
        data_dir=config.data_dir, task=config.task, holdout_fraction=config.holdout_fraction,
        single_test_envs=not needs_pairs(config.selection), hparams=config.hparams,
    )
    jobs, processes = [], TrainProcesses()
    for train_args in args_list:
        if train_args["test_envs"] not in wanted[train_args["dataset"]]:
            continue
        if config.checkpoint_freq is not None:
            train_args["checkpoint_freq"] = config.checkpoint_freq
        job = sweep.Job(train_args, config.output_dir)
        jobs.append(SweepJob(job, job_state(Path(job.output_dir), processes)))
    return jobs


def check_hparams(jobs: Sequence[SweepJob]) -> None:
    """Resolve the plugin algorithms' hyperparameters of every job as DomainBed's train
    script will, and validate them, so that a bad value stops a launch (or a dry run)
    instead of failing in every job.  ``status`` and ``delete_incomplete`` do not check:
    they must work on a sweep whatever it was launched with.

    Raises:
        SystemExit: naming the job and the hyperparameter.
    """
    from domainbed_fish.locate import import_domainbed

    algorithms = import_domainbed("algorithms")
    datasets = import_domainbed("datasets")
    registry = import_domainbed("hparams_registry")
    seed_hash = import_domainbed("lib.misc").seed_hash
    checked = set()
    for j in jobs:
        a = j.job.train_args
        validate = getattr(algorithms.get_algorithm_class(a["algorithm"]), "validate_hparams", None)
        num_domains = datasets.num_environments(a["dataset"]) - len(a["test_envs"])
        # the defaults (hparams_seed 0) do not depend on the trial seed
        trial = a["trial_seed"] if a["hparams_seed"] else None
        key = (a["algorithm"], a["dataset"], a["hparams_seed"], trial, num_domains)
        if validate is None or key in checked:
            continue
        checked.add(key)
        if a["hparams_seed"] == 0:
            hparams = registry.default_hparams(a["algorithm"], a["dataset"])
        else:
            hparams = registry.random_hparams(a["algorithm"], a["dataset"],
                                              seed_hash(a["hparams_seed"], a["trial_seed"]))
        if a.get("hparams"):
            hparams.update(json.loads(a["hparams"]))
        try:
            validate(hparams, num_domains)
        except ValueError as exc:
            pair = ("" if len(a["test_envs"]) == 1 else
                    f" (a job holding out {len(a['test_envs'])} environments, for leave-one-domain-out "
                    f"selection, trains on {num_domains} domains; --selection training,oracle launches "
                    "only jobs holding out one)")
            raise SystemExit(f"error: {a['dataset']} {a['algorithm']} test_envs={a['test_envs']} "
                             f"hparams_seed={a['hparams_seed']} trial_seed={a['trial_seed']}: {exc}{pair} "
                             "Nothing was launched.") from None
    # after the algorithms' own checks, whose messages are more specific
    _refuse_unknown_names(jobs, registry, algorithms, datasets)


def _refuse_unknown_names(jobs: Sequence[SweepJob], registry: Any, algorithms: Any, datasets: Any) -> None:
    """Refuse a fixed hyperparameter that no registered algorithm or dataset has.

    DomainBed's train script merges ``--hparams`` over the registry's and never reads a
    name it does not know, so a typo (``lrr``) would train every job at the default.  A
    name of an algorithm or dataset that is registered but not in this sweep (``meta_lr``
    in a sweep of ERM) is let through, as DomainBed does: one ``--hparams`` string is often
    shared between sweeps.
    """
    given = {name for j in jobs if j.job.train_args.get("hparams") for name in json.loads(j.job.train_args["hparams"])}
    if not given:
        return
    pairs = sorted({(j.job.train_args["algorithm"], j.job.train_args["dataset"]) for j in jobs})
    algorithm, dataset = pairs[0]
    # The registry's names are an algorithm's plus a dataset's, so every algorithm on one
    # dataset and one algorithm on every dataset name them all (0.2 s, not 3 s for all pairs).
    in_sweep = set().union(*(registry.default_hparams(a, d) for a, d in pairs))
    known = in_sweep.union(*(registry.default_hparams(a, dataset) for a in algorithms.ALGORITHMS),
                           *(registry.default_hparams(algorithm, d) for d in datasets.DATASETS))
    unknown = sorted(given - known)
    if unknown:
        close = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in unknown}
        hints = [f"did you mean {close[n][0]!r} for {n!r}?" for n in unknown if close[n]]
        if len(hints) < len(unknown):
            hints.append(f"the names of {', '.join(sorted({a for a, _ in pairs}))} on "
                         f"{', '.join(sorted({d for _, d in pairs}))} are {sorted(in_sweep)}.")
        one = len(unknown) == 1
        verb = "is not a hyperparameter" if one else "are not hyperparameters"
        raise SystemExit(f"error: --hparams: {', '.join(map(repr, unknown))} {verb} of any registered "
                         f"algorithm or dataset, and DomainBed's train script would ignore "
                         f"{'it' if one else 'them'}: {' '.join(hints)} Nothing was launched.")


def jobs_from_manifest(output_dir: str) -> list[SweepJob]:
    """The jobs recorded in ``output_dir``'s manifest (for status without the options)."""
    from domainbed_fish.locate import import_domainbed
    from domainbed_fish.manifest import read_manifest

    manifest = read_manifest(output_dir)
    if manifest is None:
        raise SystemExit(f"error: {output_dir} has no sweep_manifest.json; give the sweep's options "
                         "(--preset or --datasets ...) as for launch")
    sweep = import_domainbed("scripts.sweep")
    jobs, processes = [], TrainProcesses()
    for train_args in manifest["jobs"].values():
        train_args = {k: v for k, v in train_args.items() if k != "output_dir"}
        job = sweep.Job(train_args, output_dir)
        jobs.append(SweepJob(job, job_state(Path(job.output_dir), processes)))
    return jobs


def summary(jobs: Sequence[SweepJob]) -> str:
    """``N jobs: a done, b running, c incomplete, d not launched.``"""
    counts = Counter(j.state for j in jobs)
    return f"{len(jobs)} jobs: " + ", ".join(f"{counts[s]} {s}" for s in STATES) + "."


def breakdown(jobs: Sequence[SweepJob]) -> str:
    """Job counts per dataset and algorithm, with the test-environment sets."""
    lines = []
    groups: dict[tuple[str, str], list[SweepJob]] = {}
    for j in jobs:
        groups.setdefault((j.job.train_args["dataset"], j.job.train_args["algorithm"]), []).append(j)
    for (dataset, algorithm), group in groups.items():
        envs = sorted({tuple(j.job.train_args["test_envs"]) for j in group})
        done = sum(j.state == DONE for j in group)
        lines.append(f"  {dataset:<16} {algorithm:<10} {len(group):>5} jobs ({done} done), "
                     f"test env sets: {' '.join('+'.join(map(str, e)) for e in envs)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


def _launcher(config: SweepConfig, args: argparse.Namespace):
    import functools
    import os

    from domainbed_fish.launchers import WORKERS_VARIABLE, env_int, local_parallel, submitit_launcher
    from domainbed_fish.locate import import_domainbed

    name = config.command_launcher
    if name == "local_parallel":
        workers, given = args.workers, "--workers"
        if workers is None:
            try:
                workers, given = env_int(WORKERS_VARIABLE), WORKERS_VARIABLE
            except ValueError as exc:
                raise SystemExit(f"error: {exc}; unset it for one worker per core. Nothing was launched.") from None
        if workers is not None and workers < 1:
            raise SystemExit(f"error: {given} {workers}: local_parallel needs at least 1 worker (leave it out "
                             "for one per core). Nothing was launched.")
        return functools.partial(local_parallel, workers=workers)
    if name == "submitit":
        options = {k.removeprefix("submitit_"): v for k, v in vars(args).items()
                   if k.startswith("submitit_") and k != "submitit_no_wait"}
        if args.submitit_no_wait:
            options["wait"] = False
        if options["folder"] is None and not os.environ.get("DOMAINBED_FISH_SUBMITIT_FOLDER"):
            options["folder"] = str(Path(config.output_dir) / "submitit_logs")  # next to the jobs
        return functools.partial(submitit_launcher, **options)
    registry = import_domainbed("command_launchers").REGISTRY
    if name not in registry:
        raise SystemExit(f"error: unknown --command_launcher {name!r}; available: {', '.join(registry)}")
    return registry[name]


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.skip_confirmation:
        return True
    try:
        answer = input(f"{question} (y/n) ")
    except EOFError:  # a batch job or a pipe: nobody can answer
        raise SystemExit(f"\nerror: {question} needs a y/n answer, but standard input is closed; "
                         "pass --skip_confirmation to go ahead without asking") from None
    return answer.strip().lower().startswith("y")


def launch(config: SweepConfig, args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Train every job that is not done and not running elsewhere."""
    import numpy as np

    from domainbed_fish.manifest import read_manifest, write_manifest

    jobs = make_jobs(config)
    check_hparams(jobs)
    read_manifest(config.output_dir)  # a damaged one stops the launch here, not after the question
    print(summary(jobs))
    to_run = [j for j in jobs if j.state in (NOT_LAUNCHED, INCOMPLETE)]
    if to_run:
        _refuse_unwritable_output_dir(config.output_dir)
    n_incomplete = sum(j.state == INCOMPLETE for j in to_run)
    print(f"About to launch {len(to_run)} jobs" + (f" ({n_incomplete} interrupted ones are cleared and "
                                                     "trained again)" if n_incomplete else "") + ".")
    if not to_run:
        return 0
    launcher = _launcher(config, args)  # its settings are checked before the question
    if not _confirm(args, "Launch?"):
        print("Nevermind!")
        return 0
    write_manifest(config.output_dir, {j.name: j.job.train_args for j in jobs},
                   dict(vars(config)), argv)
    order = np.random.RandomState(config.seed).permutation(len(to_run))  # as DomainBed, shuffled
    launcher([to_run[i].command for i in order])
    after = make_jobs(config)
    print(summary(after))
    blocking = config.command_launcher in ("local_parallel", "local", "multi_gpu") or (
        config.command_launcher == "submitit" and not args.submitit_no_wait)
    if blocking:
        failed = [j for j in after if j.state in (INCOMPLETE, NOT_LAUNCHED)]
        if failed:
            print(f"{len(failed)} jobs did not finish; see out.txt/err.txt in their directories, "
                  "then launch again to retry them:", file=sys.stderr)
            for j in failed[:20]:
                print("  " + j.describe(), file=sys.stderr)
            return 1
    return 0


def dry_run(config: SweepConfig) -> int:
    """List the jobs (state and command) and count them."""
    jobs = make_jobs(config)
    check_hparams(jobs)
    for j in jobs:
        print(j.describe())
        print(f"              {j.command}")
    n_sets = {d: len({tuple(j.job.train_args['test_envs']) for j in jobs if j.job.train_args['dataset'] == d})
              for d in config.datasets}
    per_dataset = " + ".join(f"{n_sets[d]} ({d})" for d in config.datasets)
    print(f"Estimate: {len(config.algorithms)} algorithms × test env sets [{per_dataset}] × "
          f"{config.n_hparams - config.n_hparams_from} hparams × {config.n_trials} trials = {len(jobs)} jobs "
          f"for selection {'+'.join(config.selection)}.")
    print(breakdown(jobs))
    print(summary(jobs))
    print(f"Would launch {sum(j.state in (NOT_LAUNCHED, INCOMPLETE) for j in jobs)} jobs.")
    return 0


def status(jobs: Sequence[SweepJob], list_all: bool) -> int:
    """Print the jobs' states."""
    for j in jobs:
        if list_all or j.state in (RUNNING, INCOMPLETE):
            print(j.describe())
    print(breakdown(jobs))
    print(summary(jobs))
    return 0


def delete_incomplete(jobs: Sequence[SweepJob], args: argparse.Namespace) -> int:
    """Delete interrupted jobs' directories (DomainBed's semantics, but never a running job)."""
    to_delete = [j for j in jobs if j.state == INCOMPLETE]
    print(summary(jobs))
    print(f"About to delete {len(to_delete)} jobs.")
    if not to_delete or not _confirm(args, "Delete?"):
        return 0
    import time

    from domainbed_fish.lockfile import JobLock, LockFileError, unlocked_trainer_pid

    deleted, damaged, processes, scanned = 0, 0, TrainProcesses(), time.monotonic()
    for j in to_delete:
        if time.monotonic() - scanned > 1.0:  # one scan a second, not one a job: a job may start meanwhile
            processes, scanned = TrainProcesses(), time.monotonic()
        lock = JobLock(j.job.output_dir)
        try:
            acquired = lock.acquire(patience_s=0)
        except LockFileError as error:  # kept: without the lock nothing tells that no one trains it
            print(f"error: {error}", file=sys.stderr)
            damaged += 1
            continue
        if not acquired:
            continue  # started meanwhile
        try:
            started = unlocked_trainer_pid(j.job.output_dir, processes) is not None  # by DomainBed's launcher
            if not started and not (Path(j.job.output_dir) / "done").exists():
                shutil.rmtree(j.job.output_dir)
                deleted += 1
        finally:
            lock.release()
    print(f"Deleted {deleted} jobs!")
    return 1 if damaged else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sweeps`` / ``domainbed-fish-sweep``."""
    from domainbed_fish.locate import DomainBedNotFoundError
    from domainbed_fish.manifest import CorruptManifestError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reproduce"]:  # also for domainbed-fish-sweep, not only python -m sweeps
        from domainbed_fish.reproduction.__main__ import main as reproduce

        return reproduce(argv[1:])
    try:
        return _main(argv)
    except (DomainBedNotFoundError, CorruptManifestError) as exc:
        raise SystemExit(f"error: {exc}") from None


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    command_line = [invoked_as(), *(sys.argv[1:] if argv is None else argv)]
    if args.command == "report":
        from domainbed_fish.errors import missing_plotting_library
        from domainbed_fish.report import write_report

        if not args.no_plots and missing_plotting_library():
            raise SystemExit("error: the report's plots need matplotlib, which is not installed: "
                             "pip install 'domainbed-fish[plots]', or pass --no_plots")

        try:
            selection = parse_selection(args.selection)
        except ValueError as exc:
            raise SystemExit(f"error: --selection: {exc}") from None
        try:
            result = write_report(args.input_dir, args.report_dir, selection=selection,
                                  include_incomplete=args.include_incomplete, plots=not args.no_plots)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise SystemExit(f"error: {exc}") from None
        except OSError as exc:  # a read-only sweep directory, or a file where the report goes
            where = args.report_dir or str(Path(args.input_dir) / "report")
            raise SystemExit(f"error: cannot write the report to {where}: {exc.strerror or exc} "
                             f"({exc.filename}); pass --report_dir with a directory you can write to") from None
        print(result.markdown)
        print(f"\nWrote {', '.join(str(p) for p in result.files)}")
        return 0
    if args.command in ("status", "delete_incomplete") and not (args.preset or args.datasets):
        if args.output_dir is None:
            raise SystemExit("error: --output_dir is required (the sweep's directory)")
        _refuse_file_as_output_dir(args.output_dir)
        jobs = jobs_from_manifest(args.output_dir)
    else:
        config = resolve(args)
        if args.command == "launch":
            return launch(config, args, command_line)
        if args.command == "dry_run":
            return dry_run(config)
        jobs = make_jobs(config)
    if args.command == "status":
        return status(jobs, args.list)
    return delete_incomplete(jobs, args)

if __name__ == "__main__":
    sys.exit(main())
