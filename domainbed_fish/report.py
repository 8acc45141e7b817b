"""The sweep report: Fish and IDGM vs ERM and CORAL, per dataset and selection method.

For every dataset in the sweep and each of DomainBed's model-selection methods (its own
``model_selection`` classes choose the hyperparameters and checkpoint of each
(algorithm, held-out environment, trial)), the report gives the held-out accuracy as
mean ± standard error over trials per environment, the average over environments, and
its difference to ERM; the chosen hyperparameters of each best run; PNG plots of the
accuracies and of the ``gip`` diagnostic over training steps; and what is missing.
Written as Markdown, LaTeX and CSV.

The standard error is DomainBed's (``collect_results``): the population standard deviation
over trials divided by √n, so the numbers match DomainBed's tables.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainbed_fish.results import records_of, scan
from domainbed_fish.selection import SELECTION_METHODS

#: Rows come in this order, then any other algorithm of the sweep.
ALGORITHM_ORDER: tuple[str, ...] = ("Fish", "IDGM", "ERM", "CORAL")
#: The algorithm every other one is compared with.
BASELINE = "ERM"
_SHORT_TITLES = {"training": "training-domain validation", "loo": "leave-one-domain-out",
                 "oracle": "test-domain validation (oracle)"}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and DomainBed's standard error (population std / √n) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n) / math.sqrt(n)


@dataclass
class Cell:
    """One accuracy per trial (trial seed -> fraction correct)."""

    trials: dict[int, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether no trial has a value."""
        return not self.trials

    def stats(self) -> tuple[float, float]:
        """(mean, standard error) in percent."""
        mean, se = mean_se(list(self.trials.values()))
        return 100 * mean, 100 * se

    def text(self, pm: str = "±", missing: str = "—") -> str:
        """``"mean ± se"`` in percent with one decimal, or ``missing``."""
        if self.empty:
            return missing
        mean, se = self.stats()
        return f"{mean:.1f} {pm} {se:.1f}"


@dataclass
class Table:
    """Results of one dataset under one selection method."""

    dataset: str
    selection: str
    env_ids: list[int]
    env_names: list[str]
    algorithms: list[str]
    cells: dict[str, dict[int, Cell]]
    avg: dict[str, Cell]

    def delta(self, algorithm: str) -> float | None:
        """Average accuracy minus the baseline's, in points (``None`` if either is missing)."""
        if BASELINE not in self.avg or self.avg[algorithm].empty or self.avg[BASELINE].empty:
            return None
        return self.avg[algorithm].stats()[0] - self.avg[BASELINE].stats()[0]


@dataclass
class Selected:
    """The run a selection method chose for one (dataset, algorithm, test env, trial)."""

    dataset: str
    selection: str
    algorithm: str
    test_env: int
    trial_seed: int
    hparams_seed: int
    val_acc: float
    test_acc: float
    hparams: dict[str, Any]


@dataclass
class ReportResult:
    """What :func:`write_report` produced."""

    markdown: str
    tables: list[Table]
    selected: list[Selected]
    missing: list[str]
    files: list[Path]


def _ordered(names: set[str], order: Sequence[str]) -> list[str]:
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def build_tables(records, selection: Sequence[str], progress: bool = False,
                 columns: Mapping[str, Sequence[int]] | None = None) -> tuple[list[Table], list[Selected]]:
    """Apply DomainBed's selection methods to ``records`` (a DomainBed ``Q``).

    ``columns``: per dataset, the held-out environments the sweep meant to report (see
    :func:`expected_columns`); a column without results is kept, empty, so that Avg is
    not silently taken over fewer environments.  Environments with results are shown too.
    """
    from domainbed_fish.locate import import_domainbed

    model_selection = import_domainbed("model_selection")
    reporting = import_domainbed("lib.reporting")
    datasets = import_domainbed("datasets")
    groups = reporting.get_grouped_records(records)
    dataset_names = _ordered({g["dataset"] for g in groups}, datasets.DATASETS)
    algorithms = _ordered({g["algorithm"] for g in groups}, ALGORITHM_ORDER)
    tables, selected = [], []
    work = [(d, s) for d in dataset_names for s in selection]
    if progress:
        import tqdm

        work = tqdm.tqdm(work, desc="model selection", unit="table", leave=False)
    for dataset, sel in work:
        method = getattr(model_selection, SELECTION_METHODS[sel])
        mine = [g for g in groups if g["dataset"] == dataset]
        # columns: environments held out alone in some job
        env_ids = sorted({g["test_env"] for g in mine
                          if any(len(r["args"]["test_envs"]) == 1 for r in g["records"])}
                         | set((columns or {}).get(dataset, ())))
        all_names = list(datasets.get_dataset_class(dataset).ENVIRONMENTS)
        algs = [a for a in algorithms if any(g["algorithm"] == a for g in mine)]
        cells = {a: {e: Cell() for e in env_ids} for a in algs}
        for g in mine:
            if g["test_env"] not in env_ids:
                continue
            ranked = method.hparams_accs(g["records"])
            if not len(ranked):
                continue
            run_acc, run_records = ranked[0]
            cells[g["algorithm"]][g["test_env"]].trials[g["trial_seed"]] = float(run_acc["test_acc"])
            first = run_records[0]
            selected.append(Selected(dataset, sel, g["algorithm"], g["test_env"], g["trial_seed"],
                                     first["args"]["hparams_seed"], float(run_acc["val_acc"]),
                                     float(run_acc["test_acc"]), first["hparams"]))
        avg = {}
        for a in algs:
            trials = set.intersection(*(set(c.trials) for c in cells[a].values())) if env_ids else set()
            avg[a] = Cell({t: sum(c.trials[t] for c in cells[a].values()) / len(env_ids) for t in sorted(trials)})
        tables.append(Table(dataset, sel, env_ids, [all_names[e] for e in env_ids], algs, cells, avg))
    return tables, selected


# ----------------------------------------------------------------------------- text formats


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _delta_text(d: float | None) -> str:
    return "—" if d is None else f"{d:+.1f}"


def _varying_hparams(all_records: Any) -> dict[tuple[str, str], list[str]]:
    """Per (dataset, algorithm): the hyperparameters that differ between its runs."""
    values: dict[tuple[str, str], dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in all_records:
        key = (r["args"]["dataset"], r["args"]["algorithm"])
        for k, v in r.get("hparams", {}).items():
            values[key][k].add(json.dumps(v, sort_keys=True))
    return {key: sorted(k for k, vs in d.items() if len(vs) > 1) for key, d in values.items()}


def to_markdown(input_dir: str, tables: list[Table], selected: list[Selected], missing: list[str],
                varying: dict[tuple[str, str], list[str]], n_runs: int, n_records: int) -> str:
    """The whole report as Markdown."""
    out = [f"# Sweep report: {input_dir}", "",
           f"{n_runs} finished runs, {n_records} records. Accuracy (%) on the held-out environment, "
           "mean ± standard error over trials (DomainBed's: std/√n); Avg = mean over the held-out "
           "environments per trial, over the trials every environment has; "
           f"Δ {BASELINE} = Avg − {BASELINE}'s Avg (points).", ""]
    for dataset in dict.fromkeys(t.dataset for t in tables):
        out += [f"## {dataset}", ""]
        for t in (t for t in tables if t.dataset == dataset):
            out += [f"### {_SHORT_TITLES[t.selection]}", ""]
            rows = [[a, *(t.cells[a][e].text() for e in t.env_ids), t.avg[a].text(), _delta_text(t.delta(a))]
                    for a in t.algorithms]
            out += [_md_table(["Algorithm", *t.env_names, "Avg", f"Δ {BASELINE}"], rows), ""]
    if selected:
        out += ["## Selected hyperparameters", "",
                "The best run of each (algorithm, held-out environment, trial) under each selection method; "
                "the hyperparameters shown are those that vary between the algorithm's runs.", ""]
        for dataset in dict.fromkeys(s.dataset for s in selected):
            for sel in dict.fromkeys(s.selection for s in selected if s.dataset == dataset):
                out += [f"### {dataset}, {_SHORT_TITLES[sel]}", ""]
                rows = []
                for s in sorted((s for s in selected if s.dataset == dataset and s.selection == sel),
                                key=lambda s: (_ordered_key(s.algorithm), s.test_env, s.trial_seed)):
                    keys = varying.get((s.dataset, s.algorithm), [])
                    shown = ", ".join(f"{k}={_fmt(s.hparams[k])}" for k in keys if k in s.hparams) or "(all fixed)"
                    rows.append([s.algorithm, str(s.test_env), str(s.trial_seed), str(s.hparams_seed),
                                 f"{100 * s.val_acc:.1f}", f"{100 * s.test_acc:.1f}", shown])
                out += [_md_table(["Algorithm", "test env", "trial", "hparams seed", "val acc", "test acc",
                                   "hyperparameters"], rows), ""]
    out += ["## Missing", ""]
    out += [f"- {m}" for m in missing] if missing else ["Nothing: every job of the sweep finished "
                                                        "and every table cell has a value."]
    return "\n".join(out) + "\n"


def _ordered_key(algorithm: str) -> tuple[int, str]:
    return (ALGORITHM_ORDER.index(algorithm) if algorithm in ALGORITHM_ORDER else len(ALGORITHM_ORDER), algorithm)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _tex(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(tables: list[Table]) -> str:
    """One booktabs table per dataset and selection method."""
    out = ["% Generated by domainbed-fish (domainbed-fish-sweep report). Needs \\usepackage{booktabs}.", ""]
    for t in tables:
        out += [r"\begin{table}[h]", r"\centering",
                rf"\caption{{{_tex(t.dataset)}, {_tex(_SHORT_TITLES[t.selection])}: held-out accuracy (\%), "
                r"mean $\pm$ SE over trials}",
                r"\begin{tabular}{l" + "c" * (len(t.env_ids) + 2) + "}", r"\toprule",
                " & ".join(["Algorithm", *(_tex(n) for n in t.env_names), "Avg", rf"$\Delta$ {BASELINE}"])
                + r" \\", r"\midrule"]
        for a in t.algorithms:
            cells = [t.cells[a][e].text(pm=r"$\pm$", missing="--") for e in t.env_ids]
            d = t.delta(a)
            out.append(" & ".join([_tex(a), *cells, t.avg[a].text(pm=r"$\pm$", missing="--"),
                                   "--" if d is None else f"{d:+.1f}"]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def write_csvs(report_dir: Path, tables: list[Table], selected: list[Selected]) -> list[Path]:
    """``results.csv`` (one row per cell) and ``selected_hparams.csv``."""
    results = report_dir / "results.csv"
    with open(results, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "selection", "algorithm", "environment", "mean", "se", "n_trials",
                    f"delta_{BASELINE}"])
        for t in tables:
            for a in t.algorithms:
                for e, name in zip(t.env_ids, t.env_names, strict=True):
                    c = t.cells[a][e]
                    m, s = c.stats() if not c.empty else ("", "")
                    w.writerow([t.dataset, t.selection, a, name, _num(m), _num(s), len(c.trials), ""])
                m, s = t.avg[a].stats() if not t.avg[a].empty else ("", "")
                d = t.delta(a)
                w.writerow([t.dataset, t.selection, a, "Avg", _num(m), _num(s), len(t.avg[a].trials),
                            "" if d is None else f"{d:.4f}"])
    hp = report_dir / "selected_hparams.csv"
    with open(hp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "selection", "algorithm", "test_env", "trial_seed", "hparams_seed", "val_acc",
                    "test_acc", "hparams"])
        for s in selected:
            w.writerow([s.dataset, s.selection, s.algorithm, s.test_env, s.trial_seed, s.hparams_seed,
                        f"{s.val_acc:.6f}", f"{s.test_acc:.6f}", json.dumps(s.hparams, sort_keys=True)])
    return [results, hp]


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------- plots


def plot_accuracy(path: Path, tables: list[Table]) -> Path | None:
    """Average held-out accuracy per algorithm and dataset, one panel per selection method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selections = list(dict.fromkeys(t.selection for t in tables))
    if not selections:
        return None
    fig, axes = plt.subplots(1, len(selections), figsize=(5 * len(selections), 3.8), squeeze=False)
    every = list(dict.fromkeys(a for t in tables for a in t.algorithms))
    colors = {a: f"C{i % 10}" for i, a in enumerate(every)}  # one colour per algorithm in every panel
    for ax, sel in zip(axes[0], selections, strict=True):
        mine = [t for t in tables if t.selection == sel]
        algs = list(dict.fromkeys(a for t in mine for a in t.algorithms))
        width = 0.8 / max(1, len(algs))
        drawn = False
        for i, a in enumerate(algs):
            xs, ms, ss = [], [], []
            for j, t in enumerate(mine):
                if a in t.avg and not t.avg[a].empty:
                    m, s = t.avg[a].stats()
                    xs.append(j + (i - (len(algs) - 1) / 2) * width)
                    ms.append(m)
                    ss.append(s)
            if xs:
                ax.bar(xs, ms, width, yerr=ss, capsize=3, label=a, color=colors[a])
                drawn = True
        ax.set_xticks(range(len(mine)), [t.dataset for t in mine])
        ax.set_xlim(-0.5, len(mine) - 0.5)
        ax.set_ylim(0, 100)
        ax.set_title(_SHORT_TITLES[sel])
        ax.set_ylabel("held-out accuracy (%), mean ± SE")
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no results yet\n(see Missing in report.md)", ha="center", va="center",
                    transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gip(path: Path, records) -> Path | None:
    """The ``gip`` diagnostic (inter-domain gradient inner product) over training steps,
    mean ± SE over runs, one panel per dataset; ``None`` when no run logged it."""
    series: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        if "gip" in r and r["gip"] is not None and math.isfinite(r["gip"]):
            series[r["args"]["dataset"]][r["args"]["algorithm"]][r["step"]].append(float(r["gip"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (dataset, by_alg) in zip(axes[0], sorted(series.items()), strict=True):
        for a in _ordered(set(by_alg), ALGORITHM_ORDER):
            steps = sorted(by_alg[a])
            stats = [mean_se(by_alg[a][s]) for s in steps]
            means = [m for m, _ in stats]
            ax.plot(steps, means, marker="o", ms=3, label=a)
            ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
        ax.set_title(f"{dataset}: gradient inner product")
        ax.set_xlabel("step")
        ax.set_ylabel("gip (Ĝ)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- missing, entry point


def expected_columns(input_dir: Path, dataset_names: Sequence[str]) -> dict[str, list[int]]:
    """Per dataset, the environments the sweep holds out one at a time: from the manifest when
    there is one (a sweep restricted with --test_envs), else all of the dataset's, as
    DomainBed's sweep launches and its ``collect_results`` shows them."""
    from domainbed_fish.locate import import_domainbed
    from domainbed_fish.manifest import read_manifest

    datasets = import_domainbed("datasets")
    columns = {d: list(range(datasets.num_environments(d))) for d in dataset_names if d in datasets.DATASETS}
    manifest = read_manifest(input_dir)
    if manifest is not None:  # its datasets' columns; one it does not list (another sweep's) keeps all
        launched: dict[str, set[int]] = defaultdict(set)
        for a in manifest["jobs"].values():
            if len(a["test_envs"]) == 1:
                launched[a["dataset"]].add(a["test_envs"][0])
        columns.update({d: sorted(envs) for d, envs in launched.items()})
    return columns


def find_missing(input_dir: Path, tables: list[Table], runs) -> list[str]:
    """Unfinished jobs (from the manifest when there is one) and empty table cells."""
    from domainbed_fish.lockfile import TrainProcesses
    from domainbed_fish.manifest import read_manifest
    from domainbed_fish.sweep import DONE, job_state

    missing = []
    manifest = read_manifest(input_dir)
    if manifest is not None:
        pending, processes = defaultdict(list), TrainProcesses()
        for name, a in manifest["jobs"].items():
            state = job_state(input_dir / name, processes)
            if state != DONE:
                pending[state].append(f"{a['dataset']} {a['algorithm']} test_envs={a['test_envs']} "
                                      f"hparams_seed={a['hparams_seed']} trial={a['trial_seed']} ({name})")
        total = len(manifest["jobs"])
        for state, jobs in pending.items():
            missing.append(f"{len(jobs)} of {total} jobs {state}: " + "; ".join(jobs[:10])
                           + (f"; … {len(jobs) - 10} more" if len(jobs) > 10 else ""))
        if pending:
            missing.append(f"finish them with: domainbed-fish-sweep launch --output_dir {input_dir} "
                           "(with the sweep's options)")
    else:
        unfinished = Counter(r.state for r in runs if not r.done)
        if unfinished:
            states = ", ".join(f"{n} {state}" for state, n in sorted(unfinished.items()))
            missing.append(f"{unfinished.total()} job directories without 'done' ({states}; no sweep_manifest.json, "
                           "so jobs never started cannot be listed)")
    for t in tables:
        empty = [f"{a} on {t.env_names[i]}" for a in t.algorithms for i, e in enumerate(t.env_ids)
                 if t.cells[a][e].empty]
        if empty:
            hint = (" (leave-one-domain-out needs the jobs holding out two environments: launch with "
                    "--selection loo)") if t.selection == "loo" else ""
            missing.append(f"{t.dataset}, {_SHORT_TITLES[t.selection]}: no result for "
                           + ", ".join(empty) + hint)
        # The Avg column averages per trial, over the trials every environment has (so that
        # its standard error is over trials); say which trials a cell lacks, or Avg and Δ would
        # silently rest on fewer trials than the cells beside them.
        for a in t.algorithms:
            trials = set().union(*(c.trials for c in t.cells[a].values()))
            short = [f"{t.env_names[i]} lacks trial {sorted(trials - set(t.cells[a][e].trials))}"
                     for i, e in enumerate(t.env_ids)
                     if not t.cells[a][e].empty and set(t.cells[a][e].trials) != trials]
            if short:
                missing.append(f"{t.dataset}, {_SHORT_TITLES[t.selection]}, {a}: " + "; ".join(short)
                               + f"; its Avg is over trials {sorted(t.avg[a].trials)} only")
        if BASELINE not in t.algorithms:
            missing.append(f"{t.dataset}: no {BASELINE} runs, so no Δ {BASELINE}")
    return missing


def write_report(input_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None,
                 selection: Sequence[str] = tuple(SELECTION_METHODS), include_incomplete: bool = False,
                 plots: bool = True, progress: bool = True) -> ReportResult:
    """Build the report of the sweep in ``input_dir`` and write it to ``report_dir``
    (default ``input_dir/report``): ``report.md``, ``report.tex``, ``results.csv``,
    ``selected_hparams.csv``, ``accuracy.png``, ``gip.png``."""
    input_dir = Path(input_dir)
    report_dir = Path(report_dir) if report_dir is not None else input_dir / "report"
    runs = scan(input_dir, progress=progress)
    if not runs:
        # A report of nothing would read "nothing missing"; the directory is the wrong one.
        raise FileNotFoundError(f"no DomainBed runs in {input_dir}: none of its subdirectories has a "
                                "results.jsonl or a done marker; pass the sweep's --output_dir, the directory "
                                "that holds its job directories")
    records = records_of(runs, include_incomplete=include_incomplete)
    columns = expected_columns(input_dir, sorted({r["args"]["dataset"] for r in records}))
    tables, selected = build_tables(records, selection, progress=progress, columns=columns)
    missing = find_missing(input_dir, tables, runs)
    n_runs = sum(r.done for r in runs)
    markdown = to_markdown(str(input_dir), tables, selected, missing, _varying_hparams(records),
                           n_runs, len(records))
    report_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in [("report.md", markdown), ("report.tex", to_latex(tables))]:
        (report_dir / name).write_text(text, encoding="utf-8")
        files.append(report_dir / name)
    files += write_csvs(report_dir, tables, selected)
    if plots:
        for made in (plot_accuracy(report_dir / "accuracy.png", tables), plot_gip(report_dir / "gip.png", records)):
            if made is not None:
                files.append(made)
    return ReportResult(markdown, tables, selected, missing, files)
