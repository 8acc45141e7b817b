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
    for fewer in (["--repeats", "1"], ["--domains", "2"], ["--resnet-batch", "1"], ["--algorithms", "ERM", "Fish"],
                  ["--batch", "16"], ["--resnet-domains", "3"], ["--resnet-repeats", "1"], ["--warmup", "1"],
                  ["--resnet-warmup", "2"], ["--threads", "2"]):
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
               "--domains", "5", "--steps", "4", "--every", "2", "--threads", "1",
               "--hparams", json.dumps({"cdsprites_per_domain": 20, "batch_size": 4, "idgm_penalty_bound": 0.5})]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("step")]
    assert [int(line.split()[1]) for line in lines] == [0, 2, 3]  # every 2nd step, and the last
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


@requires_domainbed
def test_step_time_hparams_turn_off_what_the_benchmark_does_not_time() -> None:
    step_time = load_benchmark("step_time")
    nets = step_time.NETWORKS
    fish = step_time.hparams_for("Fish", nets["cdsprites"])
    assert (fish["gip_every"], fish["fish_warmup_steps"]) == (0, 0)  # no Ĝ diagnostic, no ERM warm-up
    assert step_time.hparams_for("IDGM", nets["mnist"])["idgm_penalty_anneal_iters"] == 0
    # torchvision's ResNet-18/50, not the AugMix ResNet-50 DomainBed picks by default
    for key, resnet18 in (("resnet18", True), ("resnet50", False)):
        hparams = step_time.hparams_for("ERM", nets[key])
        assert (hparams["resnet18"], hparams["resnet50_augmix"]) == (resnet18, False), key


@requires_domainbed
def test_step_time_builds_every_algorithm_on_the_same_weights() -> None:
    step_time = load_benchmark("step_time")
    net, cpu = step_time.NETWORKS["mnist"], torch.device("cpu")
    erm = step_time.build("ERM", net, 3, cpu)
    torch.rand(100)  # whatever ran in between
    fish = step_time.build("Fish", net, 3, cpu)
    for a, b in zip(erm.network.state_dict().values(), fish.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@requires_domainbed
def test_step_time_floor_is_fishs_inner_steps_on_a_copy(monkeypatch) -> None:
    """The floor's S plain steps are the inner loop of a Fish step from the same weights: with ε = meta_lr,
    Fish's θ' = θ + ε(θ̃ − θ) for θ̃ the floor's weights."""
    step_time = load_benchmark("step_time")
    net, cpu = step_time.NETWORKS["mnist"], torch.device("cpu")
    fish = step_time.build("Fish", net, 3, cpu)
    config = fish.fish.config
    assert (config.epsilon, config.meta_steps, config.random_order) == ("meta_lr", None, False)
    minibatches = step_time.make_minibatches(net, 3, 4, cpu)
    floor_params: list[list[torch.Tensor]] = []
    real_make_optimizer = step_time.make_optimizer

    def recording_make_optimizer(name, params, *args):
        floor_params.append(params := list(params))
        return real_make_optimizer(name, params, *args)

    monkeypatch.setattr(step_time, "make_optimizer", recording_make_optimizer)
    theta = [p.detach().clone() for p in fish.network.parameters()]
    step_time.fish_floor(fish, minibatches)()
    for p, before in zip(fish.network.parameters(), theta, strict=True):
        assert torch.equal(p, before)  # the floor trained a copy
    fish.update(minibatches)
    for p, before, inner in zip(fish.network.parameters(), theta, floor_params[0], strict=True):
        torch.testing.assert_close(p.detach(), before + config.meta_lr * (inner.detach() - before))


def test_step_time_case_times_each_algorithm_in_rotating_rounds(monkeypatch) -> None:
    """Stand-in algorithms that take known times on a stand-in clock."""
    step_time = load_benchmark("step_time")
    seconds = {"ERM": 1.0, "FishDomainBed": 4.0, "Fish": 3.0, step_time.FLOOR: 2.0}
    now, log, rss_asked = [0.0], [], []

    def timed(name: str):
        def call(*_) -> None:
            log.append(name)
            now[0] += seconds[name]
        return call

    class StandIn:
        def __init__(self, name: str) -> None:
            self.update = timed(name)

    monkeypatch.setattr(step_time, "build", lambda name, *_: StandIn(name))
    monkeypatch.setattr(step_time, "fish_floor", lambda *_: timed(step_time.FLOOR))
    monkeypatch.setattr(step_time, "time", type("Clock", (), {"process_time": staticmethod(lambda: now[0]),
                                                              "perf_counter": staticmethod(lambda: now[0])}))
    monkeypatch.setattr(step_time, "rss_in_fresh_process", lambda *args: rss_asked.append(args[-1]) or 7)
    rows = step_time.run_case(step_time.NETWORKS["mnist"], 3, 2, 4, 2, ["ERM", "FishDomainBed", "Fish"],
                              torch.device("cpu"), rss=True)

    E, D, F, L = "ERM", "FishDomainBed", "Fish", step_time.FLOOR
    assert log[:8] == [E, E, D, D, F, F, L, L]  # --warmup 2 each, untimed
    assert log[8:] == [E, D, F, L, D, F, L, E, F, L, E, D, L, E, D, F]  # round k starts k places on
    got = {r["algorithm"]: (r["median_s"], r["times_s"], r["vs_erm"], r["vs_floor"], r["rss_peak_bytes"])
           for r in rows}
    assert got == {E: (1.0, [1.0] * 4, 1.0, None, 7), D: (4.0, [4.0] * 4, 4.0, 2.0, 7),
                   F: (3.0, [3.0] * 4, 3.0, 1.5, 7), L: (2.0, [2.0] * 4, 2.0, 1.0, None)}
    assert rss_asked == [E, D, F]  # the floor is no algorithm to start a process for


def test_step_time_targets_are_judged_on_their_own_cases_and_bounds() -> None:
    step_time = load_benchmark("step_time")
    mnist, r18, r50 = "MNIST_CNN 1×28×28", "ResNet-18 3×224×224", "ResNet-50 3×224×224"
    linear = 10 / 3 * 1.1  # the S = 10 over S = 3 bound, exactly

    def row(network: str, s: int, b: int, algorithm: str, vs_erm: float, vs_floor: float | None = None,
            median_s: float = 1.0) -> dict:
        return {"network": network, "S": s, "batch": b, "algorithm": algorithm, "vs_erm": vs_erm,
                "vs_floor": vs_floor, "median_s": median_s, "tensor_peak_bytes": 2**20}

    cpu_rows = [row(mnist, 3, 32, "FishDomainBed", 2.0, 1.2), row(mnist, 3, 32, "Fish", 1.5, 1.05),
                row(mnist, 3, 32, "IDGM", 3.5), row(mnist, 10, 32, "IDGM", 3.6, median_s=linear),
                row(mnist, 3, 16, "IDGM", 9.0),  # not the normal batch: no target
                row(r18, 3, 8, "IDGM", 3.6), row(r18, 10, 8, "IDGM", 3.0, median_s=4.0), row(r18, 3, 1, "IDGM", 2.0)]
    assert step_time.check_targets(cpu_rows, {False: 32, True: 8}, torch.device("cpu")) == [
        f"- Fish ≤ 1.05 × floor, {mnist} S=3 b=32: 1.050 (built-in 1.200): holds",
        f"- Fish memory ≤ built-in, {mnist} S=3 b=32: 1.0 vs 1.0 MiB (+0 bytes): holds",
        f"- IDGM ≤ 3.5 × ERM, {mnist} S=3 b=32: 3.50: holds",
        f"- IDGM ≤ 3.5 × ERM, {mnist} S=10 b=32: 3.60: MISSED",
        f"- IDGM linear in S, {mnist} b=32: S=10 / S=3 = 3.67 (at most 3.67): holds",
        f"- IDGM ≤ 3.5 × ERM, {r18} S=3 b=8: 3.60: MISSED",
        f"- IDGM ≤ 3.5 × ERM, {r18} S=10 b=8: 3.00: holds",
        f"- IDGM linear in S, {r18} b=8: S=10 / S=3 = 4.00 (at most 3.67): MISSED",
    ]
    # On a GPU: no CPU-time targets; the GPU target is ResNet-50's alone.
    gpu_rows = [row(r50, 3, 32, "FishDomainBed", 2.0, 1.2), row(r50, 3, 32, "Fish", 1.3, 1.5),
                row(r18, 3, 32, "Fish", 1.0, 1.0), row(r50, 3, 8, "IDGM", 9.0)]
    assert step_time.check_targets(gpu_rows, {False: 32, True: 8}, torch.device("cuda")) == [
        f"- Fish memory ≤ built-in, {r50} S=3 b=32: 1.0 vs 1.0 MiB (+0 bytes): holds",
        f"- GPU: Fish ≤ 1.3 × ERM, {r50} S=3 b=32: 1.30 (built-in 2.00): holds",
    ]


@requires_domainbed
def test_step_time_runs_the_grid_of_its_options_then_the_cases(monkeypatch, capsys) -> None:
    """main's cases, rounds and RSS choice, read off a stand-in run_case."""
    step_time = load_benchmark("step_time")
    ran, reports = [], []
    monkeypatch.setattr(step_time, "patch_torchvision_resnets", lambda: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads alone
    monkeypatch.setattr(step_time, "run_case", lambda network, s, b, repeats, warmup, names, device, rss:
                        ran.append((network.label, s, b, repeats, warmup, rss)) or [])
    monkeypatch.setattr(step_time, "report", lambda args, device, rows, startup, seconds, partial:
                        reports.append((args.whole_grid, partial)) or "")

    def main(*argv: str) -> None:
        ran.clear()
        reports.clear()
        monkeypatch.setattr(sys, "argv", ["step_time.py", "--startup-runs", "0", *argv])
        step_time.main()

    main()  # the default grid: every network; the ResNets at their batches, rounds and no RSS
    small = [(step_time.NETWORKS[key].label, s, 32, 15, 2, True) for key in ("mnist", "cdsprites") for s in (3, 5, 10)]
    big = [(step_time.NETWORKS[key].label, s, b, 3, 1, False)
           for key in ("resnet18", "resnet50") for b in (8, 1) for s in (3, 5, 10)]
    assert ran == small + big
    assert reports == [(True, f"partial: {k} of 18 cases") for k in range(1, 18)] + [(True, None)]

    main("--networks", "resnet18", "--domains", "4", "--resnet-domains", "2", "--resnet-batch", "2", "--batch", "16",
         "--resnet-repeats", "5", "--resnet-warmup", "3", "--cases", "mnist:7:5", "--rss", "all")
    assert ran == [("ResNet-18 3×224×224", 2, 2, 5, 3, True), ("MNIST_CNN 1×28×28", 7, 5, 15, 2, True)]
    assert reports == [(False, "partial: 1 of 2 cases"), (False, None)]
    main("--cases", "cdsprites:5:4")  # just that case, not the grid as well
    assert ran == [("CdSprites CNN 3×64×64", 5, 4, 15, 2, True)]

    with pytest.raises(SystemExit):
        main("--cases", "resnet34:3:8")
    assert "--cases 'resnet34:3:8': expected NETWORK:S:BATCH" in capsys.readouterr().err


def test_learning_curve_holds_out_a_fifth_of_each_domain() -> None:
    learning_curve = load_benchmark("cdsprites_learning_curve")
    x, y = torch.arange(20.0)[:, None], torch.arange(20)
    (train_x, train_y), (val_x, val_y) = learning_curve.split(x, y, torch.Generator().manual_seed(0))
    assert (len(train_y), len(val_y)) == (16, 4)  # DomainBed's holdout fraction, 0.2
    assert sorted(train_y.tolist() + val_y.tolist()) == list(range(20))
    assert torch.equal(train_x[:, 0].long(), train_y) and torch.equal(val_x[:, 0].long(), val_y)


@requires_domainbed
def test_learning_curve_setup_layers_the_hparams_and_seeds_everything() -> None:
    learning_curve = load_benchmark("cdsprites_learning_curve")
    # the preset's 1,000 sprites over CdSprites' default 2,000; --hparams over the preset's batch of 32
    dataset, _, hparams, _ = learning_curve.setup("ERM", 5, 0, '{"batch_size": 4}')
    assert (hparams["cdsprites_per_domain"], hparams["batch_size"], len(dataset[0])) == (1000, 4, 1000)
    draws = []
    for seed in (3, 3, 4):
        *_, generator = learning_curve.setup("ERM", 5, seed, '{"cdsprites_per_domain": 20}')
        draws.append((torch.rand(3), torch.rand(3, generator=generator)))
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1], strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(draws[0], draws[2], strict=True))  # another seed, other draws


@requires_domainbed
def test_memory_format_builds_both_layouts_on_cdsprites_defaults_and_the_same_weights() -> None:
    from domainbed_fish.locate import import_domainbed

    memory_format = load_benchmark("cdsprites_memory_format")
    # S = 3 has no CdSprites-3: the smallest CdSprites' defaults, not DomainBed's generic ones
    defaults = import_domainbed("hparams_registry").default_hparams("ERM", "CdSprites5")
    models = [memory_format.build("ERM", 3, 4, layout) for layout in memory_format.LAYOUTS.values()]
    for model in models:
        assert model.hparams == {**defaults, "batch_size": 4}
    torch.rand(1)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_memory_format_compare_alternates_and_reports_channels_last_over_nchw(monkeypatch, capsys) -> None:
    memory_format = load_benchmark("cdsprites_memory_format")
    now, log = [0.0], []

    def takes(name: str, seconds: float):
        def call() -> None:
            log.append(name)
            now[0] += seconds
        return call

    monkeypatch.setattr(memory_format, "time", type("Clock", (), {"process_time": staticmethod(lambda: now[0])}))
    memory_format.compare("case", {"NCHW": takes("NCHW", 2.0), "channels-last": takes("channels-last", 1.0)}, 4)
    assert capsys.readouterr().out == "| case | 2000.0 | 1000.0 | 0.50 |\n"
    firsts = log[::2]
    assert firsts.count("NCHW") == firsts.count("channels-last") == 2  # neither always runs first
