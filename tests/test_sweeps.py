"""Sweeps: selection filter, locks, launchers, manifest, results reading and the report.

The end-to-end tests train real (tiny) DomainBed jobs on Debug28 on the CPU; most of them
share one sweep (``shared_sweep`` in conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, SWEEP_ARGS, domainbed_train_without_lock, requires_domainbed, run_sweep, sweep_env

from domainbed_fish.lockfile import JobLock, holder_pid, is_locked
from domainbed_fish.results import MalformedResultsWarning, read_jsonl
from domainbed_fish.run_job import TRAINING
from domainbed_fish.selection import parse_selection, required_test_envs


def sweep_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``python -m sweeps ARGV`` in this process (DomainBed is imported once): status, out, err."""
    from domainbed_fish.sweep import main

    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# ----------------------------------------------------------------------------- selection filter


def test_required_test_envs_per_selection_method():
    assert required_test_envs(3, ["training"]) == [[0], [1], [2]]
    assert required_test_envs(3, ["oracle"]) == [[0], [1], [2]]
    assert required_test_envs(3, ["loo"]) == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]
    assert required_test_envs(3, ["loo"], test_envs=[0]) == [[0], [0, 1], [0, 2]]
    assert required_test_envs(4, ["training", "loo"], test_envs=[1]) == [[0, 1], [1], [1, 2], [1, 3]]
    assert required_test_envs(4, ["oracle"], test_envs=[3, 1]) == [[1], [3]]


def test_selection_names_and_bad_input():
    assert parse_selection("all") == ["training", "loo", "oracle"]
    assert parse_selection("oracle,training") == ["training", "oracle"]
    with pytest.raises(ValueError, match=r"unknown selection method 'iid'.*training, loo, oracle"):
        parse_selection("iid")
    with pytest.raises(ValueError, match="at least 3 environments"):
        required_test_envs(2, ["loo"])
    with pytest.raises(ValueError, match=r"--test_envs \[5\]: this dataset has environments 0..2"):
        required_test_envs(3, ["training"], test_envs=[5])
    for bad in (3, -1):  # one past the end; Python's last
        with pytest.raises(ValueError, match=rf"--test_envs \[{bad}\]: this dataset has environments 0..2"):
            required_test_envs(3, ["training"], test_envs=[bad])


@requires_domainbed
@pytest.mark.parametrize(
    "selection, test_envs, expected",
    [
        ("training", None, [[0], [1], [2]]),
        ("oracle", "1", [[1]]),
        ("loo", "0", [[0], [0, 1], [0, 2]]),
        ("all", None, [[0], [0, 1], [0, 2], [1], [1, 2], [2]]),
    ],
)
def test_sweep_launches_exactly_the_jobs_a_selection_needs(domainbed, tmp_path, selection, test_envs, expected):
    from domainbed_fish import sweep

    argv = ["dry_run", "--datasets", "Debug28", "--algorithms", "ERM", "Fish", "--n_hparams", "2",
            "--n_trials", "2", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--selection", selection] + (["--test_envs", test_envs] if test_envs else [])
    config = sweep.resolve(sweep.build_parser().parse_args(argv))
    jobs = sweep.make_jobs(config)
    got = sorted({(j.job.train_args["algorithm"], tuple(j.job.train_args["test_envs"]),
                   j.job.train_args["hparams_seed"], j.job.train_args["trial_seed"]) for j in jobs})
    want = sorted({(a, tuple(e), h, t) for a in ("ERM", "Fish") for e in expected for h in (0, 1) for t in (0, 1)})
    assert got == want
    assert len(jobs) == len(want)  # no duplicates

    # Same argument lists, hence the same directories, as DomainBed's own sweep.
    from domainbed_fish.locate import import_domainbed

    db_sweep = import_domainbed("scripts.sweep")
    full = db_sweep.make_args_list(2, ["Debug28"], ["ERM", "Fish"], 0, 2, None, str(tmp_path),
                                   "domain_generalization", 0.2, selection in ("training", "oracle"), None)
    db_dirs = {db_sweep.Job(a, str(tmp_path / "out")).output_dir for a in full}
    assert {j.job.output_dir for j in jobs} <= db_dirs


@requires_domainbed
@pytest.mark.parametrize("hparams", ['{"lr":1e-4}', '{"batch_size": 8, "lr": 0.001}'])
def test_hparams_are_hashed_as_typed_so_domainbeds_sweep_names_the_same_directories(domainbed, tmp_path, hparams):
    from domainbed_fish import sweep
    from domainbed_fish.locate import import_domainbed

    argv = ["dry_run", "--datasets", "Debug28", "--algorithms", "Fish", "--n_hparams", "1", "--n_trials", "1",
            "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--hparams", hparams]
    jobs = sweep.make_jobs(sweep.resolve(sweep.build_parser().parse_args(argv)))
    db_sweep = import_domainbed("scripts.sweep")
    full = db_sweep.make_args_list(1, ["Debug28"], ["Fish"], 0, 1, None, str(tmp_path),
                                   "domain_generalization", 0.2, False, hparams)
    assert {j.job.output_dir for j in jobs} == {db_sweep.Job(a, str(tmp_path / "out")).output_dir for a in full}


@requires_domainbed
def test_checkpoint_freq_is_a_hashed_train_argument_as_domainbeds_job_hashes_it(domainbed, tmp_path):
    from domainbed_fish import sweep
    from domainbed_fish.locate import import_domainbed

    argv = ["dry_run", "--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "2", "--n_trials", "1",
            "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--checkpoint_freq", "7"]
    jobs = sweep.make_jobs(sweep.resolve(sweep.build_parser().parse_args(argv)))
    db_sweep = import_domainbed("scripts.sweep")
    full = db_sweep.make_args_list(1, ["Debug28"], ["ERM"], 0, 2, None, str(tmp_path),
                                   "domain_generalization", 0.2, False, None)
    for a in full:
        a["checkpoint_freq"] = 7
    assert {j.job.output_dir for j in jobs} == {db_sweep.Job(a, str(tmp_path / "out")).output_dir for a in full}
    assert all(" --checkpoint_freq 7 " in f"{j.command} " for j in jobs)


def test_a_device_or_fifo_in_place_of_a_directory_is_in_the_way(tmp_path):
    from domainbed_fish.errors import file_in_the_way

    os.mkfifo(tmp_path / "fifo")
    assert file_in_the_way(tmp_path / "fifo" / "sweep") == tmp_path / "fifo"
    assert file_in_the_way(Path("/dev/null/sweep")) == Path("/dev/null")
    assert file_in_the_way(tmp_path / "new" / "sweep") is None


@requires_domainbed
def test_a_file_free_presets_job_directories_do_not_depend_on_tmpdir(domainbed, tmp_path, monkeypatch):
    from domainbed_fish import sweep

    def directories() -> set[str]:
        argv = ["dry_run", "--preset", "cpu_quick", "--output_dir", str(tmp_path / "out")]
        return {j.job.output_dir for j in sweep.make_jobs(sweep.resolve(sweep.build_parser().parse_args(argv)))}

    monkeypatch.delenv("DOMAINBED_FISH_DATA_DIR", raising=False)
    first = None
    for tmpdir in ("a", "b"):
        (tmp_path / tmpdir).mkdir()
        monkeypatch.setenv("TMPDIR", str(tmp_path / tmpdir))
        monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
        assert tempfile.gettempdir() == str(tmp_path / tmpdir)
        first = first or directories()
        assert directories() == first


@requires_domainbed
@pytest.mark.parametrize("command", ["dry_run", "launch"])
def test_a_bad_hyperparameter_stops_the_sweep_before_any_job(domainbed, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = [command, "--datasets", "Debug28", "--algorithms", "ERM", "IDGM", "--n_hparams", "3", "--n_trials", "1",
            "--data_dir", str(tmp_path), "--output_dir", str(out), "--hparams", '{"idgm_gama": 0.5}',
            "--skip_confirmation"]
    with pytest.raises(SystemExit, match=r"^error: Debug28 IDGM test_envs=\[\d\] hparams_seed=0 trial_seed=0: unknown hyperparameter "
                                         r"'idgm_gama': did you mean 'idgm_gamma'\?.* Nothing was launched\.$"):
        sweep_main(capsys, *argv)
    assert not out.exists()
    # status and delete_incomplete work on a sweep whatever it was launched with
    status, text, _ = sweep_main(capsys, "status", *argv[1:-1])
    assert status == 0 and "not launched" in text


@requires_domainbed
def test_a_name_no_algorithm_or_dataset_has_stops_the_sweep(domainbed, tmp_path, capsys):
    """DomainBed's train script ignores a fixed hyperparameter it does not know, so a typo
    would train every job at the default; a name of a registered algorithm or dataset that
    is not in the sweep is let through, as DomainBed does (shared --hparams strings)."""
    out = tmp_path / "out"
    argv = ["dry_run", "--datasets", "Debug28", "--algorithms", "ERM", "Fish", "--n_hparams", "1", "--n_trials", "1",
            "--data_dir", str(tmp_path), "--output_dir", str(out)]
    with pytest.raises(SystemExit, match=r"^error: --hparams: 'lrr', 'zzz' are not hyperparameters of any registered "
                                         r"algorithm or dataset, and DomainBed's train script would ignore them: did "
                                         r"you mean 'lr' for 'lrr'\? the names of ERM, Fish on Debug28 are "
                                         r"\[.*'meta_lr'.*\]\. Nothing was launched\.$"):
        sweep_main(capsys, *argv, "--hparams", '{"lrr": 0.1, "meta_lr": 0.2, "zzz": 1}')
    with pytest.raises(SystemExit, match=r"^error: --hparams: 'idgm_gama' is not a hyperparameter of any .*did you "
                                         r"mean 'idgm_gamma' for 'idgm_gama'\? Nothing was launched\.$"):
        sweep_main(capsys, *argv, "--hparams", '{"idgm_gama": 0.5}')
    # Fish's only, IDGM's (not in the sweep) and CdSprites' (neither): let through
    status, text, _ = sweep_main(capsys, *argv, "--hparams",
                                 '{"meta_lr": 0.2, "idgm_gamma": 0.5, "cdsprites_per_domain": 100}')
    assert status == 0 and "Would launch 12 jobs." in text


@requires_domainbed
def test_every_random_draw_is_validated_as_the_train_script_resolves_it(domainbed, tmp_path, monkeypatch):
    """The train script's hyperparameters: the defaults for hparams_seed 0, else a random draw
    seeded by (hparams_seed, trial_seed), then --hparams; each distinct one validated once (the
    defaults once for all trial seeds)."""
    from domainbed import hparams_registry
    from domainbed.lib import misc

    from domainbed_fish import sweep
    from domainbed_fish.algorithms import Fish

    seen = []
    monkeypatch.setattr(Fish, "validate_hparams", staticmethod(lambda hparams, n: seen.append((hparams, n))))
    argv = ["dry_run", "--datasets", "Debug28", "--algorithms", "Fish", "ERM", "--n_hparams", "2", "--n_trials", "2",
            "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--hparams", '{"gip_every": 5}',
            "--selection", "training"]
    sweep.check_hparams(sweep.make_jobs(sweep.resolve(sweep.build_parser().parse_args(argv))))
    expected = [({**hparams_registry.default_hparams("Fish", "Debug28"), "gip_every": 5}, 2)] + [
        ({**hparams_registry.random_hparams("Fish", "Debug28", misc.seed_hash(1, trial)), "gip_every": 5}, 2)
        for trial in (0, 1)]
    assert sorted(map(repr, seen)) == sorted(map(repr, expected))


@requires_domainbed
def test_bad_sweep_options_say_what_to_do(domainbed, tmp_path, capsys):
    with pytest.raises(SystemExit, match="drop --single_test_envs"):
        sweep_main(capsys, "dry_run", "--datasets", "Debug28", "--output_dir", str(tmp_path), "--data_dir",
                   str(tmp_path), "--single_test_envs", "--selection", "loo")
    with pytest.raises(SystemExit, match=r"unknown dataset\(s\) \['NoSuchData'\]\. Available: .*Debug28"):
        sweep_main(capsys, "dry_run", "--datasets", "NoSuchData", "--output_dir", str(tmp_path), "--data_dir", "x")
    # a misspelt generated dataset is named as such, not taken for one that needs --data_dir
    with pytest.raises(SystemExit, match=r"^error: unknown dataset\(s\) \['LinearTo'\]\. Did you mean 'LinearToy' "
                                         r"for 'LinearTo'\? Available: "):
        sweep_main(capsys, "dry_run", "--datasets", "LinearTo", "--output_dir", str(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: unknown algorithm\(s\) \['Fsh'\]\. Did you mean 'Fish'"):
        sweep_main(capsys, "dry_run", "--datasets", "LinearToy", "--algorithms", "Fsh", "--output_dir", str(tmp_path))
    # a value only the leave-one-domain-out jobs cannot take: the message names them and the way round
    argv = ["dry_run", "--datasets", "LinearToy", "--algorithms", "Fish", "--n_hparams", "1", "--n_trials", "1",
            "--hparams", '{"meta_steps": 2}', "--output_dir", str(tmp_path / "m")]
    with pytest.raises(SystemExit, match=r"^error: LinearToy Fish test_envs=\[\d, \d\] hparams_seed=0 trial_seed=0: "
                                         r"hyperparameter 'meta_steps' = 2 is invalid: .* \(a job holding out 2 "
                                         r"environments, for leave-one-domain-out selection, trains on 1 domains; "
                                         r"--selection training,oracle launches only jobs holding out one\) "):
        sweep_main(capsys, *argv)
    assert sweep_main(capsys, *argv, "--selection", "training,oracle")[0] == 0
    with pytest.raises(SystemExit, match="--preset: unknown preset 'nope'; available presets: cpu_quick, paper_domainbed"):
        sweep_main(capsys, "dry_run", "--preset", "nope", "--output_dir", str(tmp_path))
    with pytest.raises(SystemExit, match="--data_dir is required"):
        sweep_main(capsys, "dry_run", "--datasets", "PACS", "--output_dir", str(tmp_path))
    with pytest.raises(SystemExit, match="--data_dir is required"):
        sweep_main(capsys, "dry_run", "--datasets", "LinearToy", "PACS", "--output_dir", str(tmp_path))
    # The plugin's datasets generate their data: no --data_dir needed.
    status, out, _ = sweep_main(capsys, "dry_run", "--datasets", "LinearToy", "CdSprites5", "--algorithms", "ERM",
                                "--n_hparams", "1", "--n_trials", "1", "--output_dir", str(tmp_path / "g"))
    assert status == 0 and "--data_dir unused-generated-datasets" in out
    # a separate process: the command line's own error path
    proc = run_sweep("status", "--output_dir", str(tmp_path / "none"))
    assert proc.returncode != 0 and "has no sweep_manifest.json; give the sweep's options" in proc.stderr


def test_a_file_in_place_of_the_sweep_directory_is_refused_before_anything_is_written(domainbed, tmp_path, capsys):
    blocking = tmp_path / "notes.txt"
    blocking.write_text("kept")
    for output_dir in (blocking, blocking / "sweep"):
        for command in ("launch", "dry_run", "status"):
            with pytest.raises(SystemExit, match=f"{blocking} is a file, not a directory; pass the sweep's directory"):
                sweep_main(capsys, command, "--preset", "cpu_quick", "--output_dir", str(output_dir))
        with pytest.raises(SystemExit, match=f"{blocking} is a file, not a directory"):
            sweep_main(capsys, "status", "--output_dir", str(output_dir))
    assert blocking.read_text() == "kept"


def test_an_unwritable_sweep_or_report_directory_is_an_error_with_the_fix(domainbed, tmp_path, capsys, monkeypatch):
    from domainbed_fish import sweep

    real_access = os.access
    monkeypatch.setattr(sweep.os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    with pytest.raises(SystemExit, match=rf"^error: --output_dir {tmp_path / 'a' / 'b'}: {tmp_path} cannot be written "
                                         r"to \(permissions or a read-only file system\); pass a directory you can "
                                         r"write to\. Nothing was launched\.$"):
        sweep_main(capsys, "launch", "--preset", "cpu_quick", "--output_dir", str(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()
    monkeypatch.undo()
    _write_runs(tmp_path / "sweep", {"run": [_record("Debug28", "ERM", [0], 0, [(0.5, 0.5)] * 3)]})
    (tmp_path / "taken").write_text("kept")
    with pytest.raises(SystemExit, match=rf"^error: cannot write the report to {tmp_path / 'taken'}: File exists "
                                         r".*; pass --report_dir with a directory you can write to$"):
        sweep_main(capsys, "report", "--input_dir", str(tmp_path / "sweep"), "--report_dir", str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "kept"


@requires_domainbed
def test_empty_ranges_repeated_names_and_bad_worker_counts(domainbed, tmp_path, capsys, monkeypatch):
    argv = ["--datasets", "LinearToy", "--algorithms", "ERM", "--n_hparams", "1", "--n_trials", "1",
            "--selection", "training", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^error: --n_hparams_from 5 --n_hparams 2 selects no hyperparameter seed: "
                                         r"the seeds are n_hparams_from … n_hparams − 1"):
        sweep_main(capsys, "dry_run", *argv, "--n_hparams_from", "5", "--n_hparams", "2")
    with pytest.raises(SystemExit, match=r"^error: --n_hparams_from 2 --n_hparams 2 selects no hyperparameter seed"):
        sweep_main(capsys, "dry_run", *argv, "--n_hparams_from", "2", "--n_hparams", "2")  # the empty range's edge
    # seeds 2 and 3, each a job per test environment (LinearToy: 3)
    _, text, _ = sweep_main(capsys, "dry_run", *argv, "--n_hparams_from", "2", "--n_hparams", "4")
    assert "Estimate: 1 algorithms × test env sets [3 (LinearToy)] × 2 hparams × 1 trials = 6 jobs" in text
    assert sorted(set(re.findall(r"hparams_seed=(\d+)", text))) == ["2", "3"]
    with pytest.raises(SystemExit, match=r"^error: --n_trials 0: at least 1 trial is needed$"):
        sweep_main(capsys, "dry_run", *argv, "--n_trials", "0")
    # options DomainBed's train script would misread or fail on in every job
    for option, message in [
        (["--steps", "0"], r"--steps 0: DomainBed's train script would read 0 as the dataset's default; pass --steps 1 "
                           r"or more, or leave it out for the dataset's default"),
        (["--steps", "-5"], r"--steps -5: DomainBed's train script would read a negative value as no training, and "
                            r"mark the job done; pass --steps 1 or more"),
        (["--checkpoint_freq", "0"], r"--checkpoint_freq 0: DomainBed's train script would read 0 as the dataset's "
                                     r"default; pass --checkpoint_freq 1 or more"),
        (["--checkpoint_freq", "-1"], r"--checkpoint_freq -1: DomainBed's train script would read a negative value "
                                      r"as every step; pass --checkpoint_freq 1 or more"),
        (["--holdout_fraction", "1.5"], r"--holdout_fraction 1.5: it is the share of each environment held out for "
                                        r"validation, so it must lie strictly between 0 and 1"),
        (["--holdout_fraction", "0"], r"--holdout_fraction 0.0: it is the share"),
        (["--holdout_fraction", "1"], r"--holdout_fraction 1.0: it is the share"),
        (["--task", "dg"], r"--task 'dg': DomainBed's train script knows domain_generalization, domain_adaptation$"),
        (["--hparams", '{"batch_size": "8"}'], r"--hparams: batch_size '8' is not a whole number >= 1, .* Pass it as a "
                                               r"JSON integer, e.g. --hparams '\{\"batch_size\": 32\}' .* Nothing "
                                               r"was launched.$"),
        (["--hparams", '{"batch_size": 0}'], r"--hparams: batch_size 0 is not a whole number >= 1"),
    ]:
        with pytest.raises(SystemExit, match=r"^error: " + message):
            sweep_main(capsys, "dry_run", *argv, *option)
    _, text, _ = sweep_main(capsys, "dry_run", *argv, "--steps", "1", "--checkpoint_freq", "1", "--holdout_fraction",
                            "0.5", "--task", "domain_adaptation", "--hparams", '{"batch_size": 1}')  # the edges
    assert "Would launch 3 jobs." in text
    assert not (tmp_path / "out").exists()
    # a name given twice is one set of jobs (DomainBed's sweep would count and make them twice)
    _, text, _ = sweep_main(capsys, "dry_run", *argv, "--datasets", "LinearToy", "LinearToy", "--algorithms", "ERM", "ERM")
    assert "Would launch 3 jobs." in text
    for workers, env, message in [("0", None, r"--workers 0: local_parallel needs at least 1 worker"),
                                  ("-1", None, r"--workers -1: local_parallel needs at least 1 worker"),
                                  (None, "abc", r"environment variable DOMAINBED_FISH_WORKERS='abc' must be an "
                                                r"integer; unset it for one worker per core"),
                                  (None, "0", r"DOMAINBED_FISH_WORKERS 0: local_parallel needs at least 1 worker")]:
        if env is not None:
            monkeypatch.setenv("DOMAINBED_FISH_WORKERS", env)
        with pytest.raises(SystemExit, match=rf"^error: {message}.* Nothing was launched\.$"):
            sweep_main(capsys, "launch", *argv, "--skip_confirmation", *(["--workers", workers] if workers else []))
        assert not (tmp_path / "out").exists()  # no manifest, no job directory


def test_a_launch_nobody_can_confirm_stops_with_the_fix(domainbed, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # closed standard input: a batch job, a pipe
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit, match="standard input is closed; pass --skip_confirmation"):
        sweep_main(capsys, "launch", "--preset", "cpu_quick", "--output_dir", str(out))
    assert not out.exists()


def test_report_of_a_directory_without_runs_names_the_problem(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    for name, problem in [("missing", "does not exist"), ("a_file", "is a file"),
                          ("empty", "no DomainBed runs in .*none of its subdirectories has a results.jsonl")]:
        with pytest.raises(SystemExit, match=f"{problem}.*pass the sweep's --output_dir"):
            sweep_main(capsys, "report", "--input_dir", str(tmp_path / name), "--no_plots")
    assert not (tmp_path / "empty" / "report").exists()


@requires_domainbed
def test_presets_dry_run(domainbed, tmp_path, capsys):
    _, out, _ = sweep_main(capsys, "dry_run", "--preset", "paper_domainbed", "--data_dir", str(tmp_path),
                           "--output_dir", str(tmp_path / "p"))
    # 4 algorithms, 20 hparams, 3 trials; test-env sets: VLCS/PACS/OfficeHome/TerraIncognita
    # 4+6 = 10 each, DomainNet and RotatedMNIST 6+15 = 21, ColoredMNIST 3+3 = 6.
    assert "21120 jobs: 0 done" in out
    assert '\'{"freeze_bn": true, "resnet50_augmix": false}\'' in out
    _, out, _ = sweep_main(capsys, "dry_run", "--preset", "cpu_quick", "--output_dir", str(tmp_path / "q"))
    assert "48 jobs: 0 done" in out
    assert "Estimate: 2 algorithms × test env sets [6 (Debug28)] × 2 hparams × 2 trials = 48 jobs" in out


def test_a_preset_with_an_unknown_key_is_refused(tmp_path, monkeypatch):
    from domainbed_fish import presets

    (tmp_path / "typo.json").write_text('{"algorithms": ["ERM"], "n_trial": 3}')
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"unknown keys \['n_trial'\]"):
        presets.load("typo")
    with pytest.raises(ValueError, match="unknown preset 'cpu_quick'; available presets: typo"):
        presets.load("cpu_quick")


@requires_domainbed
def test_the_manifest_merges_launches_and_names_domainbeds_commit(domainbed, tmp_path, monkeypatch):
    """A second launch (say, one more algorithm) adds its jobs to the manifest's list: the
    first launch's jobs stay listed, so status and report still say what they miss."""
    from domainbed_fish.manifest import read_manifest, write_manifest

    monkeypatch.setenv("DOMAINBED_COMMIT", "0123abc")
    job = {"dataset": "Debug28", "test_envs": [0], "hparams_seed": 0, "trial_seed": 0}
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, {"a": {**job, "algorithm": "ERM"}}, {"algorithms": ["ERM"]}, argv=["first"])
    write_manifest(tmp_path, {"b": {**job, "algorithm": "Fish"}}, {"algorithms": ["Fish"]}, argv=["second"])
    manifest = read_manifest(tmp_path)
    assert {name: a["algorithm"] for name, a in manifest["jobs"].items()} == {"a": "ERM", "b": "Fish"}
    assert [(launch["argv"], launch["n_jobs"]) for launch in manifest["launches"]] == [(["first"], 1), (["second"], 1)]
    assert manifest["domainbed"]["commit"] == "0123abc"


@requires_domainbed
def test_reproduce_is_a_sweep_command_everywhere(domainbed, tmp_path, capsys):
    """domainbed-fish-sweep reproduce and python -m domainbed_fish.sweep reproduce failed with
    "invalid choice: 'reproduce'" (only python -m sweeps knew it), and no --help listed it."""
    from domainbed_fish.sweep import build_parser

    status, out, _ = sweep_main(capsys, "reproduce", "--quick", "--dry_run", "--output_dir", str(tmp_path / "r"))
    assert status == 0 and out.startswith("preset quick: 11 jobs, 0 already done, output in ")
    assert out.rstrip().endswith("to do   CdSprites5-ERM-seed0-bd456363")
    assert "reproduce the paper's own experiments: python -m domainbed_fish.reproduction" in \
        " ".join(build_parser().format_help().split())
    with pytest.raises(SystemExit):
        sweep_main(capsys, "reproduc")
    assert "'reproduce')" in capsys.readouterr().err  # the invalid-choice message lists it


@requires_domainbed
@pytest.mark.parametrize(("content", "problem"), [
    ('{"jobs": ', "not JSON: Expecting value: line 1 column 10 (char 9)"),
    ("[1, 2]", 'not an object with "jobs" (name: train arguments) and "launches"'),
    ('{"jobs": {"x": 5}, "launches": []}', 'not an object with "jobs" (name: train arguments) and "launches"'),
])
def test_a_damaged_manifest_is_named_with_the_fix(domainbed, tmp_path, capsys, content, problem):
    """status, report and launch ended in a JSONDecodeError, TypeError or AttributeError."""
    manifest = tmp_path / "out" / "sweep_manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(content)
    expected = (f"error: {manifest} is not a sweep manifest ({problem}). The job directories do not depend on "
                f"it: move it aside (mv {manifest} {manifest}.bad) and run launch again with the sweep's options, "
                "which writes a new one; status and delete_incomplete also work from the options (--preset or "
                "--datasets ...).")
    for argv in (["status", "--output_dir", str(manifest.parent)],
                 ["report", "--input_dir", str(manifest.parent), "--no_plots"],
                 ["launch", "--datasets", "LinearToy", "--algorithms", "ERM", "--n_hparams", "1", "--n_trials", "1",
                  "--selection", "training", "--steps", "1", "--output_dir", str(manifest.parent),
                  "--skip_confirmation"]):
        if argv[0] == "report":  # a job directory, so that the report gets as far as the manifest
            (manifest.parent / "job").mkdir(exist_ok=True)
            (manifest.parent / "job" / "results.jsonl").write_text(json.dumps(_record("LinearToy", "ERM", [2], 0, [(1.0, 1.0)] * 3)) + "\n")
        with pytest.raises(SystemExit) as exit_info:
            sweep_main(capsys, *argv)
        assert str(exit_info.value) == expected
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["job", "sweep_manifest.json"]  # nothing launched
    assert manifest.read_text() == content  # nor rewritten


# ----------------------------------------------------------------------------- locks


def _hold_lock(job) -> subprocess.Popen:
    """A separate process holding ``job``'s lock (for 60 s at most), once it has it."""
    holder = subprocess.Popen(
        [PYTHON, "-c", "import time; from domainbed_fish.lockfile import JobLock; "
         f"assert JobLock({str(job)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=sweep_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_job_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    job = tmp_path / "job"
    holder = _hold_lock(job)
    try:
        assert is_locked(job)
        assert holder_pid(job) == holder.pid
        assert not JobLock(job).acquire(patience_s=0.2)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not is_locked(job)
    lock = JobLock(job)
    assert lock.acquire(patience_s=0)
    assert holder_pid(job) == os.getpid()
    lock.release()


def test_job_lock_survives_its_directory_being_deleted_while_it_is_taken(tmp_path, monkeypatch):
    """``delete_incomplete`` may remove the job's directory between the lock's mkdir and its
    open: the lock makes the directory again and takes it."""
    import domainbed_fish.lockfile as lockfile

    job, real_open, calls = tmp_path / "job", os.open, []

    def open_after_a_delete(path, *args):
        calls.append(path)
        if len(calls) == 1:
            (tmp_path / "job").rmdir()
        return real_open(path, *args)

    monkeypatch.setattr(lockfile.os, "open", open_after_a_delete)
    lock = JobLock(job)
    assert lock.acquire(patience_s=0)
    assert len(calls) == 2 and holder_pid(job) == os.getpid()
    lock.release()


def test_job_lock_waits_its_patience_and_is_released_by_its_context(tmp_path):
    """``acquire`` retries until ``patience_s`` (a status probe must not make a launch skip a
    job); the context manager gives the lock back, also on an exception."""
    import threading

    from domainbed_fish.lockfile import LOCK_NAME

    job = tmp_path / "job"
    holder = _hold_lock(job)
    threading.Timer(0.3, holder.kill).start()
    lock = JobLock(job)
    try:
        assert lock.acquire(patience_s=30)
    finally:
        holder.kill()
        holder.wait()
    lock.release()
    (job / LOCK_NAME).write_text("4194304999\n")  # a longer pid than ours was written last
    with pytest.raises(ValueError), JobLock(job):
        assert holder_pid(job) == os.getpid() and is_locked(job)
        raise ValueError
    assert not is_locked(job)


def test_job_lock_taken_on_a_deleted_directorys_file_is_taken_again(tmp_path, monkeypatch):
    """``delete_incomplete`` may remove the directory between the lock's open and its flock:
    the lock then holds an orphaned file, and must make the directory again and lock that."""
    import shutil

    import domainbed_fish.lockfile as lockfile

    job, real_flock, calls = tmp_path / "job", lockfile.fcntl.flock, []

    def flock_after_a_delete(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            shutil.rmtree(job)
        return real_flock(fd, operation)

    monkeypatch.setattr(lockfile.fcntl, "flock", flock_after_a_delete)
    lock = JobLock(job)
    assert lock.acquire(patience_s=0)
    monkeypatch.undo()
    assert len(calls) == 2 and holder_pid(job) == os.getpid() and is_locked(job)
    lock.release()


@requires_domainbed
def test_run_job_skips_a_done_or_locked_job_and_clears_an_interrupted_one(domainbed, tmp_path, capsys, monkeypatch):
    """DomainBed's train script (stubbed) runs with the job's arguments, under the lock, in a
    directory holding only the lock file; a done job, or one another process holds, is left as
    it is with status 0; the lock is given back also when training raises."""
    import runpy

    from domainbed_fish import run_job
    from domainbed_fish.lockfile import LOCK_NAME

    seen = []

    def train(name, run_name, alter_sys):
        seen.append((name, list(sys.argv), sorted(p.name for p in job.iterdir()), is_locked(job)))
        if "--fail" in sys.argv:
            raise RuntimeError("training failed")

    monkeypatch.setattr(runpy, "run_module", train)
    job = tmp_path / "job"
    (job / "checkpoints").mkdir(parents=True)
    (job / "results.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kept").write_text("kept")
    (job / "link").symlink_to(tmp_path / "elsewhere")
    argv = ["--dataset", "Debug28", "--output_dir", str(job)]
    assert run_job.main(argv) == 0
    assert seen == [("domainbed.scripts.train", ["domainbed.scripts.train", *argv], [LOCK_NAME], True)]
    assert (tmp_path / "elsewhere" / "kept").read_text() == "kept"  # a link is removed, not followed
    assert not is_locked(job)

    with pytest.raises(RuntimeError, match="training failed"):
        run_job.main([*argv, "--fail"])
    assert not is_locked(job)

    seen.clear()
    (job / "results.jsonl").write_text('{"step": 0}\n')
    holder = _hold_lock(job)
    try:
        capsys.readouterr()
        assert run_job.main(argv) == 0
        assert f"skipped, another process is training (pid {holder.pid}): {job}" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    (job / "done").write_text("done")
    assert run_job.main(argv) == 0
    assert f"skipped, already done: {job}" in capsys.readouterr().out
    assert seen == [] and sorted(p.name for p in job.iterdir()) == [LOCK_NAME, "done", "results.jsonl"]


def test_clear_job_dir_keeps_the_lock_file_and_the_directory(tmp_path):
    from domainbed_fish.lockfile import LOCK_NAME
    from domainbed_fish.run_job import clear_job_dir

    job = tmp_path / "job"
    lock = JobLock(job)
    assert lock.acquire(patience_s=0)
    (job / "sub" / "deeper").mkdir(parents=True)
    (job / "err.txt").write_text("x")
    clear_job_dir(job)
    assert [p.name for p in job.iterdir()] == [LOCK_NAME]
    assert not JobLock(job).acquire(patience_s=0)  # still the file we lock: no one else takes the job
    lock.release()


def _damage_lock(job: Path, damage: str) -> Path:
    """``job``'s lock path made into ``damage``; returns the lock path."""
    from domainbed_fish.lockfile import LOCK_NAME

    job.mkdir(parents=True, exist_ok=True)
    lock = job / LOCK_NAME
    if damage == "directory":
        (lock / "inside").mkdir(parents=True)
    elif damage == "dangling link":
        lock.symlink_to(job.parent / "elsewhere" / "lock")  # into a missing directory
    elif damage == "dangling link to a free name":
        lock.symlink_to(job.parent / "outside.lock")
    else:
        os.mkfifo(lock)
    return lock


@pytest.mark.parametrize(("damage", "what", "remove"), [
    ("directory", "a directory", "rm -r"), ("dangling link", "a dangling symbolic link", "rm"),
    ("dangling link to a free name", "a dangling symbolic link", "rm"), ("fifo", "not a regular file", "rm")])
def test_a_lock_path_that_is_no_file_is_an_error_naming_it_and_the_fix(tmp_path, damage, what, remove):
    """A damaged job directory: acquire names the path, what is there and how to remove it,
    instead of a raw IsADirectoryError, a loop that never ends (a link into a missing
    directory) or a lock file made outside the job directory; no process holds such a lock."""
    from domainbed_fish.lockfile import LockFileError

    job = tmp_path / "job"
    lock = _damage_lock(job, damage)

    def hung(*_):
        raise TimeoutError("acquire did not return")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(LockFileError) as error:
            JobLock(job).acquire(patience_s=0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(error.value) == (
        f"the job's lock file {lock} is {what}, which no process can lock (a damaged job directory); "
        f"remove it ({remove} '{lock}') and run the same command again")
    assert not is_locked(job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]  # nothing made outside the job


def test_a_lock_file_that_cannot_be_opened_is_an_error_with_the_fix(tmp_path, monkeypatch):
    """As root no permission stops the open, so it is stood in for."""
    import domainbed_fish.lockfile as lockfile

    def denied(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(lockfile.os, "open", denied)
    job = tmp_path / "job"
    with pytest.raises(lockfile.LockFileError) as error:
        JobLock(job).acquire(patience_s=0)
    assert str(error.value) == (
        f"cannot open the job's lock file {job / lockfile.LOCK_NAME}: Permission denied; run the command as a "
        f"user who may write to {job} (or fix its permissions), then run it again")


@requires_domainbed
def test_run_job_with_a_damaged_lock_says_what_to_remove(domainbed, tmp_path, capsys):
    from domainbed_fish import run_job

    job = tmp_path / "job"
    lock = _damage_lock(job, "directory")
    (job / "results.jsonl").write_text('{"step": 0}\n')
    assert run_job.main(["--dataset", "Debug28", "--output_dir", str(job)]) == 2
    assert capsys.readouterr().err == (
        f"error: the job's lock file {lock} is a directory, which no process can lock (a damaged job "
        f"directory); remove it (rm -r '{lock}') and run the same command again\n")
    assert (job / "results.jsonl").read_text() == '{"step": 0}\n' and (lock / "inside").is_dir()


def test_run_job_help_and_missing_output_dir_say_what_it_takes(tmp_path):
    helped = subprocess.run([PYTHON, "-m", "domainbed_fish.run_job", "--help"], capture_output=True, text=True,
                            env=sweep_env(), cwd=tmp_path, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "job lock" in helped.stdout and "domainbed/scripts/train.py" in helped.stdout
    assert not list(tmp_path.iterdir())  # --help trains nothing
    missing = subprocess.run([PYTHON, "-m", "domainbed_fish.run_job", "--dataset", "CdSprites5"],
                             capture_output=True, text=True, env=sweep_env(), cwd=tmp_path, timeout=60)
    assert missing.returncode == 2
    assert "--output_dir JOB_DIR <the other arguments of domainbed.scripts.train>" in missing.stderr


# ----------------------------------------------------------------------------- results files


def _record(dataset, algorithm, test_envs, step, accs, trial=0, hseed=0):
    rec = {"args": {"dataset": dataset, "algorithm": algorithm, "test_envs": test_envs, "trial_seed": trial,
                    "hparams_seed": hseed, "holdout_fraction": 0.2},
           "hparams": {"lr": 0.001}, "step": step}
    for i, (a_in, a_out) in enumerate(accs):
        rec[f"env{i}_in_acc"], rec[f"env{i}_out_acc"] = a_in, a_out
    return rec


def test_malformed_results_line_is_skipped_with_file_and_line(tmp_path):
    path = tmp_path / "run" / "results.jsonl"
    path.parent.mkdir()
    good = [_record("Debug28", "ERM", [0], s, [(0.5, 0.5)] * 3) for s in (0, 2)]
    text = json.dumps(good[0]) + "\n" + '{"args": {"dataset": "Deb' + "\n" + json.dumps(good[1]) + "\n"
    no_step = {k: v for k, v in good[1].items() if k != "step"}
    path.write_text(text + json.dumps(no_step) + "\nnull\n")
    with pytest.warns(MalformedResultsWarning) as caught:
        records = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 2]
    assert [str(w.message).split(" (")[0] for w in caught] == [
        f"{path}:2: malformed results line skipped", f"{path}:4: results line without 'args' and 'step' skipped",
        f"{path}:5: results line without 'args' and 'step' skipped"]


@requires_domainbed
def test_report_survives_a_truncated_line_that_breaks_domainbed(domainbed, tmp_path):
    from domainbed_fish.locate import import_domainbed
    from domainbed_fish.report import write_report

    run = tmp_path / "sweep" / "job"
    run.mkdir(parents=True)
    lines = [_record("Debug28", "ERM", [0], s, [(0.25, 0.5), (0.5, 0.5), (0.75, 0.5)]) for s in (0, 2)]
    (run / "results.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1])[:40])  # killed mid-write
    (run / "done").write_text("done")
    load_records = import_domainbed("lib.reporting").load_records
    with pytest.raises(json.JSONDecodeError):  # DomainBed's own reader stops here
        load_records.__wrapped__(str(tmp_path / "sweep"))
    with pytest.warns(MalformedResultsWarning, match=r"results.jsonl:2"):
        result = write_report(tmp_path / "sweep", selection=["oracle"], plots=False, progress=False)
    (table,) = result.tables
    assert table.cells["ERM"][0].trials == {0: 0.25}
    # and so does DomainBed's reader as the plugin registers it (what collect_results calls)
    with pytest.warns(MalformedResultsWarning, match=r"results.jsonl:2"):
        records = load_records(str(tmp_path / "sweep"))
    assert [r["step"] for r in records] == [0]


def _write_runs(sweep: Path, runs: dict[str, list[dict]]) -> None:
    for name, records in runs.items():
        (sweep / name).mkdir(parents=True)
        (sweep / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (sweep / name / "done").write_text("done")


@requires_domainbed
def test_a_job_without_done_takes_no_part_in_selection_unless_asked(domainbed, tmp_path):
    """A killed job's records (no ``done``) would win the oracle here: the report leaves them out
    and says so, unless --include_incomplete (DomainBed's collect_results reads every job)."""
    from domainbed_fish.report import write_report

    accs = [(0.2, 0.2), (0.5, 0.5), (0.5, 0.5)]
    _write_runs(tmp_path / "sweep", {"finished": [_record("Debug28", "ERM", [0], 0, accs)]})
    killed = tmp_path / "sweep" / "killed"
    killed.mkdir()
    (killed / "results.jsonl").write_text(json.dumps(_record("Debug28", "ERM", [0], 0, [(0.9, 0.9), *accs[1:]],
                                                             hseed=1)) + "\n")
    training = tmp_path / "sweep" / "training"
    training.mkdir()
    (training / "results.jsonl").write_text(json.dumps(_record("Debug28", "ERM", [0], 0, accs, hseed=2)) + "\n")
    with JobLock(training):  # a live job, not a killed one: the report tells them apart
        result = write_report(tmp_path / "sweep", selection=["oracle"], plots=False, progress=False)
    assert result.tables[0].cells["ERM"][0].trials == {0: 0.2}
    assert result.missing[0].startswith("2 job directories without 'done' (1 incomplete, 1 running; ")
    result = write_report(tmp_path / "sweep", selection=["oracle"], include_incomplete=True, plots=False,
                          progress=False)
    assert result.tables[0].cells["ERM"][0].trials == {0: 0.9}


@requires_domainbed
def test_each_selection_method_picks_its_own_run_and_checkpoint(domainbed, tmp_path):
    """Records built so that the three methods disagree, each expected value read off by hand:
    training-domain validation takes the best mean of the training domains' out-splits
    (hparams 0, step 0), the oracle the best last checkpoint on the test domain's out-split
    (hparams 1, step 1), leave-one-domain-out the best mean of the held-out-pair accuracies
    (hparams 1, step 0)."""
    from domainbed_fish.report import write_report

    def single(h, step, test_in, test_out, train_out):  # test env 0; env k: (in, out)
        return _record("Debug28", "ERM", [0], step, [(test_in, test_out), (0.5, train_out), (0.5, train_out)], hseed=h)

    def pair(h, step, other, val_in):  # holds out 0 and `other`; LOO reads env{other}_in_acc
        accs = [(0.5, 0.5)] * 3
        accs[other] = (val_in, 0.5)
        return _record("Debug28", "ERM", [0, other], step, accs, hseed=h)

    loo_val = {(1, 0): 0.95}  # every other (hparams, step): 0.1
    runs = {
        "h0": [single(0, 0, 0.10, 0.90, 0.90), single(0, 1, 0.20, 0.30, 0.50)],
        "h1": [single(1, 0, 0.30, 0.10, 0.40), single(1, 1, 0.40, 0.80, 0.40)],
        **{f"h{h}pair{o}": [pair(h, step, o, loo_val.get((h, step), 0.1)) for step in (0, 1)]
           for h in (0, 1) for o in (1, 2)},
    }
    _write_runs(tmp_path / "sweep", runs)
    result = write_report(tmp_path / "sweep", plots=False, progress=False)
    chosen = {t.selection: t.cells["ERM"][0].trials for t in result.tables}
    assert chosen == {"training": {0: 0.10}, "oracle": {0: 0.40}, "loo": {0: 0.30}}
    picked = {s.selection: (s.hparams_seed, s.val_acc) for s in result.selected if s.test_env == 0}
    assert picked == {"training": (0, 0.90), "oracle": (1, 0.80), "loo": (1, 0.95)}


@requires_domainbed
def test_a_cell_short_of_trials_is_listed_with_the_trials_its_avg_rests_on(domainbed, tmp_path):
    from domainbed_fish.report import write_report

    accs = {0: [(0.2, 0.2), (0.5, 0.5), (0.5, 0.5)], 1: [(0.5, 0.5), (0.6, 0.6), (0.5, 0.5)],
            2: [(0.5, 0.5), (0.5, 0.5), (0.7, 0.7)]}
    runs = {f"env{e}trial{t}": [_record("Debug28", "ERM", [e], 0, accs[e], trial=t)]
            for e, t in [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]}  # trial 1 holding out env 1 never ran
    _write_runs(tmp_path / "sweep", runs)
    result = write_report(tmp_path / "sweep", selection=["oracle"], plots=False, progress=False)
    (table,) = result.tables
    assert table.avg["ERM"].trials == {0: pytest.approx((0.2 + 0.6 + 0.7) / 3)}
    assert result.missing == [
        "Debug28, test-domain validation (oracle), ERM: 1 lacks trial [1]; its Avg is over trials [0] only"]


@requires_domainbed
def test_an_environment_no_job_reported_is_an_empty_column_not_a_shorter_average(domainbed, tmp_path):
    """DomainBed's sweep holds out every environment, and its collect_results shows an X where
    one has no result; an Avg over the other environments alone would pass for the dataset's.
    A sweep restricted with --test_envs (in its manifest) reports only the environments it holds out."""
    from domainbed_fish.manifest import write_manifest
    from domainbed_fish.report import write_report

    accs = [(0.6, 0.6), (0.7, 0.7), (0.8, 0.8)]  # LinearToy: domain1, domain2, heldout
    runs = {f"env{e}": [_record("LinearToy", "ERM", [e], 0, accs)] for e in (1, 2)}  # nothing holds out domain1
    _write_runs(tmp_path / "sweep", runs)
    result = write_report(tmp_path / "sweep", selection=["oracle"], plots=False, progress=False)
    (table,) = result.tables
    assert table.env_names == ["domain1", "domain2", "heldout"]
    assert table.cells["ERM"][0].empty and table.avg["ERM"].empty
    assert [t.text() for t in table.cells["ERM"].values()] == ["—", "70.0 ± 0.0", "80.0 ± 0.0"]
    assert result.missing == ["LinearToy, test-domain validation (oracle): no result for ERM on domain1"]

    jobs = {name: {"dataset": "LinearToy", "algorithm": "ERM", "test_envs": records[0]["args"]["test_envs"],
                   "hparams_seed": 0, "trial_seed": 0} for name, records in runs.items()}
    write_manifest(tmp_path / "sweep", jobs, {"test_envs": [1, 2]})
    result = write_report(tmp_path / "sweep", selection=["oracle"], plots=False, progress=False)
    (table,) = result.tables
    assert table.env_names == ["domain2", "heldout"] and result.missing == []
    assert table.avg["ERM"].trials == {0: pytest.approx(0.75)}
    # a dataset the manifest does not list (DomainBed's own sweep in the same directory): all its environments
    _write_runs(tmp_path / "sweep", {"debug": [_record("Debug28", "ERM", [0], 0, [(0.5, 0.5)] * 3)]})
    result = write_report(tmp_path / "sweep", selection=["oracle"], plots=False, progress=False)
    assert {t.dataset: t.env_ids for t in result.tables} == {"LinearToy": [1, 2], "Debug28": [0, 1, 2]}


@requires_domainbed
def test_the_columns_of_a_restricted_loo_sweep_are_the_environments_it_holds_out(domainbed, tmp_path):
    """``--selection loo --test_envs 1`` also launches the pairs {0, 1} and {1, 2}: validation jobs,
    not columns; environment 0 as a column would be an empty cell reported missing."""
    from domainbed_fish.manifest import write_manifest
    from domainbed_fish.report import expected_columns, write_report

    jobs = {f"job{i}": {"dataset": "LinearToy", "algorithm": "ERM", "test_envs": envs, "hparams_seed": 0,
                        "trial_seed": 0}
            for i, envs in enumerate(required_test_envs(3, ["loo"], test_envs=[1]))}
    write_manifest(tmp_path, jobs, {"test_envs": [1], "selection": ["loo"]})
    assert expected_columns(tmp_path, ["LinearToy", "Debug28"]) == {"LinearToy": [1], "Debug28": [0, 1, 2]}
    _write_runs(tmp_path, {name: [_record("LinearToy", "ERM", a["test_envs"], 0, [(0.6, 0.6), (0.7, 0.7), (0.8, 0.8)])]
                           for name, a in jobs.items()})
    result = write_report(tmp_path, selection=["loo"], plots=False, progress=False)
    assert [(t.env_names, t.avg["ERM"].trials) for t in result.tables] == [(["domain2"], {0: pytest.approx(0.7)})]
    assert result.missing == []


@requires_domainbed
def test_report_numbers_are_domainbeds_collect_results_on_the_same_records(domainbed, tmp_path):
    """Two trials, two hyperparameter samples, every job leave-one-domain-out needs, seeded
    random accuracies: under each selection method every cell (mean ± SE over trials), every
    Avg (DomainBed's "Averages" table: the per-trial mean over environments, then mean ± SE
    over trials) and Δ ERM is what DomainBed's collect_results computes, in the Markdown, the
    LaTeX and the CSV alike; the selected-hyperparameters table shows the one that varies."""
    import csv
    import random

    from domainbed import model_selection
    from domainbed.lib import reporting
    from domainbed.lib.query import Q
    from domainbed.scripts.collect_results import format_mean

    from domainbed_fish.report import write_report
    from domainbed_fish.selection import SELECTION_METHODS

    rng = random.Random(0)
    runs = {}
    for algorithm in ("ERM", "Fish"):
        for trial in range(2):
            for hseed in range(2):
                for envs in required_test_envs(3, ["loo"]):
                    records = [_record("Debug28", algorithm, envs, step, [(rng.random(), rng.random())] * 3,
                                       trial=trial, hseed=hseed) for step in (0, 2)]
                    for r in records:
                        r["hparams"] = {"lr": (1e-3, 1e-4)[hseed], "batch_size": 8}
                    runs[f"{algorithm}-t{trial}-h{hseed}-{'-'.join(map(str, envs))}"] = records
    _write_runs(tmp_path / "sweep", runs)
    result = write_report(tmp_path / "sweep", tmp_path / "report", plots=False, progress=False)
    assert [t.selection for t in result.tables] == ["training", "loo", "oracle"] and result.missing == []
    with open(tmp_path / "report" / "results.csv", newline="") as f:
        csv_rows = {(r["selection"], r["algorithm"], r["environment"]): r for r in csv.DictReader(f)}
    tex = (tmp_path / "report" / "report.tex").read_text()

    records = Q([r for rs in runs.values() for r in rs])
    for table in result.tables:
        method = getattr(model_selection, SELECTION_METHODS[table.selection])
        groups = Q([{**g, "sweep_acc": method.sweep_acc(g["records"])}
                    for g in reporting.get_grouped_records(records)]).filter(lambda g: g["sweep_acc"] is not None)
        avg, md_cells, tex_cells = {}, {}, {}
        for algorithm in ("ERM", "Fish"):
            mine = groups.filter_equals("algorithm", algorithm)
            md_cells[algorithm], tex_cells[algorithm] = [], []
            for env, name in enumerate(["0", "1", "2", "Avg"]):
                accs = (mine.filter_equals("test_env", env).select("sweep_acc") if name != "Avg" else
                        mine.group("trial_seed").map(lambda _, g: g.select("sweep_acc").mean()))
                mean, se, text = format_mean(accs, latex=False)
                cell = table.cells[algorithm][env] if name != "Avg" else table.avg[algorithm]
                assert cell.stats() == pytest.approx((mean, se)), (table.selection, algorithm, name)
                assert se > 0.1  # trials that differ: the SE is not 0, so a wrong SE shows
                row = csv_rows[table.selection, algorithm, name]
                assert (float(row["mean"]), float(row["se"]), int(row["n_trials"])) == pytest.approx(
                    (mean, se, 2), abs=1e-4)
                md_cells[algorithm].append(text.replace("+/-", "±"))
                tex_cells[algorithm].append(format_mean(accs, latex=True)[2])
            avg[algorithm] = mean
        delta = avg["Fish"] - avg["ERM"]
        assert table.delta("Fish") == pytest.approx(delta)
        assert float(csv_rows[table.selection, "Fish", "Avg"]["delta_ERM"]) == pytest.approx(delta, abs=1e-4)
        assert f"| Fish | {' | '.join(md_cells['Fish'])} | {delta:+.1f} |" in result.markdown
        assert f"| ERM | {' | '.join(md_cells['ERM'])} | +0.0 |" in result.markdown
        assert f"Fish & {' & '.join(tex_cells['Fish'])} & {delta:+.1f} \\\\" in tex
    selected = result.markdown.split("## Selected hyperparameters")[1]
    assert "lr=0.001" in selected and "lr=0.0001" in selected and "batch_size" not in selected


@requires_domainbed
def test_domainbed_collect_results_survives_a_killed_jobs_truncated_line(tmp_path):
    sweep = tmp_path / "sweep"
    rows = {"done": [(0.25, 0.5), (0.5, 0.6), (0.75, 0.7)], "killed": [(0.3, 0.5), (0.6, 0.65), (0.8, 0.75)]}
    for seed, (name, accs) in enumerate(rows.items()):
        run = sweep / name
        run.mkdir(parents=True)
        lines = [json.dumps(_record("Debug28", "ERM", [0], s, accs, trial=seed)) for s in (0, 2)]
        text = "\n".join(lines) + "\n"
        if name == "killed":
            text = lines[0] + "\n" + lines[1][:40]  # killed while writing its second line
        else:
            (run / "done").write_text("done")
        (run / "results.jsonl").write_text(text)
    proc = subprocess.run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir", str(sweep)],
                          capture_output=True, text=True, timeout=600, env=sweep_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"killed/results\.jsonl:2: malformed results line skipped", proc.stderr), proc.stderr
    assert "Total records: 3" in proc.stdout  # as DomainBed reads them: incomplete jobs included


# ----------------------------------------------------------------------------- end to end


def _done_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if (p / "done").exists())


@requires_domainbed
def test_two_concurrent_launches_never_train_a_job_twice(shared_sweep):
    out, _, outputs = shared_sweep
    dirs = _done_dirs(out)
    assert len(dirs) == 6
    trained = [path for text in outputs for path in re.findall(re.escape(TRAINING) + r": (\S+)", text)]
    assert sorted(trained) == sorted(str(d) for d in dirs)  # each job trained exactly once
    for d in dirs:  # steps 0, 2, 4: a second concurrent run would have appended more lines
        assert [r["step"] for r in read_jsonl(d / "results.jsonl")] == [0, 2, 4]


@requires_domainbed
def test_sweep_status_and_manifest(shared_sweep, capsys):
    out, _, _ = shared_sweep
    _, text, _ = sweep_main(capsys, "status", "--output_dir", str(out))
    assert "6 jobs: 6 done, 0 running, 0 incomplete, 0 not launched." in text
    manifest = json.loads((out / "sweep_manifest.json").read_text())
    import torch

    import domainbed_fish

    assert manifest["plugin_version"] == domainbed_fish.__version__
    assert manifest["torch_version"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["domainbed"]["sources_sha256"])
    assert "commit" in manifest["domainbed"]
    assert len(manifest["jobs"]) == 6 and {p.name for p in _done_dirs(out)} == set(manifest["jobs"])
    assert {a["algorithm"] for a in manifest["jobs"].values()} == {"ERM", "Fish"}
    assert len(manifest["launches"]) == 2 and manifest["launches"][0]["argv"][:2] == ["python -m domainbed_fish.sweep", "launch"]


@requires_domainbed
def test_domainbed_collect_results_reads_the_sweep(shared_sweep):
    out, _, _ = shared_sweep
    proc = subprocess.run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir", str(out)],
                          capture_output=True, text=True, timeout=600, env=sweep_env())
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Total records: 18" in text  # 6 jobs x 3 checkpoints
    for method in ("training-domain validation set", "leave-one-domain-out cross-validation",
                   "test-domain validation set (oracle)"):
        block = text.split(f"Dataset: Debug28, model selection method: {method}")[1].split("-------")[0]
        assert re.search(r"^Fish\s+\d+\.\d \+/- \d+\.\d", block, re.M), block
        assert re.search(r"^ERM\s+\d+\.\d \+/- \d+\.\d", block, re.M), block


def _expected_training_selection(out: Path, algorithm: str) -> float:
    """Training-domain validation by hand: the checkpoint with the best mean validation
    accuracy of environments 1 and 2; its environment-0 test accuracy."""
    (run,) = [d for d in _done_dirs(out)
              if json.loads((d / "results.jsonl").read_text().splitlines()[0])["args"]["algorithm"] == algorithm
              and json.loads((d / "results.jsonl").read_text().splitlines()[0])["args"]["test_envs"] == [0]]
    records = read_jsonl(run / "results.jsonl")
    best = max(records, key=lambda r: (r["env1_out_acc"] + r["env2_out_acc"]) / 2)  # first maximum
    return best["env0_in_acc"]


@requires_domainbed
def test_report_of_the_shared_sweep(shared_sweep, tmp_path):
    from domainbed_fish.report import write_report

    out, _, _ = shared_sweep
    result = write_report(out, tmp_path / "report", progress=False)
    assert [(t.dataset, t.selection) for t in result.tables] == [
        ("Debug28", "training"), ("Debug28", "loo"), ("Debug28", "oracle")]
    for t in result.tables:
        assert t.algorithms == ["Fish", "ERM"] and t.env_ids == [0] and t.env_names == ["0"]
        for a in t.algorithms:
            assert list(t.cells[a][0].trials) == [0]
        assert t.delta("ERM") == 0.0
    training = result.tables[0]
    for a in ("Fish", "ERM"):
        assert training.cells[a][0].trials[0] == pytest.approx(_expected_training_selection(out, a))
    fish = 100 * training.cells["Fish"][0].trials[0]
    erm = 100 * training.cells["ERM"][0].trials[0]
    assert training.delta("Fish") == pytest.approx(fish - erm)
    md = result.markdown
    assert "| Algorithm | 0 | Avg | Δ ERM |" in md
    assert f"| Fish | {fish:.1f} ± 0.0 | {fish:.1f} ± 0.0 | {fish - erm:+.1f} |" in md
    assert "## Selected hyperparameters" in md and "## Missing" in md
    assert len(result.selected) == 6  # 2 algorithms x 3 methods x 1 env x 1 trial
    names = {p.name for p in result.files}
    assert names == {"report.md", "report.tex", "results.csv", "selected_hparams.csv", "accuracy.png", "gip.png"}
    for png in ("accuracy.png", "gip.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tex = (tmp_path / "report" / "report.tex").read_text()
    assert r"\toprule" in tex and f"{fish:.1f} $\\pm$ 0.0" in tex
    csv_rows = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "dataset,selection,algorithm,environment,mean,se,n_trials,delta_ERM"
    assert len(csv_rows) == 1 + 3 * 2 * 2  # 3 methods x 2 algorithms x (env 0 + Avg)


@requires_domainbed
def test_report_cli_on_a_partial_sweep_says_what_is_missing(shared_sweep, tmp_path, capsys):
    import shutil

    out, _, _ = shared_sweep
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    manifest = json.loads((partial / "sweep_manifest.json").read_text())
    pair = next(n for n, a in manifest["jobs"].items() if a["algorithm"] == "Fish" and a["test_envs"] == [0, 1])
    shutil.rmtree(partial / pair)
    _, out, err = sweep_main(capsys, "report", "--input_dir", str(partial), "--no_plots")
    assert f"1 of 6 jobs not launched: Debug28 Fish test_envs=[0, 1] hparams_seed=0 trial=0 ({pair})" in out
    assert "Debug28, leave-one-domain-out: no result for Fish on 0" in out
    assert "| Fish | — | — | — |" in out  # LOO row; training/oracle rows still there
    assert "reading results" in err  # progress bar


@requires_domainbed
def test_collect_results_lists_the_plugins_datasets(tmp_path):
    """DomainBed's collect_results keeps only datasets in ``datasets.DATASETS``; the
    plugin's are there because the start-up hook registers them in every process."""
    sweep = tmp_path / "sweep"
    for e in range(2):  # LinearToy: 3 environments, the last one is the decorrelated one
        run = sweep / f"run{e}"
        run.mkdir(parents=True)
        accs = [(0.9, 0.9)] * 3
        accs[e] = (0.6, 0.6)
        (run / "results.jsonl").write_text(json.dumps(_record("LinearToy", "IDGM", [e], 0, accs)) + "\n")
        (run / "done").write_text("done")
    proc = subprocess.run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir", str(sweep)],
                          capture_output=True, text=True, timeout=600, env=sweep_env())
    assert proc.returncode == 0, proc.stderr
    assert "Dataset: LinearToy, model selection method: training-domain validation set" in proc.stdout
    assert re.search(r"^IDGM\s+60\.0 \+/- 0\.0\s+60\.0 \+/- 0\.0\s+X", proc.stdout, re.M), proc.stdout


@requires_domainbed
def test_submitit_local_executor_end_to_end(domainbed, tmp_path, capsys, monkeypatch):
    for key, value in sweep_env().items():  # the jobs' processes inherit this environment
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    status, text, err = sweep_main(capsys, "launch", *SWEEP_ARGS, "--selection", "training", "--output_dir",
                                   str(out), "--data_dir", str(tmp_path), "--command_launcher", "submitit",
                                   "--submitit_cluster", "local", "--submitit_folder", str(tmp_path / "logs"))
    assert status == 0, text[-2000:] + err[-3000:]
    assert "submitit (local): submitted 2 jobs" in err
    assert "2 jobs: 2 done, 0 running, 0 incomplete, 0 not launched." in text
    assert len(list((tmp_path / "logs").glob("*_result.pkl"))) == 2
    _, text, _ = sweep_main(capsys, "report", "--input_dir", str(out), "--selection", "training", "--no_plots")
    assert re.search(r"^\| Fish \| \d+\.\d ± 0\.0 \|", text, re.M)
    assert re.search(r"^\| ERM \| \d+\.\d ± 0\.0 \| \d+\.\d ± 0\.0 \| \+0\.0 \|", text, re.M)


def test_submitit_on_slurm_without_slurm_says_what_to_do_and_submits_nothing(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from domainbed_fish.launchers import submitit_launcher

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    with pytest.raises(SystemExit, match=r"cannot use cluster 'slurm' on this machine .*nothing was submitted.*"
                                         r"--submitit_cluster local"):
        submitit_launcher(["true"], cluster="slurm", folder=str(tmp_path / "logs"))
    assert not any((tmp_path / "logs").glob("**/*.pkl"))


def test_launchers_are_registered_into_domainbed(domainbed):
    from domainbed_fish.launchers import local_parallel, submitit_launcher
    from domainbed_fish.locate import import_domainbed

    registry = import_domainbed("command_launchers").REGISTRY
    assert registry["local_parallel"] is local_parallel
    assert registry["submitit"] is submitit_launcher


def test_local_parallel_uses_this_interpreter_and_splits_threads(tmp_path, monkeypatch, capsys):
    import domainbed_fish.launchers as launchers
    from domainbed_fish.launchers import local_parallel, with_this_interpreter

    for command in ("python -m x", "python3 -m x"):
        assert with_this_interpreter(command, "/v/bin/python") == "/v/bin/python -m x"
    assert with_this_interpreter("python3.11 -m x", "/v/bin/python") == "python3.11 -m x"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(launchers.os, "cpu_count", lambda: 8)  # 2 workers on 8 cores: 4 threads each
    script = "import os, sys; print(sys.executable, os.environ['OMP_NUM_THREADS'])"
    cmds = [f"python -c {json.dumps(script)} > {tmp_path / str(i)}" for i in range(3)] + ["exit 3"]
    statuses = local_parallel(cmds, workers=2, progress=False)
    assert statuses == [0, 0, 0, 3]
    assert "local_parallel: 1 of 4 commands failed" in capsys.readouterr().err
    for i in range(3):
        assert (tmp_path / str(i)).read_text().split() == [sys.executable, "4"]


def test_local_parallel_runs_one_job_per_gpu_on_at_most_workers_gpus(tmp_path, monkeypatch):
    import domainbed_fish.launchers as launchers

    monkeypatch.setattr(launchers, "visible_gpus", lambda: ["0", "1", "2"])
    cmds = [f"echo $CUDA_VISIBLE_DEVICES > {tmp_path / str(i)}" for i in range(4)]
    assert launchers.local_parallel(cmds, workers=2, progress=False) == [0, 0, 0, 0]
    seen = [(tmp_path / str(i)).read_text().strip() for i in range(4)]
    assert seen[:2] == ["0", "1"] and set(seen) == {"0", "1"}  # each job sees its GPU; GPU 2 stays free


def test_local_parallel_interrupted_ends_the_running_jobs(tmp_path, monkeypatch):
    """Ctrl-C (or any exception) in the launcher terminates the jobs it started, also when the
    launcher's process goes on (DomainBed's sweep imported in a notebook)."""
    import domainbed_fish.launchers as launchers

    started, real_start = [], launchers._start
    monkeypatch.setattr(launchers, "_start", lambda *a: started.append(real_start(*a)) or started[-1])

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(launchers.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        launchers.local_parallel(["sleep 300"], workers=1, progress=False)
    monkeypatch.undo()  # time.sleep is the time module's
    ((proc, _),) = started
    try:
        assert proc.wait(timeout=30) != 0
    finally:
        proc.terminate()  # the supervisor passes it to the job's process group
        proc.wait()


def test_submitit_jobs_run_under_the_job_lock_and_report_their_failures(tmp_path, monkeypatch, capsys):
    """A submitit job (a requeued one too) runs DomainBed's train command through run_job, so
    an interrupted run's directory is cleared first; a failed job's status is 1."""
    pytest.importorskip("submitit")
    from domainbed_fish import launchers

    calls = []
    monkeypatch.setattr(launchers.subprocess, "call", lambda command, **kwargs: calls.append(command) or 0)
    launchers.TrainCommand()("python -m domainbed.scripts.train --dataset PACS --output_dir /s/0a1b")
    assert calls == [f"{launchers.shlex.quote(sys.executable)} -m domainbed_fish.run_job --dataset PACS "
                     "--output_dir /s/0a1b"]
    monkeypatch.undo()
    statuses = launchers.submitit_launcher(["exit 0", "exit 3"], cluster="local", folder=str(tmp_path / "logs"))
    assert statuses == [0, 1]
    assert len(re.findall(r"submitit job \S+ failed", capsys.readouterr().err)) == 1


def test_local_parallel_shows_a_failed_train_commands_error_from_its_err_txt(tmp_path, capsys, monkeypatch):
    """DomainBed's train script sends its stderr to <output_dir>/err.txt and stdout (misc.Tee),
    so a traceback never reaches the process's stderr: the failure report reads err.txt."""
    from domainbed_fish.launchers import local_parallel

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "job"
    out.mkdir()
    # A warning on the process's stderr before the train script's Tee, then a traceback longer
    # than the tail shown: the tail of err.txt is what names the problem.  (The messages are
    # split in the script: the report shows the command too.)
    script = ("import sys, pathlib; d = pathlib.Path(sys.argv[-1]); "
              "sys.stderr.write('User' + 'Warning: at import\\n'); "
              "(d / 'err.txt').write_text('Traceback\\n' + '  frame\\n' * 30 + 'Value' + 'Error: "
              "hyperparameter bad, fix it\\n'); sys.exit(1)")
    before = "python -c " + json.dumps("import sys; sys.stderr.write('usage: bad ' + 'argument\\n'); sys.exit(2)")
    # the last --output_dir is the job's, as argparse reads it
    statuses = local_parallel([f"python -c {json.dumps(script)} --output_dir {tmp_path / 'first'} --output_dir {out}",
                               before + f" --output_dir {tmp_path / 'absent'}"], workers=1, progress=False)
    assert statuses == [1, 2]
    report = capsys.readouterr().err
    assert "exit status 1" in report and "ValueError: hyperparameter bad, fix it" in report
    assert "UserWarning: at import" not in report
    assert "exit status 2" in report and "usage: bad argument" in report  # no err.txt: the process's stderr


@requires_domainbed
def test_killed_job_is_incomplete_and_relaunch_finishes_it(domainbed, tmp_path, capsys, monkeypatch):
    out, data = tmp_path / "out", tmp_path
    args = ["--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "1", "--n_trials", "1",
            "--steps", "30", "--checkpoint_freq", "10", "--selection", "training", "--test_envs", "0", "1",
            "--hparams", '{"batch_size": 8}', "--skip_confirmation", "--output_dir", str(out),
            "--data_dir", str(data), "--workers", "1", "--seed", "0"]
    launch = subprocess.Popen([PYTHON, "-m", "domainbed_fish.sweep", "launch", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=sweep_env(), cwd=REPO)
    # Kill the first job as soon as it has written a checkpoint record (mid-run).
    victim, deadline = None, time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:
        for d in out.glob("*/results.jsonl") if out.exists() else []:
            if d.stat().st_size > 0 and not (d.parent / "done").exists() and holder_pid(d.parent):
                victim = d.parent
                os.kill(holder_pid(victim), signal.SIGKILL)
                break
        time.sleep(0.02)
    assert victim is not None, "no job started"
    text = launch.communicate(timeout=600)[0]
    assert launch.returncode == 1 and "1 jobs did not finish" in text, text[-3000:]
    (finished,) = _done_dirs(out)
    finished_results = (finished / "results.jsonl").read_bytes()

    _, text, _ = sweep_main(capsys, "status", "--output_dir", str(out), "--list")
    assert "2 jobs: 1 done, 0 running, 1 incomplete, 0 not launched." in text
    assert re.search(rf"incomplete  {victim.name}  Debug28 ERM test_envs=\[\d\]", text)

    for key, value in sweep_env().items():
        monkeypatch.setenv(key, value)
    status, text, err = sweep_main(capsys, "launch", *args)
    assert status == 0, text[-2000:] + err[-2000:]
    assert "About to launch 1 jobs (1 interrupted ones are cleared and trained again)." in text
    assert "2 jobs: 2 done, 0 running, 0 incomplete, 0 not launched." in text
    assert (finished / "results.jsonl").read_bytes() == finished_results  # untouched
    assert [r["step"] for r in read_jsonl(victim / "results.jsonl")] == [0, 10, 20, 29]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MalformedResultsWarning)
        from domainbed_fish.report import write_report

        result = write_report(out, selection=["training"], plots=False, progress=False)
    (table,) = result.tables
    assert table.env_ids == [0, 1] and all(len(table.cells["ERM"][e].trials) == 1 for e in (0, 1))


def test_submitit_settings_come_from_options_or_environment(monkeypatch):
    from domainbed_fish.launchers import SubmititOptions

    for var, value in [("SLURM_PARTITION", "gpu"), ("SLURM_TIME", "720"), ("SLURM_GPUS", "1"), ("SLURM_CPUS", "8"),
                       ("SLURM_MEM_GB", "32"), ("SLURM_ARRAY_PARALLELISM", "16"), ("SUBMITIT_FOLDER", "/x/logs"),
                       ("SLURM_MAX_REQUEUE", "5")]:
        monkeypatch.setenv(f"DOMAINBED_FISH_{var}", value)
    opts = SubmititOptions.from_env(partition="long", array_parallelism=None)
    assert opts.folder == "/x/logs" and opts.wait
    assert opts.executor_parameters() == {
        "name": "domainbed_fish", "stderr_to_stdout": False, "timeout_min": 720, "gpus_per_node": 1,
        "cpus_per_task": 8, "mem_gb": 32, "slurm_partition": "long", "slurm_array_parallelism": 16,
        "slurm_max_num_timeout": 5}
    monkeypatch.setenv("DOMAINBED_FISH_SLURM_TIME", "")  # set but empty: as unset
    assert SubmititOptions.from_env().time is None
    monkeypatch.setenv("DOMAINBED_FISH_SLURM_GPUS", "one")
    with pytest.raises(ValueError, match="DOMAINBED_FISH_SLURM_GPUS='one' must be an integer"):
        SubmititOptions.from_env()


def test_submitit_jobs_requeue_themselves_on_preemption():
    submitit = pytest.importorskip("submitit")
    import pickle

    from domainbed_fish import launchers

    cls = launchers.CheckpointableTrainCommand
    job = cls()
    assert isinstance(job, submitit.helpers.Checkpointable)
    resubmission = job.checkpoint("python -m domainbed_fish.run_job --output_dir x")
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    assert resubmission.function is job and resubmission.args == ("python -m domainbed_fish.run_job --output_dir x",)
    assert type(pickle.loads(pickle.dumps(job))) is cls  # what submitit sends to the cluster
    assert job("exit 0") == 0
    with pytest.raises(RuntimeError, match="exit status 4"):
        job("exit 4")


@requires_domainbed
def test_status_and_delete_incomplete_spare_running_and_done_jobs(domainbed, tmp_path, capsys):
    from domainbed_fish import sweep

    argv = ["--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "1", "--n_trials", "1",
            "--selection", "training", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--skip_confirmation"]
    jobs = sweep.make_jobs(sweep.resolve(sweep.build_parser().parse_args(["status", *argv])))
    done, running, incomplete = (Path(j.job.output_dir) for j in jobs)
    for d in (done, running, incomplete):
        d.mkdir(parents=True)
    (done / "done").write_text("done")
    (incomplete / "results.jsonl").write_text("")
    holder = _hold_lock(running)
    try:
        _, text, _ = sweep_main(capsys, "status", *argv, "--list")
        assert "3 jobs: 1 done, 1 running, 1 incomplete, 0 not launched." in text
        assert re.search(rf"running  {running.name}  Debug28 ERM", text)
        _, text, _ = sweep_main(capsys, "status", *argv)  # without --list: the jobs to look at
        assert running.name in text and incomplete.name in text and done.name not in text
        from domainbed_fish.manifest import write_manifest

        write_manifest(tmp_path / "out", {j.name: j.job.train_args for j in jobs}, {}, None)
        _, text, _ = sweep_main(capsys, "status", "--output_dir", str(tmp_path / "out"))  # the manifest's jobs
        assert "3 jobs: 1 done, 1 running, 1 incomplete, 0 not launched." in text
        _, text, _ = sweep_main(capsys, "delete_incomplete", *argv)
        assert "About to delete 1 jobs." in text and "Deleted 1 jobs!" in text
        assert done.exists() and running.exists() and not incomplete.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="recognised from /proc (Linux)")
@requires_domainbed
def test_delete_incomplete_spares_a_job_started_after_the_scan(domainbed, tmp_path, capsys):
    """Between ``status`` reading a job as incomplete and the deletion, a launch may have
    started it (with the lock, or DomainBed's own train script): each job is checked again."""
    from domainbed_fish import sweep

    argv = ["--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "2", "--n_trials", "1",
            "--selection", "training", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--skip_confirmation"]
    args = sweep.build_parser().parse_args(["delete_incomplete", *argv])
    jobs = sweep.make_jobs(sweep.resolve(args))[:4]
    locked, unlocked, finished, interrupted = (Path(j.job.output_dir) for j in jobs)
    for d in (locked, unlocked, finished, interrupted):
        d.mkdir(parents=True)
        (d / "results.jsonl").write_text('{"step": 0}\n')
    stale = [sweep.SweepJob(j.job, sweep.INCOMPLETE) for j in jobs]  # the states as read before they started
    holder = _hold_lock(locked)
    trainer = domainbed_train_without_lock(tmp_path, f"out/{unlocked.name}")
    try:
        deadline = time.monotonic() + 30
        while sweep.job_state(unlocked) != sweep.RUNNING and time.monotonic() < deadline:
            time.sleep(0.1)
        (finished / "done").write_text("done")
        capsys.readouterr()
        assert sweep.delete_incomplete(stale, args) == 0
        assert "Deleted 1 jobs!" in capsys.readouterr().out
        assert locked.exists() and unlocked.exists() and finished.exists() and not interrupted.exists()
    finally:
        for process in (holder, trainer):
            process.kill()
            process.wait()


@requires_domainbed
def test_delete_incomplete_keeps_a_job_with_a_damaged_lock_and_names_the_fix(domainbed, tmp_path, capsys):
    """The other interrupted jobs are deleted; the damaged one is kept (without its lock
    nothing tells that no one trains it) with the fix, and the exit status says so."""
    from domainbed_fish import sweep

    argv = ["--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "2", "--n_trials", "1",
            "--selection", "training", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--skip_confirmation"]
    args = sweep.build_parser().parse_args(["delete_incomplete", *argv])
    jobs = sweep.make_jobs(sweep.resolve(args))[:2]
    damaged, interrupted = (Path(j.job.output_dir) for j in jobs)
    for d in (damaged, interrupted):
        d.mkdir(parents=True)
        (d / "results.jsonl").write_text('{"step": 0}\n')
    lock = _damage_lock(damaged, "directory")
    capsys.readouterr()
    assert sweep.delete_incomplete([sweep.SweepJob(j.job, sweep.INCOMPLETE) for j in jobs], args) == 1
    out, err = capsys.readouterr()
    assert "Deleted 1 jobs!" in out
    assert err == (f"error: the job's lock file {lock} is a directory, which no process can lock (a damaged job "
                   f"directory); remove it (rm -r '{lock}') and run the same command again\n")
    assert (damaged / "results.jsonl").exists() and not interrupted.exists()


def _recording_launcher(monkeypatch) -> list[dict]:
    """Replace local_parallel and submitit by recorders of their calls (commands and
    options); nothing runs."""
    import domainbed_fish.launchers as launchers

    calls: list[dict] = []

    def record(name):
        def launcher(commands, **options):
            calls.append({"launcher": name, "commands": list(commands), **options})
        return launcher

    monkeypatch.setattr(launchers, "local_parallel", record("local_parallel"))
    monkeypatch.setattr(launchers, "submitit_launcher", record("submitit"))
    return calls


@requires_domainbed
def test_launch_passes_the_shuffled_jobs_and_its_options_to_the_launcher(domainbed, tmp_path, capsys, monkeypatch):
    """The jobs that are not done, in the order of ``RandomState(--seed).permutation`` (DomainBed
    shuffles too, unseeded); ``--workers`` (or DOMAINBED_FISH_WORKERS) reaches local_parallel;
    submitit's logs go next to the jobs; a job the launcher never ran is reported."""
    import numpy as np

    from domainbed_fish import sweep

    calls = _recording_launcher(monkeypatch)
    monkeypatch.delenv("DOMAINBED_FISH_WORKERS", raising=False)
    monkeypatch.delenv("DOMAINBED_FISH_SUBMITIT_FOLDER", raising=False)
    out = tmp_path / "out"
    argv = ["--datasets", "LinearToy", "--algorithms", "ERM", "--n_hparams", "3", "--n_trials", "2",
            "--selection", "training", "--output_dir", str(out), "--skip_confirmation"]
    jobs = sweep.make_jobs(sweep.resolve(sweep.build_parser().parse_args(["launch", *argv])))
    assert len(jobs) == 18
    (done := Path(jobs[4].job.output_dir)).mkdir(parents=True)
    (done / "done").write_text("done")
    running = Path(jobs[9].job.output_dir)
    to_run = [j.command for j in jobs if j.job.output_dir not in (str(done), str(running))]
    orders = {}
    holder = _hold_lock(running)
    try:
        for seed in (0, 7):
            status, text, err = sweep_main(capsys, "launch", *argv, "--seed", str(seed), "--workers", "3")
            assert "About to launch 16 jobs." in text
            assert status == 1 and "16 jobs did not finish" in err  # the recorder ran none of them
            call = calls.pop()
            assert call == {"launcher": "local_parallel", "workers": 3, "commands": call["commands"]}
            assert call["commands"] == [to_run[i] for i in np.random.RandomState(seed).permutation(16)]
            orders[seed] = call["commands"]
    finally:
        holder.kill()
        holder.wait()
    assert orders[0] != orders[7] and sorted(orders[0]) == sorted(to_run) != orders[0]

    monkeypatch.setenv("DOMAINBED_FISH_WORKERS", "2")
    sweep_main(capsys, "launch", *argv)
    assert calls.pop()["workers"] == 2
    status, _, _ = sweep_main(capsys, "launch", *argv, "--command_launcher", "submitit", "--submitit_no_wait")
    assert status == 0  # not waiting: nothing to report yet
    call = calls.pop()
    assert call["folder"] == str(out / "submitit_logs") and call["wait"] is False
    monkeypatch.setenv("DOMAINBED_FISH_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    sweep_main(capsys, "launch", *argv, "--command_launcher", "submitit")
    assert calls.pop()["folder"] is None  # the environment's, read by SubmititOptions.from_env


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="recognised from /proc (Linux)")
@requires_domainbed
def test_a_job_domainbeds_own_launcher_trains_is_running_not_incomplete(domainbed, tmp_path, capsys):
    """DomainBed's ``local`` launcher runs train without the lock: status, delete_incomplete
    and run_job must still leave the job alone (they cleared it mid-run)."""
    from domainbed_fish import run_job, sweep

    argv = ["--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "1", "--n_trials", "1",
            "--selection", "training", "--test_envs", "0", "--data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--skip_confirmation"]
    (job,) = sweep.make_jobs(sweep.resolve(sweep.build_parser().parse_args(["status", *argv])))
    job_dir = Path(job.job.output_dir)
    job_dir.mkdir(parents=True)
    (job_dir / "results.jsonl").write_text('{"step": 0}\n')
    trainer = domainbed_train_without_lock(tmp_path, f"out/{job_dir.name}")
    try:
        deadline = time.monotonic() + 30
        while "running" not in sweep_main(capsys, "status", *argv)[1] and time.monotonic() < deadline:
            time.sleep(0.1)
        _, text, _ = sweep_main(capsys, "status", *argv)
        assert "1 jobs: 0 done, 1 running, 0 incomplete, 0 not launched." in text
        _, text, _ = sweep_main(capsys, "delete_incomplete", *argv)
        assert "About to delete 0 jobs." in text
        assert run_job.main(["--output_dir", str(job_dir), "--dataset", "Debug28"]) == 0
        assert f"skipped, another process is training (pid {trainer.pid}, DomainBed's train script)" \
            in capsys.readouterr().out
        assert (job_dir / "results.jsonl").read_text() == '{"step": 0}\n'  # not cleared
    finally:
        trainer.kill()
        trainer.wait()
    _, text, _ = sweep_main(capsys, "status", *argv)
    assert "1 jobs: 0 done, 0 running, 1 incomplete, 0 not launched." in text


def test_train_output_dir_reads_domainbeds_train_command_lines():
    from domainbed_fish.lockfile import train_output_dir

    assert train_output_dir(["python", "-m", "domainbed.scripts.train", "--output_dir", "a/b"]) == "a/b"
    assert train_output_dir(["/usr/bin/python3", "domainbed/scripts/train.py", "--output_dir=c"]) == "c"
    assert train_output_dir(["python", "-m", "domainbed.scripts.train", "--dataset", "PACS"]) == "train_output"
    assert train_output_dir(["python", "-m", "domainbed_fish.run_job", "--output_dir", "a/b"]) is None
    assert train_output_dir(["/bin/sh", "-c", "python -m domainbed.scripts.train --output_dir a"]) is None
    # as train.py's argparse reads it: a prefix names the option, the last value wins
    assert train_output_dir(["python3", "-mdomainbed.scripts.train", "--output", "a", "--output_dir=b"]) == "b"
    assert train_output_dir(["python", "-W", "ignore", "-m", "domainbed.scripts.train", "--output_d", "c"]) == "c"
    assert train_output_dir(["python", "-m", "domainbed.scripts.train", "--o", "d"]) == "d"  # the shortest prefix
    # not the train script: an editor on it, another module, code given with -c
    assert train_output_dir(["vim", "domainbed/scripts/train.py"]) is None
    assert train_output_dir(["python", "-c", "pass", "-m", "domainbed.scripts.train", "--output_dir", "a"]) is None


def test_launchers_run_domainbeds_train_commands_under_the_job_lock():
    from domainbed_fish.launchers import under_job_lock

    command = "python -m domainbed.scripts.train --dataset PACS --output_dir /s/0a1b"
    assert under_job_lock(command) == "python -m domainbed_fish.run_job --dataset PACS --output_dir /s/0a1b"
    assert under_job_lock("/opt/py/bin/python3 -m domainbed.scripts.train --x 1 --output_dir=d") == \
        "/opt/py/bin/python3 -m domainbed_fish.run_job --x 1 --output_dir=d"
    # a prefix names the directory for train.py's argparse, and so for run_job's
    assert under_job_lock("python -m domainbed.scripts.train --out d") == "python -m domainbed_fish.run_job --out d"
    for unchanged in ("python -m domainbed_fish.run_job --output_dir d", "echo -m domainbed.scripts.train --output_dir x",
                      "python -m domainbed.scripts.train --dataset PACS", "exit 3"):  # the last train: no job directory
        assert under_job_lock(unchanged) == unchanged


@pytest.mark.parametrize(("arguments", "output_dir"), [
    (["--datasets", "PACS"], "outputs/paper_domainbed"),  # sweep options right after DATA_DIR
    (["out/p", "--datasets", "PACS"], "out/p"),
])
def test_paper_domainbed_script_tells_its_output_dir_from_sweep_options(tmp_path, arguments, output_dir):
    """The commands the script runs, read off a stand-in python on PATH that records them."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO / "sweeps" / "paper_domainbed.sh"), "/data", *arguments], check=True,
                   env=env, capture_output=True, timeout=60)
    dry_run, launch = log.read_text().splitlines()
    assert dry_run == f"-m sweeps dry_run --preset paper_domainbed --data_dir /data --output_dir {output_dir} " \
                      "--datasets PACS"
    assert launch.startswith(f"-m sweeps launch --preset paper_domainbed --data_dir /data --output_dir {output_dir} "
                             f"--command_launcher submitit --submitit_folder {output_dir}/submitit_logs ")
    assert launch.endswith(" --datasets PACS")


def test_sweep_without_domainbed_says_how_to_get_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DOMAINBED_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([PYTHON, "-m", "domainbed_fish.sweep", "dry_run", "--datasets", "PACS", "--data_dir", "x",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    if proc.returncode == 0:
        pytest.skip("DomainBed is importable without DOMAINBED_DIR here")
    assert proc.stderr.startswith("error: DomainBed was not found.") and "DOMAINBED_DIR" in proc.stderr


def test_usage_names_the_command_as_started_not_one_that_works_only_in_the_repository(tmp_path):
    """``python -m sweeps`` needs the repository's root as the working directory; an installed
    package's user outside it must be shown a command that works where they are."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    started = {"python -m domainbed_fish.sweep": ([PYTHON, "-m", "domainbed_fish.sweep"], tmp_path),
               "python -m sweeps": ([PYTHON, "-m", "sweeps"], REPO)}
    script = Path(PYTHON).parent / "domainbed-fish-sweep"  # the console script, where installed
    if script.is_file():
        started["domainbed-fish-sweep"] = ([str(script)], tmp_path)
    for name, (command, cwd) in started.items():
        for argv in (["--help"], ["launch", "--help"]):
            proc = subprocess.run([*command, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith(f"usage: {name} "), proc.stdout[:200]


@pytest.mark.parametrize(("argv", "called"), [
    (["reproduce", "--quick", "--dry_run"], ("reproduce", ["--quick", "--dry_run"])),
    (["status", "--output_dir", "o"], ("sweep", ["status", "--output_dir", "o"])),
    ([], ("sweep", [])),  # no command: the sweep command's usage error, not an IndexError
])
def test_python_m_sweeps_hands_reproduce_on_and_returns_the_commands_status(monkeypatch, argv, called):
    """``sweeps/__main__.py`` run as ``python -m sweeps`` does, with both commands stood in for
    (``sweep.main`` is what hands ``reproduce`` on, for ``domainbed-fish-sweep`` as well)."""
    import runpy

    import domainbed_fish.reproduction.__main__ as reproduction
    from domainbed_fish import sweep

    calls = []
    monkeypatch.setattr(reproduction, "main", lambda args: calls.append(("reproduce", args)) or 3)
    monkeypatch.setattr(sweep, "_main", lambda args: calls.append(("sweep", args)) or 4)
    monkeypatch.setattr(sys, "argv", [str(REPO / "sweeps" / "__main__.py"), *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "sweeps" / "__main__.py"), run_name="__main__")
    assert calls == [called]
    assert exited.value.code == (3 if called[0] == "reproduce" else 4)  # a failed launch fails the shell script


def test_report_without_matplotlib_says_so_before_writing_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, as when absent
    (tmp_path / "sweep" / "job0").mkdir(parents=True)
    with pytest.raises(SystemExit) as stopped:
        sweep_main(capsys, "report", "--input_dir", str(tmp_path / "sweep"), "--report_dir", str(tmp_path / "report"))
    assert str(stopped.value) == ("error: the report's plots need matplotlib, which is not installed: "
                                  "pip install 'domainbed-fish[plots]', or pass --no_plots")
    assert not (tmp_path / "report").exists()


def test_hints_name_the_installed_command(tmp_path):
    """What the malformed-line warning and the report's Missing section tell the user to run."""
    from domainbed_fish.report import find_missing

    job = tmp_path / "job0"
    job.mkdir()
    (job / "results.jsonl").write_text('{"args": {"dataset": "Debug28"')  # a truncated line
    (tmp_path / "sweep_manifest.json").write_text(json.dumps({"jobs": {
        "job0": {"dataset": "Debug28", "algorithm": "Fish", "test_envs": [0], "hparams_seed": 0, "trial_seed": 0}}}))
    with pytest.warns(MalformedResultsWarning, match="`domainbed-fish-sweep launch` retrains it"):
        read_jsonl(job / "results.jsonl")
    assert f"finish them with: domainbed-fish-sweep launch --output_dir {tmp_path} (with the sweep's options)" \
        in find_missing(tmp_path, [], [])


def test_visible_gpus_reads_cuda_visible_devices_as_written(monkeypatch):
    from domainbed_fish.launchers import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 1,,-1")
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
