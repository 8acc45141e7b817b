"""Step time and memory of ERM, CORAL, DomainBed's Fish, our Fish and IDGM, side by side.

    DOMAINBED_DIR=/path/to/DomainBed python benchmarks/step_time.py            # everything
    ... python benchmarks/step_time.py --networks mnist cdsprites --domains 3   # a subset
    ... python benchmarks/step_time.py --cases cdsprites:15:32 resnet18:3:8      # just these

For every case (network × S domains × batch per domain) all algorithms are built on
the same random weights and fed the same S minibatches; their ``update()`` calls
are then timed in interleaved rounds (one call of each per round, in a rotating
order), so that a noisy machine slows every algorithm alike and the ratios hold.
Figures per row:

- ``step ms``: median ``update()`` time after warm-up: process CPU time on a CPU
  with one thread (see below; wall time in the next column), wall time otherwise
  (on a GPU with ``torch.cuda.synchronize`` after each call);
- ``/ ERM``: the median over rounds of the step's time over ERM's in the same round;
- ``/ floor`` (Fish rows): over the median of *S plain optimizer steps* (Fish's
  inner optimizer) of a copy of the same network on the same S minibatches, timed
  in the same rounds: the least a Fish step can cost;
- ``tensor MiB``: peak tensor memory from the algorithm's construction through
  ``--warmup`` updates: on a CPU, bytes allocated minus freed by torch's CPU
  allocator (profiler allocation events, exact); on a GPU,
  ``torch.cuda.max_memory_allocated`` relative to the start;
- ``RSS MiB`` (CPU; ``--rss small`` by default: the small networks only, since for the
  ResNets it would double the run time): the peak resident set of a fresh process
  that imports everything, builds the minibatches, then builds this one algorithm
  and runs ``--warmup`` updates: peak (VmHWM, reset after the imports) minus the RSS
  before the algorithm was built.  It includes the C allocator's cached memory.

Hyperparameters are DomainBed's defaults for a dataset of that input shape, with
IDGM's penalty on from the first step (its expensive case), Fish's step from the
first update (CdSprites' default starts with 50 ERM steps, ``fish_warmup_steps``) and
Fish's ``gip`` diagnostic off (by default it adds S forward/backward passes every 20th step).
The ResNets are DomainBed's ``ResNet`` featurizer with random weights: within this
process ``torchvision.models.resnet18/50`` are replaced by versions that ignore the
pretrained-weights request, so nothing is downloaded and DomainBed is unchanged
(the built-in Fish rebuilds its network every step, through the same patch; with
pretrained weights it would also read them from disk every step).

CPU threads: one by default (``--threads``).  On a machine shared with other jobs,
torch's OpenMP threads wait for each other at the end of every op whenever one of
them is descheduled; on the 2-core machine of the README table that made every
small op cost milliseconds and inflated the figures of op-heavy algorithms (IDGM)
several times over, so the timings measured the contention, not the algorithms.

The start-up cost of the plugin's automatic registration (``python -c pass`` with
and without the hook) is measured in the same run.  The table is printed and
written as Markdown and JSON to ``--out`` (default ``benchmarks/results/``, where the tables
of record are committed): a finished run of every network and algorithm with the default
grid and rounds to ``step_time_<device>.md``/``.json`` (while it runs, after each case, to
``step_time_<device>_partial.*``), anything less (one network, one case, some algorithms,
other S, batches or rounds) to ``step_time_<device>_subset.*``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import domainbed_fish
from domainbed_fish.optim import make_optimizer
from domainbed_fish.profiling import track_tensor_memory

ALGORITHMS = ["ERM", "CORAL", "FishDomainBed", "Fish", "IDGM"]
FLOOR = "Fish floor"
CUDA_ALLOCATOR_BLOCK = 512  # bytes: the smallest block of torch's CUDA caching allocator
RESNET_NORMAL_BATCH = 8  # DomainBed's batch for 224×224 datasets is 32; 8 keeps a CPU run practical


@dataclass(frozen=True)
class Network:
    """A DomainBed network chosen by input shape, with the dataset whose defaults it uses."""

    label: str
    input_shape: tuple[int, int, int]
    hparams_dataset: str
    num_classes: int
    big: bool  # ResNets: fewer repeats and a smaller default batch
    extra_hparams: tuple[tuple[str, object], ...] = ()


NETWORKS = {
    "mnist": Network("MNIST_CNN 1×28×28", (1, 28, 28), "RotatedMNIST", 10, False),
    "cdsprites": Network("CdSprites CNN 3×64×64", (3, 64, 64), "CdSprites5", 2, False),
    # DomainBed's default 224×224 network is timm's AugMix ResNet-50 whatever ``resnet18``
    # says; ``resnet50_augmix=False`` selects torchvision's ResNet-18/50.
    "resnet18": Network("ResNet-18 3×224×224", (3, 224, 224), "PACS", 7, True,
                        (("resnet18", True), ("resnet50_augmix", False))),
    "resnet50": Network("ResNet-50 3×224×224", (3, 224, 224), "PACS", 7, True,
                        (("resnet18", False), ("resnet50_augmix", False))),
}


# ----------------------------------------------------------------------------- set-up


def patch_torchvision_resnets() -> None:
    """Make ``torchvision.models.resnet18/50`` build random weights whatever they are asked.

    DomainBed's ``ResNet`` calls ``torchvision.models.resnet50(pretrained=True)``;
    within this process that now builds the same architecture with random weights
    and downloads nothing.  The patch stays on, because the built-in Fish builds a
    new network on every ``update()``.
    """
    import torchvision

    for name in ("resnet18", "resnet50"):
        original = getattr(torchvision.models, name)
        if getattr(original, "_random_weights", False):
            continue

        @functools.wraps(original)
        def random_weights(*args, _original=original, **kwargs):
            kwargs.pop("pretrained", None)
            kwargs["weights"] = None
            return _original(*args, **kwargs)

        random_weights._random_weights = True
        setattr(torchvision.models, name, random_weights)


def cpu_time_clock(device: torch.device) -> bool:
    """Whether steps are timed in process CPU time (one CPU thread) rather than wall time."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_minibatches(network: Network, domains: int, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, *network.input_shape, generator=g).to(device),
         torch.randint(0, network.num_classes, (batch,), generator=g).to(device))
        for _ in range(domains)
    ]


def hparams_for(algorithms_name: str, network: Network) -> dict:
    from domainbed import hparams_registry

    hparams = hparams_registry.default_hparams(algorithms_name, network.hparams_dataset)
    hparams.update(dict(network.extra_hparams))
    if algorithms_name == "IDGM":
        hparams["idgm_penalty_anneal_iters"] = 0
    if algorithms_name == "Fish":
        hparams["gip_every"] = 0
        # CdSprites' default starts Fish with 50 ERM steps; time the Fish step itself.
        hparams["fish_warmup_steps"] = 0
    return hparams


def build(name: str, network: Network, domains: int, device: torch.device):
    from domainbed import algorithms

    torch.manual_seed(0)  # the same initial weights for every algorithm
    algorithm = algorithms.get_algorithm_class(name)(
        network.input_shape, network.num_classes, domains, hparams_for(name, network)
    )
    return algorithm.to(device)


def fish_floor(fish, minibatches) -> Callable[[], None]:
    """S plain steps of Fish's inner optimizer on a copy of its network."""
    network = copy.deepcopy(fish.network).train()
    c = fish.fish.config
    optimizer = make_optimizer(c.inner_optimizer, network.parameters(), c.lr, c.weight_decay, c.inner_momentum)

    def plain_steps() -> None:
        for x, y in minibatches:
            optimizer.zero_grad()
            F.cross_entropy(network(x), y).backward()
            optimizer.step()

    return plain_steps


# ----------------------------------------------------------------------------- one case


def run_case(network: Network, domains: int, batch: int, repeats: int, warmup: int,
             names: list[str], device: torch.device, rss: bool) -> list[dict]:
    minibatches = make_minibatches(network, domains, batch, device)
    calls: dict[str, Callable[[], object]] = {}
    memory: dict[str, int] = {}
    # Build and warm up one algorithm at a time, measuring its tensor memory.
    for name in names:
        with track_tensor_memory(device) as mem:
            algorithm = build(name, network, domains, device)
            for _ in range(warmup):
                algorithm.update(minibatches)
        memory[name] = mem.peak
        calls[name] = functools.partial(algorithm.update, minibatches)
        if name == "Fish":
            with track_tensor_memory(device) as mem:
                calls[FLOOR] = fish_floor(algorithm, minibatches)
                for _ in range(warmup):
                    calls[FLOOR]()
            memory[FLOOR] = mem.peak

    # On a CPU with one thread the figures are process CPU time: what the step
    # computes, which other jobs on a shared machine cannot inflate by taking
    # the core away (wall time is recorded beside it).  Otherwise: wall time.
    clock = time.process_time if cpu_time_clock(device) else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in calls}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for round_index in range(repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:  # rotate: no algorithm always runs first
            synchronize(device)
            start, start_wall = clock(), time.perf_counter()
            calls[name]()
            synchronize(device)
            times[name].append(clock() - start)
            wall[name].append(time.perf_counter() - start_wall)

    def ratio(name: str, reference: str) -> float:
        """Median over rounds of the ratio within a round: robust to drift between rounds."""
        return statistics.median(t / r for t, r in zip(times[name], times[reference], strict=True))

    rows = []
    for name in calls:
        row = {
            "network": network.label, "S": domains, "batch": batch, "algorithm": name,
            "median_s": statistics.median(times[name]), "times_s": times[name],
            "median_wall_s": statistics.median(wall[name]), "wall_s": wall[name],
            "vs_erm": ratio(name, "ERM") if "ERM" in calls else None,
            "vs_floor": ratio(name, FLOOR) if FLOOR in calls and "Fish" in name else None,
            "tensor_peak_bytes": memory[name],
            "rss_peak_bytes": None,
        }
        if rss and device.type == "cpu" and name != FLOOR:
            row["rss_peak_bytes"] = rss_in_fresh_process(network, domains, batch, warmup, name)
        rows.append(row)
    return rows


def rss_in_fresh_process(network: Network, domains: int, batch: int, warmup: int, name: str) -> int:
    key = next(k for k, v in NETWORKS.items() if v == network)
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(torch.get_num_threads()),
         "--rss-child", key, str(domains), str(batch), str(warmup), name],
        capture_output=True, text=True, check=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def vm_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def rss_child(key: str, domains: int, batch: int, warmup: int, name: str) -> None:
    """Body of the fresh process of ``--rss``: prints the algorithm's peak RSS in bytes."""
    network = NETWORKS[key]
    minibatches = make_minibatches(network, domains, batch, torch.device("cpu"))
    build("ERM", NETWORKS["mnist"], 2, torch.device("cpu")).update(make_minibatches(NETWORKS["mnist"], 2, 2, "cpu"))
    # ↑ touch torch's lazily loaded kernels and DomainBed once, so they are in the baseline
    try:  # reset the peak (VmHWM) to the current RSS, so import-time peaks do not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = vm_kib("VmRSS")
    algorithm = build(name, network, domains, torch.device("cpu"))
    for _ in range(warmup):
        algorithm.update(minibatches)
    peak = vm_kib("VmHWM")
    print((peak - before) * 1024)


# ----------------------------------------------------------------------------- output


def mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def format_table(rows: list[dict], device: torch.device) -> str:
    memory_column = "tensor MiB" if device.type == "cpu" else "max_memory_allocated MiB"
    step = "step ms (CPU time)" if cpu_time_clock(device) else "step ms"
    lines = [f"| network | S | batch/domain | algorithm | {step} | wall ms | / ERM | / floor | {memory_column} "
             "| RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_erm = f"{r['vs_erm']:.2f}" if r["vs_erm"] is not None else ""
        vs_floor = f"{r['vs_floor']:.3f}" if r["vs_floor"] is not None else ""
        lines.append(f"| {r['network']} | {r['S']} | {r['batch']} | {r['algorithm']} | "
                     f"{r['median_s'] * 1e3:.1f} | {r['median_wall_s'] * 1e3:.1f} | {vs_erm} | {vs_floor} | "
                     f"{mib(r['tensor_peak_bytes'])} | {mib(r['rss_peak_bytes'])} |")
    return "\n".join(lines)


def check_targets(rows: list[dict], normal_batch: dict[bool, int], device: torch.device) -> list[str]:
    """The issue's targets, each with the figures it was judged on."""
    lines = []
    by = {(r["network"], r["S"], r["batch"], r["algorithm"]): r for r in rows}

    def verdict(ok: bool) -> str:
        return "holds" if ok else "MISSED"

    for (net, s, b, name), r in by.items():
        if name == "Fish" and r["vs_floor"] is not None and device.type == "cpu":
            builtin = by.get((net, s, b, "FishDomainBed"))
            beside = f" (built-in {builtin['vs_floor']:.3f})" if builtin else ""
            lines.append(f"- Fish ≤ 1.05 × floor, {net} S={s} b={b}: {r['vs_floor']:.3f}{beside}: "
                         f"{verdict(r['vs_floor'] <= 1.05)}")
        if name == "Fish" and (builtin := by.get((net, s, b, "FishDomainBed"))):
            ours, theirs = r["tensor_peak_bytes"], builtin["tensor_peak_bytes"]
            # Fish keeps its S detached loss scalars for the per-domain finiteness check;
            # CUDA's caching allocator gives each its smallest block, 512 bytes.
            ok = ours <= theirs + s * (CUDA_ALLOCATOR_BLOCK if device.type == "cuda" else 4)
            lines.append(f"- Fish memory ≤ built-in, {net} S={s} b={b}: {mib(ours)} vs {mib(theirs)} MiB "
                         f"({ours - theirs:+d} bytes): {verdict(ok)}")
        if name == "Fish" and device.type == "cuda" and "ResNet-50" in net and s == 3 and b == 32:
            builtin = by.get((net, s, b, "FishDomainBed"))
            beside = f" (built-in {builtin['vs_erm']:.2f})" if builtin else ""
            lines.append(f"- GPU: Fish ≤ 1.3 × ERM, {net} S=3 b=32: {r['vs_erm']:.2f}{beside}: "
                         f"{verdict(r['vs_erm'] <= 1.3)}")
        if name == "IDGM" and r["vs_erm"] is not None and device.type == "cpu":
            big = "ResNet" in net
            if b == normal_batch[big]:
                lines.append(f"- IDGM ≤ 3.5 × ERM, {net} S={s} b={b}: {r['vs_erm']:.2f}: {verdict(r['vs_erm'] <= 3.5)}")
            small = by.get((net, 3, b, "IDGM"))
            if s == 10 and small:
                ratio = r["median_s"] / small["median_s"]
                lines.append(f"- IDGM linear in S, {net} b={b}: S=10 / S=3 = {ratio:.2f} "
                             f"(at most {10 / 3 * 1.1:.2f}): {verdict(ratio <= 10 / 3 * 1.1)}")
    return lines


def startup_section(runs: int) -> tuple[str, dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import startup_overhead

    on, off = startup_overhead.environments()
    with_hook, without_hook = startup_overhead.interleaved(on, off, runs)
    med_on, med_off = statistics.median(with_hook) * 1e3, statistics.median(without_hook) * 1e3
    imports = startup_overhead.startup_import_times_us(on)
    import_ms, finder_ms = imports["hook"] / 1e3, imports["editable_finder"] / 1e3
    text = (f"Start-up: `python -c pass`, median of {runs} interleaved runs: {med_on:.2f} ms with the "
            f"registration hook, {med_off:.2f} ms with it off (DOMAINBED_FISH_AUTOLOAD=0): "
            f"{med_on - med_off:+.2f} ms. Import time (-X importtime) of the hook: {import_ms:.2f} ms"
            + ("" if import_ms else " (the hook is not active: is the package installed?)")
            + (f"; of setuptools' editable-install finder, which any `pip install -e` adds and a "
               f"regular install does not: {finder_ms:.2f} ms" if finder_ms else ""))
    return text, {"with_hook_ms": med_on, "without_hook_ms": med_off, "hook_import_ms": import_ms,
                  "editable_finder_import_ms": finder_ms}


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command line (also what :func:`is_record_run` compares a run's options with)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=None,
                        help="the grid's networks (default: all of them, or none when --cases is given)")
    parser.add_argument("--domains", nargs="+", type=int, default=[3, 5, 10], help="values of S")
    parser.add_argument("--batch", type=int, default=32, help="examples per domain, small networks")
    parser.add_argument("--resnet-batch", nargs="+", type=int, default=[RESNET_NORMAL_BATCH, 1],
                        help="examples per domain for the ResNets (each value is a case)")
    parser.add_argument("--resnet-domains", nargs="+", type=int, default=None,
                        help="values of S for the ResNets (default: --domains)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds, small networks")
    parser.add_argument("--resnet-repeats", type=int, default=3, help="timed rounds, ResNets")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per algorithm first")
    parser.add_argument("--resnet-warmup", type=int, default=1, help="the same, ResNets")
    parser.add_argument("--cases", nargs="+", default=[], metavar="NETWORK:S:BATCH",
                        help="run just these cases, e.g. resnet18:3:8 (after the grid of --networks, if given)")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--rss", choices=["all", "small", "none"], default="small",
                        help="peak RSS of each algorithm in a fresh process (CPU only), for all networks, "
                             "the small ones (the ResNets' would double their run time) or none")
    parser.add_argument("--startup-runs", type=int, default=40, help="0: skip the start-up measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 0: torch's default (see the note on shared machines)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rss-child", nargs=5, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    domainbed_fish.register()
    patch_torchvision_resnets()
    if args.threads:
        torch.set_num_threads(args.threads)  # inherited by the --rss processes through the argument below
    if args.rss_child:
        key, s, b, warmup, name = args.rss_child
        rss_child(key, int(s), int(b), int(warmup), name)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = []
    for key in args.networks if args.networks is not None else ([] if args.cases else list(NETWORKS)):
        network = NETWORKS[key]
        for batch in args.resnet_batch if network.big else [args.batch]:
            for s in (args.resnet_domains or args.domains) if network.big else args.domains:
                cases.append((key, s, batch))
    for case in args.cases:
        key, _, rest = case.partition(":")
        try:
            s, batch = (int(v) for v in rest.split(":"))
            if key not in NETWORKS:
                raise ValueError(key)
            cases.append((key, s, batch))
        except ValueError:
            parser.error(f"--cases {case!r}: expected NETWORK:S:BATCH with NETWORK one of {', '.join(NETWORKS)}")

    args.whole_grid = is_record_run(parser, args, cases)

    started = time.perf_counter()
    startup = startup_section(args.startup_runs) if args.startup_runs else None
    rows: list[dict] = []
    for index, (key, s, batch) in enumerate(cases):
        network = NETWORKS[key]
        print(f"... {network.label}, S={s}, batch {batch}", file=sys.stderr, flush=True)
        rss = args.rss == "all" or (args.rss == "small" and not network.big)
        rows += run_case(network, s, batch, args.resnet_repeats if network.big else args.repeats,
                         args.resnet_warmup if network.big else args.warmup, args.algorithms, device, rss)
        done = index + 1 == len(cases)
        text = report(args, device, rows, startup, time.perf_counter() - started,
                      None if done else f"partial: {index + 1} of {len(cases)} cases")
    print(text)


#: Options a table of record runs at their defaults (the grid and the rounds it reports).
RECORD_OPTIONS = ("domains", "batch", "resnet_batch", "resnet_domains", "repeats", "resnet_repeats", "warmup",
                  "resnet_warmup", "threads")


def is_record_run(parser: argparse.ArgumentParser, args: argparse.Namespace, cases: list[tuple[str, int, int]]) -> bool:
    """Whether this run makes the table of record: every network and algorithm, at the default
    grid and rounds; anything less is a subset."""
    return ({key for key, _, _ in cases} == set(NETWORKS) and set(args.algorithms) == set(ALGORITHMS)
            and all(getattr(args, name) == parser.get_default(name) for name in RECORD_OPTIONS))


def report(args: argparse.Namespace, device: torch.device, rows: list[dict], startup: tuple[str, dict] | None,
           seconds: float, partial: str | None) -> str:
    """The Markdown text; written with its JSON twin to ``args.out`` (after every case)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    title = (f"{device.type} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"median of {args.repeats} rounds after {args.warmup} warm-up updates (ResNets: "
             f"{args.resnet_repeats} after {args.resnet_warmup}); {seconds:.0f} s"
             + (f"; {partial}" if partial else ""))
    parts = [title, "", format_table(rows, device)]
    if startup:
        parts += ["", startup[0]]
    targets = check_targets(rows, {False: args.batch, True: RESNET_NORMAL_BATCH}, device)
    if targets:
        parts += ["", "Targets (CPU):" if device.type == "cpu" else "Targets:", *targets]
    if device.type == "cpu":
        parts += ["", "No GPU in this run: the GPU target (Fish ≤ 1.3 × ERM on ResNet-50, 32 images per domain, "
                  "S=3) was not measured."]
    text = "\n".join(parts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A subset keeps its own file, so that checking one case leaves the whole grid's table alone;
    # so does a whole-grid run until its last case is in (a stopped run leaves the record as it was).
    stem = f"step_time_{device.type}" + ("_subset" if not args.whole_grid else "_partial" if partial else "")
    (out / f"{stem}.md").write_text(text + "\n")
    meta = {
        "title": title, "command": " ".join(sys.argv), "platform": platform.platform(),
        "plugin": domainbed_fish.__version__, "torch": torch.__version__, "device": device.type,
        "args": {k: v for k, v in vars(args).items() if k not in ("rss_child", "whole_grid")},
        "rows": rows, "startup": startup[1] if startup else None, "targets": targets, "git": git_commit(),
    }
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    if args.whole_grid and not partial:
        for leftover in out.glob(f"step_time_{device.type}_partial.*"):
            leftover.unlink()
    return text


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    main()
