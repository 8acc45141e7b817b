"""The reproduction command: its presets, resumable job running, report, and a real --quick run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, domainbed_train_without_lock, subprocess_env

from domainbed_fish.hparams import CDSPRITES_ALGORITHM_HPARAMS
from domainbed_fish.lifetime import is_alive
from domainbed_fish.lockfile import JobLock, holder_pid, is_locked
from domainbed_fish.reproduction import __main__ as reproduction_main
from domainbed_fish.reproduction import jobs as jobs_module
from domainbed_fish.reproduction.__main__ import cpu_model
from domainbed_fish.reproduction.presets import GIP_TRACE_N, PRESETS, TrainJob, get_preset
from domainbed_fish.reproduction.report import REPORT_FILES, render_markdown, targets, training_seconds


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_cover_the_paper_and_run_the_headline_jobs_first(name):
    preset = get_preset(name)
    jobs = preset.jobs()
    assert len({job.name for job in jobs}) == len(jobs)
    cdsprites = [job for job in jobs if job.dataset.startswith("CdSprites")]
    assert len(cdsprites) == len(preset.cdsprites_sizes) * len(preset.cdsprites_algorithms) * preset.seeds
    assert {"ERM", "CORAL", "Fish", "IDGM"} <= set(preset.cdsprites_algorithms)
    assert GIP_TRACE_N in preset.cdsprites_sizes
    for job in cdsprites:  # the decorrelated environment is the test environment
        assert job.test_env == int(job.dataset.removeprefix("CdSprites"))
        assert job.save_every_checkpoint == (job.test_env == GIP_TRACE_N and job.algorithm != "CORAL")
    warmup_default = {h.name: h.default for h in CDSPRITES_ALGORITHM_HPARAMS["Fish"]}["fish_warmup_steps"]
    for job in cdsprites:  # every Fish run takes Fish steps, not only its ERM warm-up
        if job.algorithm == "Fish":
            assert job.hparams.get("fish_warmup_steps", warmup_default) < job.steps - 1, job.name
    toy_rows = {job.row for job in jobs if job.dataset == "LinearToy"}
    assert {"ERM", "Fish", "IDGM"} <= toy_rows
    assert jobs[0].dataset == "LinearToy" and jobs[len(toy_rows) * preset.toy_seeds].dataset == "CdSprites15"
    if name != "quick":
        assert preset.seeds >= 3
    if name not in ("quick", "n15"):  # n15 is CdSprites-15 alone, at the length Fish needs there
        assert {5, 15, 30} <= set(preset.cdsprites_sizes)


def test_n15_preset_changes_only_fishs_settings_and_runs_longer_than_the_default():
    n15, default = get_preset("n15"), get_preset("default")
    assert n15.cdsprites_sizes == (15,) and n15.steps > default.steps
    for job in n15.jobs():
        if job.dataset != "CdSprites15":
            continue
        fish_only = {"lr": 0.002, "fish_inner_momentum": 0.5} if job.algorithm == "Fish" else {}
        assert job.hparams == {**default.cdsprites_hparams, **fish_only}, job.name


@pytest.mark.parametrize(("steps", "freq"), [(251, 50), (250, 50), (16, 5), (3001, 500), (1, 10), (7, 1)])
def test_evaluations_are_the_checkpoints_domainbeds_train_loop_evaluates(steps, freq):
    # train.py evaluates where ``step % checkpoint_freq == 0 or step == n_steps - 1``
    expected = sum(step % freq == 0 or step == steps - 1 for step in range(steps))
    assert TrainJob("CdSprites15", "ERM", 0, 15, steps, freq).evaluations == expected


def test_job_cost_follows_the_compute_of_algorithm_size_steps_and_evaluation():
    def cost(algorithm="ERM", n=15, steps=251, freq=50, **hparams):
        return TrainJob(f"CdSprites{n}", algorithm, 0, n, steps, freq, hparams).cost

    assert cost("IDGM") > cost("CORAL") > cost("Fish") > cost("ERM")
    assert cost(n=30) > 1.9 * cost(n=15)
    assert cost(batch_size=64) > cost(batch_size=32)
    assert cost(steps=501) > 1.9 * cost(steps=251)
    assert cost(freq=25) > cost(freq=50) and cost(cdsprites_per_domain=1000) < cost()
    toy = TrainJob("LinearToy", "ERM", 0, 2, 3001, 500).cost
    assert toy < cost(n=5) / 5


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"choose one of \['default', 'long', 'n15', 'quick'\]"):
        get_preset("paper")


@pytest.mark.parametrize("below", ["", "sub/dir"])
def test_an_output_dir_on_a_file_is_refused_with_the_fix(tmp_path, capsys, below):
    blocking = tmp_path / "results.txt"
    blocking.write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        reproduction_main.parse_args(["--quick", "--output_dir", str(blocking / below)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{blocking} is a file, not a directory; pass a directory" in error
    assert blocking.read_text() == "kept"


def test_report_only_without_finished_runs_is_refused_and_creates_nothing(domainbed, tmp_path, capsys):
    output_dir = tmp_path / "never_run"
    assert reproduction_main.main(["--quick", "--report_only", "--output_dir", str(output_dir)]) == 2
    error = capsys.readouterr().err
    assert "--report_only found no finished job of preset quick" in error
    assert "without --report_only to train them" in error
    assert not output_dir.exists()


def test_job_key_changes_with_anything_that_changes_the_run():
    job = TrainJob("CdSprites5", "Fish", 0, 5, 10, 5, {"batch_size": 8})
    assert job.key == TrainJob("CdSprites5", "Fish", 0, 5, 10, 5, {"batch_size": 8}).key
    assert job.key != TrainJob("CdSprites5", "Fish", 0, 5, 10, 5, {"batch_size": 16}).key
    assert job.key != TrainJob("CdSprites5", "Fish", 1, 5, 10, 5, {"batch_size": 8}).key
    args = job.train_args("out")
    assert args[args.index("--test_envs") + 1] == "5" and args[args.index("--trial_seed") + 1] == "0"
    assert json.loads(args[args.index("--hparams") + 1]) == {"batch_size": 8}


def test_finished_jobs_are_skipped_and_interrupted_ones_restarted(tmp_path, monkeypatch):
    finished = TrainJob("LinearToy", "ERM", 0, 2, 10, 5)
    interrupted = TrainJob("LinearToy", "ERM", 1, 2, 10, 5)
    (jobs_module.run_dir(tmp_path, finished)).mkdir(parents=True)
    (jobs_module.run_dir(tmp_path, finished) / "done").write_text("done")
    leftover = jobs_module.run_dir(tmp_path, interrupted)
    leftover.mkdir(parents=True)
    (leftover / "results.jsonl").write_text('{"step": 0}\n{"ste')  # what a SIGKILL leaves

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        out = command[command.index("--output_dir") + 1]
        assert not (jobs_module.Path(out) / "results.jsonl").exists()  # cleared first
        (jobs_module.Path(out) / "done").write_text("done")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(jobs_module.subprocess, "run", fake_run)
    outcomes = jobs_module.run_jobs(tmp_path, [finished, interrupted], workers=2, runner="subprocess")
    assert [o.job for o in outcomes] == [interrupted] and outcomes[0].error is None
    assert len(calls) == 1 and calls[0][:3] == [PYTHON, "-m", "domainbed_fish.run_job"]  # train under the lock


def test_the_toys_controls_are_kept_out_of_the_runs_domainbed_collects(tmp_path):
    """collect_results groups by algorithm and selects over every run of a group: a control
    (a labelled Fish or IDGM variant) in runs/ would be selected as IDGM itself.  An earlier
    version's control in runs/ is moved, finished as it is, and one in training stays."""
    toy = [job for job in get_preset("default").jobs() if job.dataset == "LinearToy"]
    controls = [job for job in toy if job.label]
    assert {job.row for job in toy} - {job.row for job in controls} == {"ERM", "Fish", "IDGM"} and len(controls) == 9
    assert all(jobs_module.run_dir(tmp_path, job).parent.name == "controls" for job in controls)
    assert all(jobs_module.run_dir(tmp_path, job).parent.name == "runs" for job in toy if not job.label)
    moved, training, own = controls[0], controls[1], next(job for job in toy if not job.label)
    for job in (moved, training, own):
        (tmp_path / "runs" / job.name).mkdir(parents=True)
        (tmp_path / "runs" / job.name / "done").write_text("done")
    (tmp_path / "runs" / training.name / "done").unlink()
    with JobLock(tmp_path / "runs" / training.name):
        assert jobs_module.move_controls_out_of_runs(tmp_path, toy) == [tmp_path / "controls" / moved.name]
    assert jobs_module.job_state(tmp_path, moved) == "done"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([training.name, own.name])


def test_ctrl_c_ends_the_command_with_what_to_do_not_a_traceback(domainbed, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduction_main, "run_jobs", interrupted)
    assert reproduction_main.main(["--quick", "--output_dir", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.endswith(
        "interrupted: finished jobs are kept; run the same command again to finish the rest\n")


def test_missing_matplotlib_stops_the_command_before_any_job_not_at_the_report(
        domainbed, tmp_path, monkeypatch, capsys):
    """The figures need matplotlib (the [domainbed] extra); without it the command says so at
    once instead of training every job and then failing with an ImportError."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, as when absent
    monkeypatch.setattr(reproduction_main, "run_jobs", lambda *args, **kwargs: pytest.fail("jobs were run"))
    assert reproduction_main.main(["--quick", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "matplotlib" in err and "pip install 'domainbed-fish[domainbed]'" in err
    assert not (tmp_path / "out").exists()
    assert reproduction_main.main(["--quick", "--dry_run", "--output_dir", str(tmp_path / "out")]) == 0  # lists jobs


def test_steps_recorded_reads_the_last_complete_checkpoint_line(tmp_path):
    job = TrainJob("CdSprites5", "ERM", 0, 5, 251, 50)
    assert jobs_module.steps_recorded(tmp_path, job) == 0  # not started
    path = jobs_module.run_dir(tmp_path, job) / "results.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"step": 0}\n')
    assert jobs_module.steps_recorded(tmp_path, job) == 1
    path.write_text('{"step": 0}\n{"step": 50}\n{"step": 100, "env0_in_a')  # the third line being written
    assert jobs_module.steps_recorded(tmp_path, job) == 51
    path.write_text('{"step": 0}\n{"step": 250}\n')
    assert jobs_module.steps_recorded(tmp_path, job) == 251
    path.write_text('{"step": 300}\n')  # never more than the job's steps
    assert jobs_module.steps_recorded(tmp_path, job) == 251
    path.write_text("[1, 2]\nnot json\n")
    assert jobs_module.steps_recorded(tmp_path, job) == 0


def test_estimated_progress_counts_finished_jobs_whole_and_running_ones_by_their_checkpoints(tmp_path):
    finished, running, queued = (TrainJob("CdSprites5", algorithm, 0, 5, 201, 50) for algorithm in ("ERM", "Fish", "IDGM"))
    path = jobs_module.run_dir(tmp_path, running) / "results.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"step": 0}\n{"step": 50}\n')
    done = reproduction_main.estimated_progress(tmp_path, [finished, running, queued], {finished.name})
    assert done == pytest.approx(finished.cost + running.cost * 51 / 201)


def test_the_progress_bar_moves_while_a_long_job_runs(domainbed, tmp_path, monkeypatch, capsys):
    """Between two job ends the bar redraws on its own and follows the running jobs'
    checkpoints, so an hour-long job does not look like a hang."""
    monkeypatch.setattr(reproduction_main, "PROGRESS_REFRESH_SECONDS", 0.02)
    monkeypatch.setattr(reproduction_main, "write_report", lambda *args, **kwargs: None)
    jobs = get_preset("quick").jobs()
    total = sum(job.cost for job in jobs)
    running = max(jobs, key=lambda job: job.cost)

    def fake_run_jobs(output_dir, jobs, workers, progress, runner):
        path = jobs_module.run_dir(output_dir, running) / "results.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text(f'{{"step": {running.steps // 2 - 1}}}\n')  # half its steps checkpointed
        time.sleep(0.5)
        return []

    monkeypatch.setattr(reproduction_main, "run_jobs", fake_run_jobs)
    assert reproduction_main.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().err
    expected = 100 * running.cost / 2 / total
    assert f"0/{len(jobs)} jobs: {expected:3.0f}%|" in shown, shown[-500:]


def test_a_run_made_under_other_defaults_is_set_aside_and_run_again(domainbed, tmp_path, monkeypatch):
    """The job key hashes what the preset passes; a changed registry default must not let
    an old run through: it is moved to stale/ (kept) and the job runs again."""
    current = TrainJob("CdSprites5", "Fish", 0, 5, 10, 5, {"batch_size": 8})
    stale = TrainJob("CdSprites5", "Fish", 1, 5, 10, 5, {"batch_size": 8})
    expected = jobs_module.expected_hparams(current)
    assert expected["batch_size"] == 8
    assert expected["fish_warmup_steps"] == domainbed.hparams_registry.default_hparams(
        "Fish", "CdSprites5")["fish_warmup_steps"]
    for job, hparams in ((current, expected), (stale, {**expected, "fish_warmup_steps": 0})):
        run = jobs_module.run_dir(tmp_path, job)
        run.mkdir(parents=True)
        (run / "results.jsonl").write_text(json.dumps({"args": {}, "step": 10, "hparams": hparams}) + "\n")
        (run / "done").write_text("done")
    assert jobs_module.job_state(tmp_path, current) == "done"
    assert jobs_module.job_state(tmp_path, stale) == "stale"
    assert jobs_module.stale_differences(tmp_path, stale) == {
        "fish_warmup_steps": (0, expected["fish_warmup_steps"])}

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        out = jobs_module.Path(command[command.index("--output_dir") + 1])
        (out / "done").write_text("done")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(jobs_module.subprocess, "run", fake_run)
    outcomes = jobs_module.run_jobs(tmp_path, [current, stale], workers=1, runner="subprocess")
    assert [o.job.name for o in outcomes] == [stale.name] and len(calls) == 1
    (kept,) = (tmp_path / "stale").iterdir()
    assert kept.name.startswith(stale.name)
    assert json.loads((kept / "results.jsonl").read_text())["hparams"]["fish_warmup_steps"] == 0
    assert jobs_module.job_state(tmp_path, stale) == "done"  # the new run has no record to differ


def test_a_failing_job_reports_its_error(tmp_path, monkeypatch):
    job = TrainJob("LinearToy", "ERM", 0, 2, 10, 5)
    monkeypatch.setattr(jobs_module.subprocess, "run",
                        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "Traceback\nValueError: bad"))
    (outcome,) = jobs_module.run_jobs(tmp_path, [job], workers=1, runner="subprocess")
    assert outcome.error.endswith("ValueError: bad\n(exit status 1)")
    assert jobs_module.job_state(tmp_path, job) == "to do"


def _records_without_timing(run) -> list[dict]:
    """A run's results.jsonl without what differs between two identical runs (time, memory, paths)."""
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in ("args", "step_time", "mem_gb")} for record in records]


@pytest.mark.parametrize("dataset,test_env,hparams", [
    ("LinearToy", 2, {}),
    ("CdSprites5", 5, {"cdsprites_per_domain": 24, "batch_size": 4, "fish_warmup_steps": 2}),
])
def test_a_forked_job_trains_exactly_as_a_new_python_does(domainbed, tmp_path, dataset, test_env, hparams):
    """The fork server runs DomainBed's train script with the same arguments and thread count
    as ``python -m domainbed.scripts.train``: the same records, step for step."""
    assert jobs_module.default_job_runner() == "forkserver"  # Linux has it: the default here
    job = TrainJob(dataset, "Fish", 0, test_env, 7, 3, hparams)
    runs = {}
    for runner in ("forkserver", "subprocess"):
        outcome = jobs_module.run_job(tmp_path / runner, job, threads=1, runner=runner)
        assert outcome.error is None, outcome.error
        runs[runner] = _records_without_timing(jobs_module.run_dir(tmp_path / runner, job))
    assert [r["step"] for r in runs["forkserver"]] == [0, 3, 6]
    assert runs["forkserver"] == runs["subprocess"]


def test_a_forked_job_writes_nothing_of_its_own_to_stderr(domainbed):
    """A failed job's report quotes its stderr: the fork server's start of the preloaded
    module must not add a warning of its own there."""
    status, stderr = jobs_module._run_forked(["--help"], threads=1)
    assert (status, stderr) == (0, "")


def test_a_fork_server_that_dies_while_starting_a_job_fails_that_job_only(tmp_path, monkeypatch):
    """Killing the fork server mid-run made the next job's start raise EOFError out of
    run_jobs: the command ended with a traceback and the queued jobs never ran."""
    import multiprocessing.context

    first, second = TrainJob("LinearToy", "ERM", 0, 2, 10, 5), TrainJob("LinearToy", "ERM", 1, 2, 10, 5)
    started = []

    def start(process):
        started.append(process._args[0][process._args[0].index("--output_dir") + 1])
        if len(started) == 1:
            raise EOFError("unexpected EOF")
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(jobs_module, "import_domainbed", lambda *a: None)
    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "start", start)
    outcomes = jobs_module.run_jobs(tmp_path, [first, second], workers=1, runner="forkserver")
    assert started == [str(jobs_module.run_dir(tmp_path, job)) for job in (first, second)]
    assert [o.error.splitlines() for o in outcomes] == [
        ["the fork server ended while starting the job (EOFError('unexpected EOF')); run the same command again",
         "(exit status 1)"],
        ["the fork server ended while starting the job (ConnectionRefusedError(111, 'Connection refused')); "
         "run the same command again", "(exit status 1)"]]


@pytest.mark.parametrize("runner", jobs_module.JOB_RUNNERS)
def test_a_failing_job_reports_the_train_scripts_error(domainbed, tmp_path, runner):
    """DomainBed's train script sends its stderr to err.txt and stdout, not to the process's
    stderr: the outcome must still carry the plugin's message naming the problem and the fix."""
    job = TrainJob("LinearToy", "Fish", 0, 2, 4, 2, {"fish_epsilon": "half"})
    (outcome,) = jobs_module.run_jobs(tmp_path, [job], workers=1, runner=runner)
    last_lines = outcome.error.splitlines()[-2:]
    assert last_lines[0].startswith("ValueError: hyperparameter 'fish_epsilon' = 'half' is invalid")
    assert "Fix it in --hparams" in last_lines[0] and last_lines[1] == "(exit status 1)"
    assert jobs_module.job_state(tmp_path, job) == "to do"
    if runner == "subprocess":
        return
    # relaunched with a valid value, the same directory is cleared and the job completes
    fixed = TrainJob("LinearToy", "Fish", 0, 2, 4, 2, {"fish_epsilon": "meta_lr"})
    (outcome,) = jobs_module.run_jobs(tmp_path, [fixed], workers=1, runner="forkserver")
    assert outcome.error is None and jobs_module.job_state(tmp_path, fixed) == "done"


def test_an_interrupt_stops_the_queued_jobs_and_a_rerun_finishes_them(domainbed, tmp_path):
    jobs = [TrainJob("LinearToy", "ERM", seed, 2, 1, 1) for seed in range(4)]

    def interrupt(outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jobs_module.run_jobs(tmp_path, jobs, workers=1, progress=interrupt, runner="forkserver")
    started = [job for job in jobs if jobs_module.run_dir(tmp_path, job).exists()]
    assert jobs[0] in started and len(started) <= 2  # the first, and the one already running
    outcomes = jobs_module.run_jobs(tmp_path, jobs, workers=1, runner="forkserver")
    assert len(outcomes) == len(jobs) - len(started) and all(o.error is None for o in outcomes)
    assert all(jobs_module.job_state(tmp_path, job) == "done" for job in jobs)


def test_a_job_another_process_is_training_is_left_alone_with_the_fix(tmp_path, monkeypatch):
    """A live process holding the job's lock (say, a job that outlived a killed invocation)
    owns the directory: the job is not started there, nothing in it is touched, and the error
    names the process and what to do."""
    job = TrainJob("LinearToy", "ERM", 0, 2, 10, 5)
    directory = jobs_module.run_dir(tmp_path, job)
    directory.mkdir(parents=True)
    (directory / "results.jsonl").write_text('{"step": 0}\n')
    monkeypatch.setattr(jobs_module.subprocess, "run", lambda *a, **kw: pytest.fail("the job was started"))
    with JobLock(directory):
        assert jobs_module.job_state(tmp_path, job) == "running"
        (outcome,) = jobs_module.run_jobs(tmp_path, [job], workers=1, runner="subprocess")
    assert f"is being trained by another process (pid {os.getpid()})" in outcome.error
    assert f"kill {os.getpid()}), then run the same command again" in outcome.error
    assert (directory / "results.jsonl").read_text() == '{"step": 0}\n'
    assert jobs_module.job_state(tmp_path, job) == "to do"  # the lock went with its holder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="recognised from /proc (Linux)")
def test_a_job_domainbeds_train_script_trains_without_the_lock_is_left_alone(tmp_path, monkeypatch):
    """DomainBed's train script run by hand (or by DomainBed's own launcher) on a job's directory
    takes no lock: the job is still 'running', and is neither cleared nor started, nor, for a
    control an earlier version trained in runs/, moved."""
    job = TrainJob("LinearToy", "ERM", 0, 2, 10, 5)
    control = next(job for job in get_preset("default").jobs() if job.label)
    directory = jobs_module.run_dir(tmp_path, job)
    for path in (directory, tmp_path / "runs" / control.name):
        path.mkdir(parents=True)
        (path / "results.jsonl").write_text('{"step": 0}\n')
    monkeypatch.setattr(jobs_module.subprocess, "run", lambda *a, **kw: pytest.fail("the job was started"))
    trainers = [domainbed_train_without_lock(tmp_path, f"runs/{name}") for name in (job.name, control.name)]
    try:
        deadline = time.monotonic() + 30
        while jobs_module.job_state(tmp_path, job) != "running":
            assert time.monotonic() < deadline, "the train process was not recognised"
            time.sleep(0.1)
        (outcome,) = jobs_module.run_jobs(tmp_path, [job], workers=1, runner="subprocess")
        assert jobs_module.move_controls_out_of_runs(tmp_path, [control]) == []
    finally:
        for trainer in trainers:
            trainer.kill()
            trainer.wait()
    assert f"is being trained by another process (pid {trainers[0].pid}), for example DomainBed's train " \
           f"script run on it directly; nothing was changed there" in outcome.error
    assert (directory / "results.jsonl").read_text() == '{"step": 0}\n'
    assert jobs_module.job_state(tmp_path, job) == "to do"
    assert jobs_module.move_controls_out_of_runs(tmp_path, [control]) == [tmp_path / "controls" / control.name]


def test_dry_run_shows_an_earlier_versions_control_in_runs_by_its_state_there(domainbed, tmp_path, capsys):
    """--dry_run moves nothing, so a finished control an earlier version left in runs/ is
    listed as done there (the next run moves it and does not train it), not as to do."""
    control = next(job for job in get_preset("default").jobs() if job.label)
    old = tmp_path / "runs" / control.name
    old.mkdir(parents=True)
    (old / "done").write_text("done")
    assert reproduction_main.main(["--preset", "default", "--output_dir", str(tmp_path), "--dry_run"]) == 0
    assert f"done    {control.name} (in runs/; a run without --dry_run moves it to {tmp_path / 'controls'})" \
        in capsys.readouterr().out.splitlines()
    assert old.is_dir() and not (tmp_path / "controls").exists()


def test_a_job_finished_by_another_invocation_after_the_plan_is_kept(tmp_path, monkeypatch):
    """Two invocations on one directory: a job planned as 'to do' that the other one has
    finished by the time it gets its turn is kept, not cleared and trained again."""
    job = TrainJob("LinearToy", "ERM", 0, 2, 10, 5)
    directory = jobs_module.run_dir(tmp_path, job)
    directory.mkdir(parents=True)
    (directory / "results.jsonl").write_text('{"step": 9}\n')
    (directory / "done").write_text("done")
    monkeypatch.setattr(jobs_module.subprocess, "run", lambda *a, **kw: pytest.fail("the job was started"))
    outcome = jobs_module.run_job(tmp_path, job, threads=1, runner="subprocess")
    assert outcome.error is None
    assert (directory / "results.jsonl").read_text() == '{"step": 9}\n'


def test_a_job_locked_just_after_a_state_check_is_not_cleared(tmp_path, monkeypatch):
    """Another process may take the lock between a check that found it free and the clearing
    of the directory: the clearing happens under the lock, so that process's files stay."""
    job = TrainJob("LinearToy", "ERM", 0, 2, 10, 5)
    directory = jobs_module.run_dir(tmp_path, job)
    directory.mkdir(parents=True)
    (directory / "results.jsonl").write_text('{"step": 0}\n')
    monkeypatch.setattr(jobs_module, "is_locked", lambda _: False)  # the check saw it free
    monkeypatch.setattr(jobs_module.subprocess, "run", lambda *a, **kw: pytest.fail("the job was started"))
    with JobLock(directory):
        outcome = jobs_module.run_job(tmp_path, job, threads=1, runner="subprocess")
    assert "is being trained by another process" in outcome.error
    assert (directory / "results.jsonl").read_text() == '{"step": 0}\n'


def test_a_job_whose_lock_is_a_directory_fails_with_the_fix_and_the_others_run(tmp_path, monkeypatch):
    """A damaged job directory fails that job with what to remove, not the command with an
    IsADirectoryError traceback; nothing in it is touched, and the next job still runs."""
    from domainbed_fish.lockfile import LOCK_NAME

    damaged, other = TrainJob("LinearToy", "ERM", 0, 2, 10, 5), TrainJob("LinearToy", "ERM", 1, 2, 10, 5)
    directory = jobs_module.run_dir(tmp_path, damaged)
    (directory / LOCK_NAME).mkdir(parents=True)
    (directory / "results.jsonl").write_text('{"step": 0}\n')
    started = []

    def train(command, **kwargs):
        started.append(command[command.index("--output_dir") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(jobs_module.subprocess, "run", train)
    assert jobs_module.job_state(tmp_path, damaged) == "to do"
    outcomes = {o.job.name: o for o in jobs_module.run_jobs(tmp_path, [damaged, other], workers=1, runner="subprocess")}
    lock = directory / LOCK_NAME
    assert outcomes[damaged.name].error == (
        f"the job's lock file {lock} is a directory, which no process can lock (a damaged job directory); "
        f"remove it (rm -r '{lock}') and run the same command again")
    assert started == [str(jobs_module.run_dir(tmp_path, other))]
    assert (directory / "results.jsonl").read_text() == '{"step": 0}\n' and lock.is_dir()


_KILLED_LAUNCHER = """
import sys
from pathlib import Path
from domainbed_fish.reproduction import jobs
from domainbed_fish.reproduction.presets import TrainJob
jobs.run_jobs(Path(sys.argv[1]), [TrainJob("LinearToy", "ERM", 0, 2, 10**7, 10**7)], workers=1, runner=sys.argv[2])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("runner", jobs_module.JOB_RUNNERS)
def test_a_killed_reproduction_takes_its_running_jobs_with_it(domainbed, tmp_path, runner):
    """SIGKILL gives the command no chance to clean up; its train jobs must not train on as
    orphans (a relaunch would find them holding their directories)."""
    job = TrainJob("LinearToy", "ERM", 0, 2, 10**7, 10**7)
    directory = jobs_module.run_dir(tmp_path, job)
    launcher = subprocess.Popen([PYTHON, "-c", _KILLED_LAUNCHER, str(tmp_path), runner], env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not ((directory / "out.txt").exists() and is_locked(directory)):  # DomainBed's train is running
            assert launcher.poll() is None and time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        trainer = holder_pid(directory)
        assert trainer not in (None, launcher.pid) and is_alive(trainer)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 30
    while is_locked(directory):
        assert time.monotonic() < deadline, f"the train job (pid {trainer}) outlived the killed command"
        time.sleep(0.2)
    assert jobs_module.job_state(tmp_path, job) == "to do"


_SCRIPT_CALLING_RUN_JOBS = """
from pathlib import Path
from domainbed_fish.reproduction import jobs
from domainbed_fish.reproduction.presets import TrainJob
def main():
    (outcome,) = jobs.run_jobs(Path({out!r}), [TrainJob("LinearToy", "ERM", 0, 2, 3, 2)], workers=1)
    print("ERROR:", outcome.error)
{call}
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_calling_run_jobs_without_the_main_guard_is_told_the_fix(domainbed, tmp_path, guarded):
    """Forked jobs import the calling script first; unguarded, each job fails before the train
    script starts, and the outcome must say why and what to do instead of a bare exit status."""
    call = 'if __name__ == "__main__":\n    main()' if guarded else "main()"
    script = tmp_path / "my_reproduction.py"
    script.write_text(_SCRIPT_CALLING_RUN_JOBS.format(out=str(tmp_path / "out"), call=call))
    proc = subprocess.run([PYTHON, str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    error = [line for line in proc.stdout.splitlines() if line.startswith("ERROR:")]
    if guarded:
        assert error == ["ERROR: None"], proc.stdout + proc.stderr
        return
    assert len(error) == 1 and "before DomainBed's train script started" in error[0], proc.stdout + proc.stderr
    assert 'put the call under `if __name__ == "__main__":`' in error[0] and 'runner="subprocess"' in error[0]
    assert "bootstrapping phase" in proc.stderr  # Python's own message, on the launcher's terminal


def test_an_unknown_job_runner_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown job runner 'spawn': choose one of \['forkserver', 'subprocess'\]"):
        jobs_module.run_job(tmp_path, TrainJob("LinearToy", "ERM", 0, 2, 4, 2), threads=1, runner="spawn")


def _acc_entry(acc):
    return {"selected_acc": (acc, 0.0), "final_acc": (acc, 0.0), "runs": 3}


def test_targets_read_the_summary():
    entry = _acc_entry
    summary = {
        "cdsprites": {"Fish": {"5": entry(0.55), "15": entry(0.93), "30": entry(0.8)},
                      "IDGM": {"15": entry(0.88)}, "ERM": {"15": entry(0.52)}},
        "toy": {"ERM": {"heldout_acc": (0.569, 0)}, "Fish": {"heldout_acc": (0.932, 0)},
                "IDGM": {"heldout_acc": (0.932, 0)}},
        "gip_n15": {"ERM": {"0": (0.1, 0), "50": (0.2, 0)}, "Fish": {"0": (0.1, 0), "50": (2.0, 0)}},
    }
    checks = {what: holds for what, _, holds in targets(summary)}
    assert checks["CdSprites15 Fish >= 90% (training-domain validation)"] is True
    assert checks["CdSprites15 IDGM >= 90% (end of training)"] is False
    assert checks["CdSprites15 ERM <= 60% (end of training)"] is True
    assert checks["Fish at N=30 ≥ Fish at N=5 + 20 points (end of training)"] is True
    assert checks["Ĝ over training at N=15: Fish > ERM (mean over checkpoints)"] is True
    assert checks["toy held-out accuracy, ERM ≈ 57%"] is True


def test_targets_hold_at_their_bounds():
    """DomainBed's accuracies are counts over a split (900 of 1,000 is exactly 0.9): a bound
    reached is met, for the ≥ checks and ERM's ≤ alike."""
    summary = {"cdsprites": {"Fish": {"5": _acc_entry(0.25), "15": _acc_entry(0.9), "30": _acc_entry(0.45)},
                             "IDGM": {"15": _acc_entry(0.9)}, "ERM": {"15": _acc_entry(0.6)}},
               "toy": {"Fish": {"heldout_acc": (0.9, 0)}, "IDGM": {"heldout_acc": (0.9, 0)}}, "gip_n15": {}}
    checks = targets(summary)
    assert len(checks) == 10 and all(holds is True for _, _, holds in checks), checks


def test_summary_is_mean_and_standard_error_over_seeds_of_each_measure():
    """Each number of report.json from the runs it summarises, as (mean, SE over seeds) with
    DomainBed's SE (population std / √n): the toy's end-of-training held-out accuracy and weights,
    CdSprites' selected and final accuracies, Ĝ and the cosine per step (columns 1 and 2 of the
    trace); and the minutes per job, a mean over seeds."""
    import numpy as np

    from domainbed_fish.reproduction.report import RunResult, summarise

    def mean_se(values):
        return pytest.approx((np.mean(values), np.std(values) / np.sqrt(len(values))))

    results = []
    for seed, (selected, final, minutes) in enumerate([(0.9, 0.6, 1.0), (0.7, 0.8, 2.0), (0.5, 0.4, 6.0)]):
        results.append(RunResult(TrainJob(f"CdSprites{GIP_TRACE_N}", "Fish", seed, GIP_TRACE_N, 16, 5), selected,
                                 final, 15, 60 * minutes, gip=[(0, 0.1 * seed, 0.5), (5, 1.0 + seed, 0.9 - 0.1 * seed)]))
        results.append(RunResult(TrainJob("LinearToy", "ERM", seed, 2, 301, 100), selected, final, 300, 1.0,
                                 weights={"shared": seed, "domain1": 1.0, "domain2": 1.0, "heldout": 0.0, "bias": 0.0}))
    summary = summarise(get_preset("quick"), results)
    fish = summary["cdsprites"]["Fish"][str(GIP_TRACE_N)]
    assert fish["selected_acc"] == mean_se([0.9, 0.7, 0.5]) and fish["final_acc"] == mean_se([0.6, 0.8, 0.4])
    assert fish["runs"] == 3 and fish["per_seed_final"] == [0.6, 0.8, 0.4]
    toy = summary["toy"]["ERM"]
    assert toy["heldout_acc"] == mean_se([0.6, 0.8, 0.4]) and toy["weights"]["shared"] == mean_se([0, 1, 2])
    assert summary["gip_n15"] == {"Fish": {"0": mean_se([0, 0.1, 0.2]), "5": mean_se([1, 2, 3])}}
    assert summary["cosine_n15"] == {"Fish": {"0": mean_se([0.5] * 3), "5": mean_se([0.9, 0.8, 0.7])}}
    compute = summary["compute"]
    assert compute["cdsprites_train_minutes_per_job"] == {"Fish": {str(GIP_TRACE_N): pytest.approx(3.0)}}
    assert compute["train_minutes"] == pytest.approx(9.0 + 3 / 60)


def test_the_report_and_figures_show_each_measure_in_its_place(tmp_path, monkeypatch):
    """The Markdown tables and the data of Figures 4 and 5, from a summary whose every number
    differs: each mean ± SE in its row and column, and the checks' verdicts."""
    import matplotlib.axes

    from domainbed_fish.reproduction.report import write_figures

    summary = {
        "toy": {"ERM": {"heldout_acc": (0.6, 0.05), "runs": 3, "weights": {
            "shared": (1.5, 0.1), "domain1": (0.25, 0.0), "domain2": (-0.75, 0.0), "heldout": (0.0, 0.0),
            "bias": (0.5, 0.0)}}},
        "cdsprites": {"Fish": {"15": {"selected_acc": (0.931, 0.012), "final_acc": (0.5, 0.004), "runs": 3}}},
        "gip_n15": {"Fish": {"0": (0.125, 0.01), "50": (2.5, 0.5)}},
        "cosine_n15": {"Fish": {"0": (0.25, 0.01), "50": (0.75, 0.05)}},
    }
    lines = render_markdown(get_preset("default"), summary, []).splitlines()
    for expected in ["| ERM | 60.0 ± 5.0 | 1.50 | 0.25 | -0.75 | 0.00 | 0.50 | 3 |",
                     "| Fish | Ĝ | 0.125 | 2.5 |", "| Fish | cosine | 0.25 | 0.75 |",
                     "| CdSprites15 Fish >= 90% (training-domain validation) | 93.1% | yes |",
                     "| CdSprites15 Fish >= 90% (end of training) | 50.0% | no |",
                     "| CdSprites15 IDGM >= 90% (end of training) | — | — |"]:
        assert expected in lines, expected
    selected, final = (lines[lines.index(f"## CdSprites-N: accuracy (%) on the decorrelated environment, {title}") + 4]
                       for title in ("training-domain validation", "end of training"))
    assert (selected, final) == ("| Fish | — | 93.1 ± 1.2 (3) | — |", "| Fish | — | 50.0 ± 0.4 (3) | — |")

    drawn = []
    originals = {name: getattr(matplotlib.axes.Axes, name) for name in ("errorbar", "plot")}
    for name, original in originals.items():
        def record(ax, *args, _name=name, _original=original, **kwargs):
            drawn.append((_name, kwargs.get("label"), [list(map(float, a)) for a in args[:2]],
                          [float(e) for e in kwargs.get("yerr", [])]))
            return _original(ax, *args, **kwargs)
        monkeypatch.setattr(matplotlib.axes.Axes, name, record)
    write_figures(summary, tmp_path)
    assert [d for d in drawn if d[1] == "Fish"] == [
        ("errorbar", "Fish", [[15.0], [pytest.approx(93.1)]], [pytest.approx(1.2)]),  # Figure 4: selected
        ("plot", "Fish", [[0.0, 50.0], [0.125, 2.5]], []),  # Figure 5: Ĝ, not the cosine
    ]


@pytest.mark.parametrize("cut", ["report.md", "figure4_accuracy_vs_n.png", "figure5_gip_n15.png"])
def test_a_report_cut_short_while_writing_keeps_the_earlier_files_whole(domainbed, tmp_path, monkeypatch, cut):
    """A SIGKILL while the report was drawn left figure4 as an empty file (and report.md can be
    cut the same way): each file is now the earlier one or the new one, never a part of one."""
    import matplotlib.figure

    from domainbed_fish.reproduction.report import write_report

    preset = get_preset("quick")
    write_report(tmp_path, preset)
    earlier = {name: (tmp_path / name).read_bytes() for name in REPORT_FILES}
    real_write_text, real_savefig = Path.write_text, matplotlib.figure.Figure.savefig

    def cut_short(path, write, *args, **kwargs):
        name = path.name.split(".tmp")[0]
        if name != cut:
            return write(path, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(b"\x89PNG" if name.endswith(".png") else b"# Gradient")  # the start of the file
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(Path, "write_text", lambda path, *a, **kw: cut_short(path, real_write_text, *a, **kw))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, *a, **kw: cut_short(Path(path), lambda p, *a, **kw: real_savefig(fig, p, *a, **kw),
                                                              *a, **kw))
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path, preset, ["a later invocation"])
    assert (tmp_path / cut).read_bytes() == earlier[cut]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)  # nothing half-written beside


def test_collect_reads_the_selected_and_the_last_checkpoints_accuracy(domainbed, tmp_path):
    """The selected accuracy is training-domain validation's (the checkpoint whose training domains'
    out-splits are best: step 5; the oracle would take the last), the final one the test
    environment's in-split at the last step (not its out-split, not the first step)."""
    from domainbed_fish.reproduction.report import collect

    job = TrainJob("CdSprites5", "ERM", 0, 5, 11, 5)

    def record(step, val, test_in, test_out):
        r = {"args": {"dataset": job.dataset, "algorithm": job.algorithm, "test_envs": [5], "hparams_seed": 0,
                      "trial_seed": 0}, "step": step, "step_time": 0.5}
        for env in range(5):
            r[f"env{env}_in_acc"], r[f"env{env}_out_acc"] = 0.5, val
        r["env5_in_acc"], r["env5_out_acc"] = test_in, test_out
        return r

    run = jobs_module.run_dir(tmp_path, job)
    run.mkdir(parents=True)
    records = [record(0, 0.3, 0.1, 0.2), record(5, 0.9, 0.7, 0.3), record(10, 0.6, 0.6, 0.95)]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "done").write_text("done")
    (result,), missing = collect(tmp_path, [job, TrainJob("CdSprites5", "ERM", 1, 5, 11, 5)])
    assert (result.selected_acc, result.final_acc, result.final_step) == (0.7, 0.6, 10)
    assert result.train_seconds == pytest.approx(0.5 * 11) and [j.seed for j in missing] == [1]


def test_training_seconds_weight_each_checkpoints_step_time_by_the_steps_it_covers():
    # DomainBed logs at steps 0, 5, 10 and the last (15 of 16): step 0 alone, then 5 steps each
    records = [{"step": 10, "step_time": 0.5}, {"step": 0, "step_time": 3.0},
               {"step": 15, "step_time": 0.25}, {"step": 5, "step_time": 1.0}]
    assert training_seconds(records) == pytest.approx(3.0 + 5 * 1.0 + 5 * 0.5 + 5 * 0.25)
    assert training_seconds([]) == 0.0


def test_the_report_states_the_least_time_the_training_steps_allow():
    preset = get_preset("default")
    summary = {"toy": {}, "cdsprites": {}, "gip_n15": {}, "cosine_n15": {},
               "compute": {"train_minutes": 121.0, "toy_train_minutes": 1.5,
                           "cdsprites_train_minutes_per_job": {"IDGM": {"15": 5.5, "30": 11.2}}}}
    report = render_markdown(preset, summary, [])
    assert "| IDGM | — | 5.5 | 11.2 |" in report
    assert "add up to 121.0 min (the toy's 1.5)" in report
    assert "60.5 min two at a time" in report


def test_quick_reproduction_runs_through_domainbed_and_writes_the_report(domainbed, tmp_path):
    out = tmp_path / "reproduction"
    command = [PYTHON, "-m", "domainbed_fish.reproduction", "--quick", "--output_dir", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "report.json").read_text())
    assert summary["missing"] == []
    assert set(summary["cdsprites"]) == {"ERM", "CORAL", "Fish", "IDGM"}
    assert set(summary["cdsprites"]["Fish"]) == {"5", "15"}
    assert set(summary["gip_n15"]) == {"ERM", "Fish", "IDGM"}
    assert set(summary["toy"]) == {"ERM", "Fish", "IDGM"}
    for entry in summary["toy"].values():
        assert 0.0 <= entry["heldout_acc"][0] <= 1.0
        assert entry["weights"]["heldout"] == [0.0, 0.0]  # never trained: stays at its zero init (mean, SE)
    report = (out / "report.md").read_text()
    assert "| Fish |" in report and "## The paper's findings, as measured here" in report
    assert "this invocation ran 11 of the 11 jobs in" in report
    assert f"; {cpu_model()} (" in report  # the processor, which the preset's time depends on
    by_run = [[json.loads(line) for line in path.open()] for path in (out / "runs").glob("*/results.jsonl")]
    assert len(by_run) == 11
    expected_minutes = sum(map(training_seconds, by_run)) / 60
    assert expected_minutes > 0
    assert summary["compute"]["train_minutes"] == pytest.approx(expected_minutes)
    jobs = {job.name: job for job in get_preset("quick").jobs()}
    for path in (out / "runs").glob("*/results.jsonl"):
        assert sum(1 for _ in path.open()) == jobs[path.parent.name].evaluations, path
    assert "11/11 jobs" in proc.stderr  # the progress bar, paced by the jobs' estimated compute
    assert "## Compute" in report
    assert (out / "figure4_accuracy_vs_n.png").read_bytes()[:4] == b"\x89PNG"
    # DomainBed's own collect_results reads the runs
    collected = subprocess.run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir", str(out / "runs")],
                               capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env())
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert "CdSprites15" in collected.stdout and "IDGM" in collected.stdout
    # running again finds everything done and only rewrites the report
    again = subprocess.run([*command, "--dry_run"], capture_output=True, text=True, timeout=600, cwd=REPO,
                           env=subprocess_env())
    assert "11 jobs, 11 already done" in again.stdout
    from domainbed_fish.reproduction.gip_trace import TRACE_FILE

    (trace, *_) = sorted((out / "runs").glob(f"*/{TRACE_FILE}"))
    whole = trace.read_text()
    trace.write_text(whole[: len(whole) // 2])  # what a report killed while writing it left before
    rewritten = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert rewritten.returncode == 0, rewritten.stderr[-3000:]
    assert json.loads(trace.read_text()) == json.loads(whole)  # measured again
    assert "ran 0 of the 11 jobs in" in (out / "report.md").read_text()
    assert "(11 were already done, from an earlier invocation)" in (out / "report.md").read_text()


def test_cpu_model_is_the_processors_name_where_linux_gives_it():
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.partition(":")[2].strip() for line in cpuinfo.read_text().splitlines()
             if line.partition(":")[0].strip() == "model name"] if cpuinfo.exists() else []
    if names and names[0]:
        assert cpu_model() == names[0]
    else:  # other systems, or a Linux without the field (some ARM kernels)
        assert cpu_model() in (platform.processor(), platform.machine()) and cpu_model()


def test_alignment_is_the_gip_and_the_mean_pairwise_cosine():
    from conftest import domain_minibatches, tiny_net
    from test_gradients import brute_force_gip

    from domainbed_fish.gradients import per_domain_gradients, per_domain_losses
    from domainbed_fish.reproduction.gip_trace import alignment

    net, batches = tiny_net(), domain_minibatches(num_domains=3)
    grads = per_domain_gradients(per_domain_losses(net, batches), list(net.parameters()))
    flat = [torch.cat([t.flatten() for t in g]) for g in grads]
    cosines = [torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0) for i, j in ((0, 1), (0, 2), (1, 2))]
    gip, cosine = alignment(net, batches)
    assert gip == pytest.approx(brute_force_gip(grads).item())
    assert cosine == pytest.approx(torch.stack(cosines).mean().item())
    assert alignment(net, [batches[0]] * 3)[1] == pytest.approx(1.0)  # identical batches: aligned


def test_probe_minibatches_come_from_the_training_environments_only(domainbed):
    """Ĝ is over the training domains: the held-out environment (here the first) is never probed."""
    from domainbed import datasets, hparams_registry

    from domainbed_fish.reproduction.gip_trace import probe_minibatches

    hparams = {**hparams_registry.default_hparams("ERM", "LinearToy"), "toy_per_domain": 40}
    batches = probe_minibatches("LinearToy", hparams, test_env=0, per_domain=8)
    environments = datasets.get_dataset_class("LinearToy")(None, [0], hparams)
    assert len(batches) == 2
    for (x, y), env in zip(batches, [environments[1], environments[2]], strict=True):
        xs, ys = env.tensors
        assert len(x) == 8 and all(((xs == row) & (ys == label)[:, None]).all(1).any() for row, label in zip(x, y))
    heldout_inputs = environments[0].tensors[0][:, 1]  # the coordinate only environment 0 sets
    assert heldout_inputs.any() and not any(x[:, 1].any() for x, _ in batches)


def test_the_trace_is_in_step_order_and_cached(tmp_path, monkeypatch):
    """Checkpoints by their step as a number (``model_step100`` after ``model_step50``), the final
    ``model.pkl`` left out, probed on the run's training environments; a second call reads the cache."""
    from domainbed_fish.reproduction import gip_trace

    for name in ("model_step100.pkl", "model_step50.pkl", "model_step5.pkl", "model.pkl"):
        (tmp_path / name).write_bytes(b"")
    loaded = []
    monkeypatch.setattr(gip_trace.torch, "load", lambda path, **kw: loaded.append(path.name) or {
        "args": {"dataset": "LinearToy", "test_envs": [2]}, "model_hparams": {}, "name": path.name})
    probed = []
    monkeypatch.setattr(gip_trace, "probe_minibatches", lambda *args: probed.append(args) or "batches")
    monkeypatch.setattr(gip_trace, "network_from_checkpoint", lambda checkpoint: checkpoint["name"])
    monkeypatch.setattr(gip_trace, "alignment", lambda network, batches: (float(len(network)), 0.5))
    expected = [(5, 15.0, 0.5), (50, 16.0, 0.5), (100, 17.0, 0.5)]
    assert gip_trace.measure_trace(tmp_path) == expected
    assert loaded == ["model_step5.pkl", "model_step50.pkl", "model_step100.pkl"]
    assert probed == [("LinearToy", {}, 2, 64)]  # the run's held-out environment, once
    assert gip_trace.measure_trace(tmp_path) == expected and len(loaded) == 3


def test_missing_domainbed_is_one_clear_error(tmp_path):
    env = {k: v for k, v in subprocess_env().items() if k not in ("DOMAINBED_DIR", "PYTHONPATH")}
    proc = subprocess.run([PYTHON, "-m", "domainbed_fish.reproduction", "--quick", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: DomainBed was not found") and "DOMAINBED_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
