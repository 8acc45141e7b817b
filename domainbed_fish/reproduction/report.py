"""The reproduction report: Markdown tables, the paper's Figures 4 and 5, and JSON.

Accuracies are DomainBed's: the test environment's ``in`` split, at the
checkpoint chosen by DomainBed's training-domain validation
(``IIDAccuracySelectionMethod``) and at the end of training.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainbed_fish.files import write_text_atomic
from domainbed_fish.locate import import_domainbed
from domainbed_fish.report import mean_se
from domainbed_fish.reproduction.gip_trace import measure_trace, network_from_checkpoint
from domainbed_fish.reproduction.jobs import job_state, run_dir
from domainbed_fish.reproduction.presets import GIP_TRACE_ALGORITHMS, GIP_TRACE_N, Preset, TrainJob
from domainbed_fish.results import read_jsonl

REPORT_FILES = ("report.md", "report.json", "figure4_accuracy_vs_n.png", "figure5_gip_n15.png")


@dataclass
class RunResult:
    job: TrainJob
    selected_acc: float  # training-domain validation
    final_acc: float  # end of training
    final_step: int
    train_seconds: float = 0.0  # DomainBed's training steps only (:func:`training_seconds`)
    weights: dict[str, float] | None = None  # linear toy only
    gip: list[tuple[int, float, float]] = field(default_factory=list)  # (step, Ĝ, cosine)


def _selected_acc(records: list[dict[str, Any]]) -> float:
    model_selection = import_domainbed("model_selection")
    query = import_domainbed("lib.query")
    return float(model_selection.IIDAccuracySelectionMethod.run_acc(query.Q(records))["test_acc"])


def training_seconds(records: Sequence[dict[str, Any]]) -> float:
    """Seconds a run spent in DomainBed's training steps: Σ over checkpoints of ``step_time × steps``.

    DomainBed's train script logs at each checkpoint ``step_time``, the mean wall time of the
    training steps since the previous checkpoint (minibatch fetch and ``update()``, not the
    evaluation), so the record at step s covers steps prev+1 … s, the first one step 0 alone.
    With one thread per job this is the run's training compute in core-seconds.
    """
    total, previous = 0.0, -1
    for record in sorted(records, key=lambda r: r["step"]):
        total += float(record["step_time"]) * (int(record["step"]) - previous)
        previous = int(record["step"])
    return total


def toy_weights(run: Path) -> dict[str, float]:
    """The trained linear model as logit differences (class 1 − class 0) per input coordinate."""
    checkpoint = torch.load(run / "model.pkl", map_location="cpu", weights_only=False)
    linear = [m for m in network_from_checkpoint(checkpoint).modules() if isinstance(m, torch.nn.Linear)]
    (layer,) = linear
    w = (layer.weight[1] - layer.weight[0]).tolist()
    b = (layer.bias[1] - layer.bias[0]).item()
    return {"shared": w[0], "domain1": w[1], "domain2": w[2], "heldout": w[3], "bias": b}


def collect(output_dir: Path, jobs: Sequence[TrainJob]) -> tuple[list[RunResult], list[TrainJob]]:
    """Results of the finished jobs, and the jobs that have none (stale runs count as none)."""
    results, missing = [], []
    for job in jobs:
        run = run_dir(output_dir, job)
        records = read_jsonl(run / "results.jsonl") if job_state(output_dir, job) == "done" else []
        if not records:
            missing.append(job)
            continue
        last = max(records, key=lambda r: r["step"])
        result = RunResult(job, _selected_acc(records), float(last[f"env{job.test_env}_in_acc"]), int(last["step"]),
                           training_seconds(records))
        if job.dataset == "LinearToy":
            result.weights = toy_weights(run)
        if job.save_every_checkpoint:
            result.gip = measure_trace(run)
        results.append(result)
    return results, missing


def _group(results: Sequence[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for result in results:
        groups[result.job.dataset, result.job.row].append(result)
    return groups


def _gip_by_algorithm(results: Sequence[RunResult], column: int) -> dict[str, dict[int, list[float]]]:
    traces: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        for entry in result.gip:
            traces[result.job.row][entry[0]].append(entry[column])
    return traces


def summarise(preset: Preset, results: Sequence[RunResult]) -> dict[str, Any]:
    """Every number of the report, as plain data (written to ``report.json``)."""
    groups = _group(results)
    toy = {}
    for run in preset.toy_runs:
        runs = groups.get(("LinearToy", run.row), [])
        if runs:
            toy[run.row] = {
                "heldout_acc": mean_se([r.final_acc for r in runs]),
                "weights": {k: mean_se([r.weights[k] for r in runs]) for k in runs[0].weights},
                "runs": len(runs),
            }
    cdsprites: dict[str, dict[str, Any]] = defaultdict(dict)
    for n in preset.cdsprites_sizes:
        for algorithm in preset.cdsprites_algorithms:
            runs = groups.get((f"CdSprites{n}", algorithm), [])
            if runs:
                cdsprites[algorithm][str(n)] = {
                    "selected_acc": mean_se([r.selected_acc for r in runs]),
                    "final_acc": mean_se([r.final_acc for r in runs]),
                    "runs": len(runs),
                    "per_seed_selected": [r.selected_acc for r in runs],
                    "per_seed_final": [r.final_acc for r in runs],
                }
    gip, cosine = (
        {algorithm: {str(step): mean_se(values) for step, values in sorted(steps.items())}
         for algorithm, steps in _gip_by_algorithm(results, column).items()}
        for column in (1, 2)
    )
    train_minutes: dict[str, dict[str, float]] = defaultdict(dict)
    for algorithm in preset.cdsprites_algorithms:
        for n in preset.cdsprites_sizes:
            if runs := groups.get((f"CdSprites{n}", algorithm)):
                train_minutes[algorithm][str(n)] = float(np.mean([r.train_seconds for r in runs])) / 60
    compute = {
        "train_minutes": sum(r.train_seconds for r in results) / 60,
        "toy_train_minutes": sum(r.train_seconds for r in results if r.job.dataset == "LinearToy") / 60,
        "cdsprites_train_minutes_per_job": dict(train_minutes),
    }
    return {"preset": preset.name, "toy": toy, "cdsprites": dict(cdsprites), "gip_n15": gip,
            "cosine_n15": cosine, "compute": compute}


def targets(summary: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The paper's qualitative findings as checks: (what, measured, holds); None when not measured."""
    cds, toy, gip = summary["cdsprites"], summary["toy"], summary["gip_n15"]
    cosine = summary.get("cosine_n15", {})
    checks: list[tuple[str, str, bool | None]] = []

    def acc(algorithm: str, n: int, which: str) -> float | None:
        entry = cds.get(algorithm, {}).get(str(n))
        return entry[which][0] if entry else None

    for which, label in (("selected_acc", "training-domain validation"), ("final_acc", "end of training")):
        for algorithm, bound, sense in (("Fish", 0.9, ">="), ("IDGM", 0.9, ">="), ("ERM", 0.6, "<=")):
            value = acc(algorithm, 15, which)
            holds = None if value is None else (value >= bound if sense == ">=" else value <= bound)
            shown = "—" if value is None else f"{100 * value:.1f}%"
            checks.append((f"CdSprites15 {algorithm} {sense} {100 * bound:.0f}% ({label})", shown, holds))
        fish5, fish30 = acc("Fish", 5, which), acc("Fish", 30, which)
        if fish5 is not None and fish30 is not None:
            checks.append((f"Fish at N=30 ≥ Fish at N=5 + 20 points ({label})",
                           f"{100 * (fish30 - fish5):+.1f} points", fish30 - fish5 >= 0.2))
    for trace, measure in ((gip, "Ĝ"), (cosine, "gradient cosine")):
        if "ERM" not in trace:
            continue
        erm = np.mean([v[0] for v in trace["ERM"].values()])
        for algorithm in ("Fish", "IDGM"):
            if algorithm in trace:
                value = np.mean([v[0] for v in trace[algorithm].values()])
                checks.append((f"{measure} over training at N=15: {algorithm} > ERM (mean over checkpoints)",
                               f"{value:.3g} vs {erm:.3g}", bool(value > erm)))
    for algorithm, wanted in (("Fish", "≥ 90%"), ("IDGM", "≥ 90%"), ("ERM", "≈ 57%")):
        if algorithm in toy:
            value = toy[algorithm]["heldout_acc"][0]
            holds = value >= 0.9 if wanted.startswith("≥") else abs(value - 0.57) <= 0.05
            checks.append((f"toy held-out accuracy, {algorithm} {wanted}", f"{100 * value:.1f}%", holds))
    return checks


def _savefig_atomic(fig: Any, path: Path) -> None:
    """``fig.savefig`` through a file beside ``path`` and ``os.replace``: a command killed
    while drawing leaves the earlier figure (or none), not an empty or truncated PNG."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_figures(summary: dict[str, Any], output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for algorithm, by_n in summary["cdsprites"].items():
        ns = sorted(by_n, key=int)
        means = [100 * by_n[n]["selected_acc"][0] for n in ns]
        errors = [100 * by_n[n]["selected_acc"][1] for n in ns]
        ax.errorbar([int(n) for n in ns], means, yerr=errors, marker="o", capsize=3, label=algorithm)
    ax.set(xlabel="number of training domains N", ylabel="accuracy on the decorrelated split (%)",
           title="CdSprites-N (training-domain validation)")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.legend()
    fig.tight_layout()
    _savefig_atomic(fig, output_dir / "figure4_accuracy_vs_n.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for algorithm in GIP_TRACE_ALGORITHMS:
        steps = summary["gip_n15"].get(algorithm)
        if not steps:
            continue
        xs = [int(s) for s in steps]
        means = np.array([v[0] for v in steps.values()])
        errors = np.array([v[1] for v in steps.values()])
        ax.plot(xs, means, marker="o", label=algorithm)
        ax.fill_between(xs, means - errors, means + errors, alpha=0.2)
    ax.set(xlabel="training step", ylabel="gradient inner product Ĝ", title=f"CdSprites-{GIP_TRACE_N}")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.legend()
    fig.tight_layout()
    _savefig_atomic(fig, output_dir / "figure5_gip_n15.png")
    plt.close(fig)


def render_markdown(preset: Preset, summary: dict[str, Any], missing: Sequence[TrainJob],
                    header: Sequence[str] = ()) -> str:
    lines = [f"# Gradient Matching for Domain Generalization, reproduced on CPU: preset `{preset.name}`", ""]
    lines += [*header, ""] if header else []
    lines += [f"Preset: {preset.description}.", ""]

    lines += ["## Linear toy (held-out domain, end of training)", "",
              "Weights are logit differences (class 1 − class 0) of the zero-initialised linear model.", "",
              "| algorithm | held-out acc (%) | shared w₀ | domain1 w₁ | domain2 w₂ | held-out w₃ | bias | runs |",
              "|---|---|---|---|---|---|---|---|"]
    for algorithm, entry in summary["toy"].items():
        w = entry["weights"]
        lines.append(f"| {algorithm} | {_fmt_pair(entry['heldout_acc'])} | "
                     + " | ".join(f"{w[k][0]:.2f}" for k in ("shared", "domain1", "domain2", "heldout", "bias"))
                     + f" | {entry['runs']} |")
    lines.append("")

    ns = [str(n) for n in preset.cdsprites_sizes]
    for which, title in (("selected_acc", "training-domain validation"), ("final_acc", "end of training")):
        lines += [f"## CdSprites-N: accuracy (%) on the decorrelated environment, {title}", "",
                  "| algorithm | " + " | ".join(f"N={n}" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for algorithm, by_n in summary["cdsprites"].items():
            cells = [_fmt_pair(by_n[n][which]) + f" ({by_n[n]['runs']})" if n in by_n else "—" for n in ns]
            lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
        lines += ["", "Mean ± standard error over seeds (number of seeds in brackets).", ""]

    if summary["gip_n15"]:
        steps = sorted({int(s) for trace in summary["gip_n15"].values() for s in trace})
        lines += [f"## Gradient alignment over training, CdSprites-{GIP_TRACE_N}", "",
                  "Measured from checkpoints on the same probe minibatches (64 images per training domain) "
                  "for every algorithm: Ĝ, the mean pairwise inner product of the per-domain gradients, and "
                  "their mean pairwise cosine.", "",
                  "| algorithm | measure | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for key, measure in (("gip_n15", "Ĝ"), ("cosine_n15", "cosine")):
            for algorithm, trace in summary[key].items():
                lines.append(f"| {algorithm} | {measure} | " + " | ".join(
                    f"{trace[str(s)][0]:.3g}" if str(s) in trace else "—" for s in steps) + " |")
        lines.append("")

    compute = summary.get("compute")
    if compute and compute["train_minutes"] > 0:
        total = compute["train_minutes"]
        lines += ["## Compute", "",
                  "Minutes of DomainBed's training steps per CdSprites job, mean over seeds (DomainBed's "
                  "`step_time` over every step: evaluation, checkpoints and start-up come on top):", "",
                  "| algorithm | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for algorithm, by_n in compute["cdsprites_train_minutes_per_job"].items():
            lines.append(f"| {algorithm} | " + " | ".join(f"{by_n[n]:.1f}" if n in by_n else "—" for n in ns) + " |")
        lines += ["", f"The training steps of all finished jobs add up to {total:.1f} min (the toy's "
                      f"{compute['toy_train_minutes']:.1f}). Run k jobs at a time on this machine, the preset "
                      f"cannot finish in less than {total:.1f}/k min, however fast everything else: "
                      f"{total / 2:.1f} min two at a time (`--workers 2`).", ""]

    lines += ["## The paper's findings, as measured here", "", "| check | measured | holds |", "|---|---|---|"]
    for what, measured, holds in targets(summary):
        lines.append(f"| {what} | {measured} | {'—' if holds is None else ('yes' if holds else 'no')} |")
    lines += ["", "Figures: `figure4_accuracy_vs_n.png` (accuracy against N), "
              "`figure5_gip_n15.png` (Ĝ over training at N=15).", ""]
    if missing:
        lines += ["## Missing", "", f"{len(missing)} job(s) have no results yet; run the same command again:", ""]
        lines += [f"- `{job.name}`" for job in missing]
        lines.append("")
    return "\n".join(lines)


def _fmt_pair(pair: Sequence[float]) -> str:
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def write_report(output_dir: Path, preset: Preset, header: Sequence[str] = ()) -> dict[str, Any]:
    """Collect the preset's runs under ``output_dir`` and write every report file there."""
    results, missing = collect(output_dir, preset.jobs())
    summary = summarise(preset, results)
    summary["missing"] = [job.name for job in missing]
    summary["targets"] = [list(check) for check in targets(summary)]
    write_text_atomic(output_dir / "report.json", json.dumps(summary, indent=2))
    write_text_atomic(output_dir / "report.md", render_markdown(preset, summary, missing, header))
    write_figures(summary, output_dir)
    return summary
