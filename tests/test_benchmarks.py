"""The benchmarks time the steps they name: Fish's and IDGM's own, not a warm-up's ERM step."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import requires_domainbed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL_NETWORKS = ["mnist", "cdsprites"]  # the ResNets take the same hyperparameter path


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def assert_first_update_is_a_fish_step(algorithm: torch.nn.Module, minibatches) -> None:
    algorithm.update(minibatches)
    assert algorithm.fish.inner_optimizer.state, "the first update took no inner Fish step"
    assert not algorithm.fish.warmup_optimizer.state, "the first update was an ERM warm-up step"


@requires_domainbed
@pytest.mark.parametrize("network", SMALL_NETWORKS)
def test_step_time_runs_fish_and_idgm_from_their_first_update(network: str) -> None:
    step_time = load_benchmark("step_time")
    net = step_time.NETWORKS[network]
    cpu = torch.device("cpu")
    minibatches = step_time.make_minibatches(net, 3, 4, cpu)

    assert_first_update_is_a_fish_step(step_time.build("Fish", net, 3, cpu), minibatches)
    stats = step_time.build("IDGM", net, 3, cpu).update(minibatches)
    assert stats["penalty_weight"] > 0, "IDGM's first update had no penalty (annealing)"


@requires_domainbed
def test_memory_format_benchmark_runs_fish_from_its_first_update() -> None:
    memory_format = load_benchmark("cdsprites_memory_format")
    torch.manual_seed(0)
    minibatches = [(torch.rand(4, 3, 64, 64), torch.randint(0, 2, (4,))) for _ in range(3)]
    for layout in memory_format.LAYOUTS.values():
        assert_first_update_is_a_fish_step(memory_format.build("Fish", 3, 4, layout), minibatches)


@requires_domainbed
@pytest.mark.parametrize("algorithm", ["ERM", "Fish", "IDGM"])
def test_memory_format_benchmark_puts_every_network_the_step_runs_in_its_layout(algorithm) -> None:
    """Fish's inner steps run on its inner copy, which is not a submodule."""
    from domainbed_fish.networks import CdSpritesCNN

    memory_format = load_benchmark("cdsprites_memory_format")
    for layout in memory_format.LAYOUTS.values():
        model = memory_format.build(algorithm, 3, 4, layout)
        inner = getattr(getattr(model, "fish", None), "inner_network", torch.nn.Identity())
        cnns = [m for m in (*model.modules(), *inner.modules()) if isinstance(m, CdSpritesCNN)]
        assert len(cnns) == (2 if algorithm == "Fish" else 1)
        for cnn in cnns:
            assert cnn.MEMORY_FORMAT == layout
            assert all(p.is_contiguous(memory_format=layout) for p in cnn.parameters() if p.dim() == 4)


@requires_domainbed
def test_step_time_subset_leaves_the_whole_grid_table_alone(tmp_path: Path) -> None:
    grid_table = tmp_path / "step_time_cpu.md"
    grid_table.write_text("the whole grid\n")
    command = [sys.executable, str(BENCHMARKS / "step_time.py"), "--cases", "mnist:2:4", "--algorithms", "ERM",
               "Fish", "--repeats", "1", "--warmup", "1", "--startup-runs", "0", "--rss", "none",
               "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert grid_table.read_text() == "the whole grid\n"
    subset = (tmp_path / "step_time_cpu_subset.md").read_text()
    assert "| MNIST_CNN 1×28×28 | 2 | 4 | Fish |" in subset
    assert json.loads((tmp_path / "step_time_cpu_subset.json").read_text())["args"]["cases"] == ["mnist:2:4"]


@requires_domainbed
def test_step_time_writes_the_table_of_record_only_for_a_finished_run_of_the_default_grid(tmp_path: Path) -> None:
    step_time = load_benchmark("step_time")
    parser = step_time.build_parser()
    every_network = [(key, 3, 32) for key in step_time.NETWORKS]
    assert step_time.is_record_run(parser, parser.parse_args([]), every_network)
    for fewer in (["--repeats", "1"], ["--domains", "2"], ["--resnet-batch", "1"], ["--algorithms", "ERM", "Fish"]):
        assert not step_time.is_record_run(parser, parser.parse_args(fewer), every_network), fewer
    assert not step_time.is_record_run(parser, parser.parse_args([]), every_network[:-1])

    args = parser.parse_args(["--out", str(tmp_path)])
    args.whole_grid = True
    (tmp_path / "step_time_cpu.md").write_text("the record\n")
    step_time.report(args, torch.device("cpu"), [], None, 1.0, "partial: 1 of 4 cases")
    assert (tmp_path / "step_time_cpu.md").read_text() == "the record\n"  # a stopped run leaves it alone
    assert "partial: 1 of 4 cases" in (tmp_path / "step_time_cpu_partial.md").read_text()
    step_time.report(args, torch.device("cpu"), [], None, 2.0, None)
    assert (tmp_path / "step_time_cpu.md").read_text() != "the record\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_time_cpu.json", "step_time_cpu.md"]


@pytest.mark.parametrize(("device", "extra", "verdict"), [
    ("cpu", 4 * 15, "holds"), ("cpu", 4 * 15 + 1, "MISSED"),
    ("cuda", 512 * 15, "holds"), ("cuda", 512 * 15 + 1, "MISSED"),
])
def test_fish_memory_check_allows_its_loss_scalars_and_no_more(device: str, extra: int, verdict: str) -> None:
    """Fish may hold its S loss scalars beyond the built-in's peak: 4 bytes each on a CPU,
    a 512-byte block each under CUDA's caching allocator (an H200 measured +7,168 bytes at S=15)."""
    step_time = load_benchmark("step_time")
    rows = [{"network": "net", "S": 15, "batch": 32, "algorithm": name, "tensor_peak_bytes": peak,
             "vs_floor": None, "vs_erm": None, "median_s": 1.0}
            for name, peak in (("FishDomainBed", 10**6), ("Fish", 10**6 + extra))]
    lines = step_time.check_targets(rows, {False: 32, True: 8}, torch.device(device))
    assert lines == [f"- Fish memory ≤ built-in, net S=15 b=32: 1.0 vs 1.0 MiB (+{extra} bytes): {verdict}"]


def test_race_grid_runs_seed_by_seed_across_settings_and_refuses_twin_settings() -> None:
    race = load_benchmark("cdsprites_race")
    grid = [{"label": "a", "algorithm": "Fish", "n": 5, "steps": 11, "seeds": 2},
            {"label": "b", "algorithm": "ERM", "n": 15, "steps": 11, "seeds": [1, 4]}]
    jobs = race.grid_jobs(grid)
    assert [(label, job.seed) for label, job in jobs] == [("a", 0), ("a", 1), ("b", 1), ("b", 4)]
    _, job = jobs[2]
    assert (job.dataset, job.test_env, job.steps) == ("CdSprites15", 15, 11)
    assert job.hparams == race.BASE_HPARAMS  # the default preset's sizes
    with pytest.raises(SystemExit, match="run the same jobs"):
        race.grid_jobs([grid[0], {**grid[0], "label": "c"}])


def test_race_grid_errors_name_the_setting_and_the_fix(tmp_path: Path) -> None:
    race = load_benchmark("cdsprites_race")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"label": "a", "algorithm": "Fish", "n": 15, "seed": 3, "steps": 11}]))
    with pytest.raises(SystemExit, match=r"setting 'a' lacks \['seeds'\]; has unknown keys \['seed'\]"):
        race.load_grid(grid)
    grid.write_text('{"label": "a"}')
    with pytest.raises(SystemExit, match="expected a JSON list of settings"):
        race.load_grid(grid)
    grid.write_text("[{")
    with pytest.raises(SystemExit, match="must be a JSON list of settings"):
        race.load_grid(grid)


def test_every_committed_race_grid_loads() -> None:
    race = load_benchmark("cdsprites_race")
    grids = sorted((BENCHMARKS / "grids").glob("*.json"))
    assert grids
    for path in grids:
        assert race.grid_jobs(race.load_grid(path)), path


def test_race_only_takes_labels_that_contain_commas(capsys) -> None:
    race = load_benchmark("cdsprites_race")
    labels = ["ERM, 401 steps", "Fish lr 2e-3 b1 0.5, 401 steps"]
    assert race.main(["--grid", str(BENCHMARKS / "grids" / "n15_race.json"), "--runs_dir", "unused", "--summary",
                      str(BENCHMARKS / "results" / "cdsprites_race_cuda.jsonl"), "--only", *labels,
                      "--table_only"]) == 0
    rows = [line.split(" | ")[0].removeprefix("| ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert sorted(rows) == sorted(labels)


def test_race_table_counts_wins_and_losses_per_setting() -> None:
    race = load_benchmark("cdsprites_race")
    grid = [{"label": "a"}, {"label": "b"}]
    lines = [{"label": "a", "seed": s, "selected": acc, "train_seconds": 10.0}
             for s, acc in enumerate([0.95, 0.50, 0.92])]
    rows = race.table(lines, grid).splitlines()
    # DomainBed's standard error: the population standard deviation over √n (20.6 / √3)
    assert rows[2] == "| a | 3 | 79.0 ± 11.9 | 2 | 1 | 0 | 95 50 92 | 10 |"
    assert rows[3] == "| b | 0 | | | | 0 | | |"


def test_race_table_counts_a_diverged_seed_as_a_seed_outside_the_mean() -> None:
    race = load_benchmark("cdsprites_race")
    lines = [{"label": "a", "seed": 0, "selected": 0.95, "train_seconds": 10.0},
             {"label": "a", "seed": 1, "selected": None, "train_seconds": 4.0, "diverged": "IDGM: non-finite"},
             {"label": "a", "seed": 2, "selected": 0.55, "train_seconds": 20.0},
             {"label": "b", "seed": 0, "selected": None, "train_seconds": 1.0, "diverged": "IDGM: non-finite"}]
    rows = race.table(lines, [{"label": "a"}, {"label": "b"}]).splitlines()
    assert rows[2] == "| a | 3 | 75.0 ± 14.1 | 1 | 1 | 1 | 95 ✗ 55 | 15 |"  # SE of 95 and 55: 20 / √2
    assert rows[3] == "| b | 1 | | | | 1 | ✗ | |"


def test_race_tells_a_divergence_from_a_failure_to_retry() -> None:
    race = load_benchmark("cdsprites_race")
    tail = ("Traceback (most recent call last):\n  File \"idgm.py\", line 246, in update\n"
            "domainbed_fish.errors.NonFiniteLossError: IDGM: non-finite loss (nan) at update step 2 on "
            "the step.\n(exit status 1)")
    assert race.divergence(tail) == "IDGM: non-finite loss (nan) at update step 2 on the step."
    assert race.divergence("MemoryError\n(exit status -9)") is None


@requires_domainbed
def test_race_records_a_diverged_job_and_does_not_run_it_again(tmp_path: Path) -> None:
    # Unbounded IDGM with SGD at lr 1e4 goes NaN within a few steps; ERM beside it finishes.
    blowup = {"cdsprites_per_domain": 20, "batch_size": 4, "idgm_optimizer": "sgd", "lr": 1e4,
              "idgm_gamma": 1.0, "idgm_penalty_bound": math.inf}
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([
        {"label": "blowup", "algorithm": "IDGM", "n": 5, "steps": 6, "checkpoint_freq": 1, "seeds": 1,
         "hparams": blowup},
        {"label": "erm", "algorithm": "ERM", "n": 5, "steps": 3, "checkpoint_freq": 1, "seeds": 1,
         "hparams": {"cdsprites_per_domain": 20, "batch_size": 4}},
    ]))
    summary = tmp_path / "race.jsonl"
    command = [sys.executable, str(BENCHMARKS / "cdsprites_race.py"), "--grid", str(grid), "--runs_dir",
               str(tmp_path / "runs"), "--summary", str(summary), "--workers", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "FAILED" not in run.stderr, run.stderr
    lines = {line["label"]: line for line in map(json.loads, summary.read_text().splitlines())}
    assert lines["blowup"]["selected"] is None and "non-finite" in lines["blowup"]["diverged"]
    assert 1 <= len(lines["blowup"]["curve"]) < 7  # the checkpoints written before the NaN
    assert lines["erm"]["selected"] is not None and "diverged" not in lines["erm"]
    assert "| blowup | 1 | | | | 1 | ✗ | |" in run.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 jobs to run" in again.stdout, again.stdout + again.stderr
    assert len(summary.read_text().splitlines()) == 2


@requires_domainbed
def test_race_runs_through_domainbeds_train_script_and_resumes(tmp_path: Path) -> None:
    grid = tmp_path / "grid.json"
    tiny = {"cdsprites_per_domain": 20, "batch_size": 4}
    grid.write_text(json.dumps([
        {"label": "fish", "algorithm": "Fish", "n": 5, "steps": 6, "checkpoint_freq": 5, "seeds": 1,
         "hparams": {**tiny, "fish_warmup_steps": 2}},
        {"label": "erm", "algorithm": "ERM", "n": 5, "steps": 6, "checkpoint_freq": 5, "seeds": [1], "hparams": tiny},
    ]))
    command = [sys.executable, str(BENCHMARKS / "cdsprites_race.py"), "--grid", str(grid),
               "--runs_dir", str(tmp_path / "runs"), "--summary", str(tmp_path / "race.jsonl"),
               "--workers", "2", "--runner", "subprocess"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in (tmp_path / "race.jsonl").read_text().splitlines()]
    assert sorted((line["label"], line["seed"]) for line in lines) == [("erm", 1), ("fish", 0)]
    for line in lines:
        assert [point["step"] for point in line["curve"]] == [0, 5]
        assert 0.0 <= line["selected"] <= 1.0 and line["n"] == 5
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.startswith("0 jobs to run"), again.stdout
    assert len((tmp_path / "race.jsonl").read_text().splitlines()) == 2
    # a setting edited under its label runs again; its old line stays in the file, out of the table
    settings = json.loads(grid.read_text())
    settings[0]["steps"] = 7
    grid.write_text(json.dumps(settings))
    edited = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert edited.returncode == 0, edited.stderr
    assert edited.stdout.startswith("1 lines of") and "\n1 jobs to run" in edited.stdout, edited.stdout
    lines = [json.loads(line) for line in (tmp_path / "race.jsonl").read_text().splitlines()]
    assert sorted((line["label"], line["steps"]) for line in lines) == [("erm", 6), ("fish", 6), ("fish", 7)]
    assert re.search(r"^\| fish \| 1 \|", edited.stdout, re.M), edited.stdout


@requires_domainbed
@pytest.mark.parametrize("algorithm", ["IDGM", "ERM"])
def test_learning_curve_prints_idgms_penalty_and_only_idgms(algorithm: str) -> None:
    command = [sys.executable, str(BENCHMARKS / "cdsprites_learning_curve.py"), "--algorithm", algorithm,
               "--domains", "5", "--steps", "3", "--every", "1", "--threads", "1",
               "--hparams", json.dumps({"cdsprites_per_domain": 20, "batch_size": 4, "idgm_penalty_bound": 0.5})]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 3
    for line in lines:
        fields = line.split()
        if algorithm == "ERM":
            assert "gamma_t" not in fields
            continue
        nll, gip, gamma_t = (float(fields[fields.index(name) + 1]) for name in ("nll", "gip", "gamma_t"))
        assert 0.0 < nll < 5.0 and math.isfinite(gip)
        assert 0.0 < gamma_t <= 0.1  # CdSprites' IDGM: penalty from step 0, γ = 0.1 at most


@requires_domainbed
def test_learning_curve_reports_a_diverged_run_on_one_line_and_fails() -> None:
    # Unbounded IDGM with SGD at lr 1e4: NaN losses within a few steps (at update step 2 here).
    hparams = {"cdsprites_per_domain": 20, "batch_size": 4, "idgm_optimizer": "sgd", "lr": 1e4,
               "idgm_gamma": 1.0, "idgm_penalty_bound": math.inf}
    command = [sys.executable, str(BENCHMARKS / "cdsprites_learning_curve.py"), "--algorithm", "IDGM",
               "--domains", "5", "--steps", "6", "--every", "1", "--threads", "1", "--hparams", json.dumps(hparams)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stdout.splitlines()[-1]
    assert last.startswith("step") and "diverged" in last and "non-finite" in last, run.stdout
    diverged_at = int(last.split()[1])
    assert 0 < diverged_at < 6
    assert len([line for line in run.stdout.splitlines() if line.startswith("step")]) == diverged_at + 1


def test_race_table_counts_exactly_90_as_a_win_and_exactly_60_as_a_loss() -> None:
    """The table's columns are '≥ 90%' and '≤ 60%': a seed ending on either edge counts."""
    race = load_benchmark("cdsprites_race")
    lines = [{"label": "a", "seed": s, "selected": acc, "train_seconds": 10.0}
             for s, acc in enumerate([0.90, 0.60, 0.75])]
    rows = race.table(lines, [{"label": "a"}]).splitlines()
    # SE: population std √150 over √3 = 7.07
    assert rows[2] == "| a | 3 | 75.0 ± 7.1 | 1 | 1 | 0 | 90 60 75 | 10 |"


def test_race_grid_refuses_a_missing_or_shared_label_and_an_unknown_only(tmp_path: Path) -> None:
    race = load_benchmark("cdsprites_race")
    setting = {"label": "a", "algorithm": "Fish", "n": 5, "steps": 11, "seeds": 1}
    grid = tmp_path / "grid.json"
    for settings in ([setting, {**setting, "n": 15}],  # the label twice: their lines would mix in the table
                     [{k: v for k, v in setting.items() if k != "label"}]):
        grid.write_text(json.dumps(settings))
        with pytest.raises(SystemExit, match="every setting needs its own 'label'"):
            race.load_grid(grid)
    grid.write_text(json.dumps([setting]))
    with pytest.raises(SystemExit, match=r"--only names settings not in .*: \['b'\]; it has \['a'\]"):
        race.load_grid(grid, {"a", "b"})
    assert race.load_grid(grid, {"a"}) == [setting]


def test_race_setting_hparams_go_over_the_default_presets_sizes() -> None:
    race = load_benchmark("cdsprites_race")
    assert race.BASE_HPARAMS == {"cdsprites_per_domain": 1000, "batch_size": 32}  # the module doc's sizes
    [(_, job)] = race.grid_jobs([{"label": "a", "algorithm": "Fish", "n": 5, "steps": 11, "seeds": 1,
                                  "hparams": {"batch_size": 8, "lr": 0.01}}])
    assert job.hparams == {"cdsprites_per_domain": 1000, "batch_size": 8, "lr": 0.01}


def test_race_reads_the_error_off_a_traceback_that_shows_the_raise() -> None:
    """A real traceback quotes the line that raised, which names the error too; the message is
    the exception's own line, the last one that names it."""
    race = load_benchmark("cdsprites_race")
    tail = ("Traceback (most recent call last):\n  File \"idgm.py\", line 257, in _check_finite\n"
            "    raise NonFiniteLossError(\"IDGM\", self.num_updates, domain, float(values[bad]), what)\n"
            "domainbed_fish.errors.NonFiniteLossError: IDGM: non-finite loss (nan) at update step 2.\n"
            "(exit status 1)")
    assert race.divergence(tail) == "IDGM: non-finite loss (nan) at update step 2."


@requires_domainbed
def test_race_summary_line_of_a_job_reads_its_checkpoints(tmp_path: Path) -> None:
    """Selected: the test accuracy at the best mean validation accuracy of the training domains
    (0 … N − 1, never the decorrelated environment N); final: the last checkpoint's."""
    from domainbed_fish.reproduction.jobs import run_dir
    from domainbed_fish.reproduction.presets import TrainJob

    race = load_benchmark("cdsprites_race")
    job = TrainJob("CdSprites2", "ERM", 3, 2, 10, 5, {"batch_size": 4}, label="erm")

    def record(step: int, val0: float, val1: float, decorrelated_out: float, test: float, loss: float,
               step_time: float) -> dict:
        return {"step": step, "args": {"test_envs": [2]}, "env0_out_acc": val0, "env1_out_acc": val1,
                "env2_out_acc": decorrelated_out, "env0_in_acc": 0.5, "env1_in_acc": 0.5, "env2_in_acc": test,
                "loss": loss, "step_time": step_time}

    # written out of order; with env 2's held-out accuracy, step 9 would be the best (0.83 > 0.6)
    records = [record(5, 0.9, 0.8, 0.1, 0.7, 0.3, 0.5), record(0, 0.5, 0.5, 0.5, 0.5, 0.7, 1.0),
               record(9, 0.8, 0.7, 1.0, 0.6, 0.2, 0.25)]
    run = run_dir(tmp_path, job)
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    line = race.job_summary("erm", job, tmp_path)
    assert line["curve"] == [{"step": 0, "test": 0.5, "loss": 0.7, "val": 0.5},
                             {"step": 5, "test": 0.7, "loss": 0.3, "val": 0.85},
                             {"step": 9, "test": 0.6, "loss": 0.2, "val": 0.75}]
    assert (line["selected"], line["final"]) == (0.7, 0.6)
    assert line["train_seconds"] == 4.5  # 1.0 s × 1 step + 0.5 s × 5 + 0.25 s × 4
    assert (line["label"], line["algorithm"], line["n"], line["seed"], line["steps"], line["hparams"]) == (
        "erm", "ERM", 2, 3, 10, {"batch_size": 4})
    assert "diverged" not in line

    diverged = race.job_summary("erm", job, tmp_path, "ERM: non-finite loss")
    assert (diverged["selected"], diverged["final"], diverged["diverged"]) == (None, None, "ERM: non-finite loss")
    assert diverged["curve"] == line["curve"]
