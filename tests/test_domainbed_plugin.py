"""The plugin inside the real DomainBed: registration, equivalence with the built-in
Fish, hyperparameters, DomainBed's own checks, bad input and the train script.

Every test here needs DomainBed (DOMAINBED_DIR) and is skipped with a reason without it.
"""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import DEVICES, PYTHON, requires_domainbed, roundtrip, subprocess_env

from domainbed_fish import registry
from domainbed_fish.errors import BatchLargerThanSplitError, InvalidBatchSizeError, UnknownNameError
from domainbed_fish.fish import domain_schedule
from domainbed_fish.locate import import_domainbed

pytestmark = requires_domainbed

ALGORITHM_NAMES = sorted(registry.ALGORITHMS)
ALL_PLUGIN_NAMES = ALGORITHM_NAMES + sorted(registry.RENAMED_BUILTINS.values())


@pytest.fixture
def on_cpu(monkeypatch):
    """DomainBed's own tests call ``.cuda()``; on a machine without a GPU make it a no-op."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)


def make_algorithm(domainbed, name, input_shape, num_domains, hparams, seed=0):
    from domainbed import algorithms

    torch.manual_seed(seed)
    return algorithms.get_algorithm_class(name)(input_shape, 2, num_domains, hparams)


def debug28_minibatches(domainbed, hparams, steps, batch_size=8, seed=0):
    from domainbed import datasets

    torch.manual_seed(seed)
    dataset = datasets.get_dataset_class("Debug28")("", [], hparams)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        step = []
        for env in dataset:
            idx = torch.randint(0, len(env), (batch_size,), generator=g).tolist()
            step.append((torch.stack([env[i][0] for i in idx]), torch.stack([torch.as_tensor(env[i][1]) for i in idx])))
        batches.append(step)
    return dataset.input_shape, batches


def mlp_minibatches(steps, num_domains=3, batch_size=8, features=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(batch_size, features, generator=g) + d, torch.randint(0, 2, (batch_size,), generator=g))
         for d in range(num_domains)]
        for _ in range(steps)
    ]


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("name", ALL_PLUGIN_NAMES)
def test_every_listed_algorithm_is_registered(domainbed, name):
    from domainbed import algorithms, hparams_registry

    assert name in algorithms.ALGORITHMS
    cls = algorithms.get_algorithm_class(name)
    assert issubclass(cls, algorithms.Algorithm)
    assert hparams_registry.default_hparams(name, "Debug28")["lr"] == 1e-3


def test_fish_is_the_plugins_and_the_builtin_is_kept(domainbed):
    from domainbed import algorithms

    assert algorithms.Fish.__module__ == "domainbed_fish.algorithms"
    assert algorithms.FishDomainBed.__module__ == "domainbed.algorithms"
    assert algorithms.FishDomainBed.__name__ == "Fish"


def test_register_is_idempotent(domainbed):
    from domainbed import algorithms

    import domainbed_fish

    before = list(algorithms.ALGORITHMS)
    added = domainbed_fish.register()
    assert domainbed_fish.register() == added
    assert algorithms.ALGORITHMS == before
    assert sorted(added["algorithms"]) == sorted(ALL_PLUGIN_NAMES)
    assert len(algorithms.ALGORITHMS) == len(set(algorithms.ALGORITHMS))


def test_unknown_names_list_what_exists(domainbed):
    from domainbed import algorithms, datasets

    with pytest.raises(NotImplementedError, match=r"unknown algorithm 'Fsh'\. Available algorithms: ERM, .*IDGM") as info:
        algorithms.get_algorithm_class("Fsh")
    assert isinstance(info.value, UnknownNameError)
    with pytest.raises(NotImplementedError, match=r"unknown dataset 'PAC'\. Available datasets: Debug28, .*PACS"):
        datasets.get_dataset_class("PAC")
    assert datasets.num_environments("PACS") == 4  # DomainBed's helpers still work


# --------------------------------------------------------------------------- equivalence


def _max_difference(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", ["Debug28", "MLP"])
def test_fish_matches_builtin_fish_step_for_step(domainbed, network, device, capsys, monkeypatch):
    from domainbed import hparams_registry

    # DomainBed's train script's setting: without it cuDNN may pick kernels that round
    # differently from call to call, and Adam amplifies any such difference.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    steps = 20
    hparams = hparams_registry.default_hparams("Fish", "Debug28")
    builtin_hparams = hparams_registry.default_hparams("FishDomainBed", "Debug28")
    if network == "Debug28":
        input_shape, batches = debug28_minibatches(domainbed, hparams, steps)
    else:
        input_shape, batches = (10,), mlp_minibatches(steps)
        mlp = {"mlp_width": 32, "mlp_depth": 3, "mlp_dropout": 0.0}
        hparams, builtin_hparams = {**hparams, **mlp}, {**builtin_hparams, **mlp}
    # Built on the CPU and moved, as DomainBed's train script does, so both start from the same weights.
    ours = make_algorithm(domainbed, "Fish", input_shape, 3, hparams).to(device)
    builtin = make_algorithm(domainbed, "FishDomainBed", input_shape, 3, builtin_hparams).to(device)
    assert _max_difference(ours.network, builtin.network) == 0.0  # same seed, same initial weights
    batches = [[(x.to(device), y.to(device)) for x, y in step] for step in batches]

    for step, minibatches in enumerate(batches):
        ours_loss = ours.update(minibatches)["loss"]
        builtin.update(minibatches)
        assert _max_difference(ours.network, builtin.network) < 1e-5, f"step {step}"
        assert ours_loss > 0
    error = _max_difference(ours.network, builtin.network)
    with capsys.disabled():
        print(f"\n[equivalence] {network} on {device}: max |Fish - FishDomainBed| after {steps} steps = {error:.3e}")
    assert error < 1e-5
    moved = max((p - q).abs().max().item() for p, q in zip(
        ours.network.parameters(),
        make_algorithm(domainbed, "Fish", input_shape, 3, hparams).to(device).network.parameters()))
    assert moved > 1e-3  # training really moved the weights, so the comparison means something


# --------------------------------------------------------------------------- DomainBed's own checks


def _unparameterized(test_case: type, name: str):
    """The body of a ``@parameterized.expand`` test, callable with any parameters."""
    expanded = next(f for n, f in vars(test_case).items() if n.startswith(name + "_"))
    return expanded.place_as


@pytest.mark.parametrize("name", ALL_PLUGIN_NAMES)
def test_domainbed_init_update_predict(domainbed, on_cpu, name):
    """DomainBed's own per-algorithm test (domainbed/test/test_models.py), run on CPU.

    Debug224 is left out: its ResNet-50 loads pretrained weights from the internet.
    """
    from domainbed.test import test_models

    check = _unparameterized(test_models.TestAlgorithms, "test_init_update_predict")
    check(test_models.TestAlgorithms(), "Debug28", name)


@pytest.mark.parametrize("name", ALL_PLUGIN_NAMES)
def test_domainbed_random_hparams_deterministic(domainbed, name):
    """DomainBed's own hyperparameter test (domainbed/test/test_hparams_registry.py)."""
    from domainbed import datasets
    from domainbed.test import test_hparams_registry

    check = _unparameterized(test_hparams_registry.TestHparamsRegistry, "test_random_hparams_deterministic")
    for dataset in datasets.DATASETS:
        check(test_hparams_registry.TestHparamsRegistry(), name, dataset)


# --------------------------------------------------------------------------- hyperparameters

_DUMP_HPARAMS = """
import json, sys
from domainbed import algorithms, datasets, hparams_registry
assert 'IDGM' not in algorithms.ALGORITHMS, 'the plugin was active'
out = {}
for a in algorithms.ALGORITHMS:
    for d in datasets.DATASETS:
        out[f'{a}|{d}|default'] = {k: repr(v) for k, v in hparams_registry.default_hparams(a, d).items()}
        for seed in (0, 1, 7):
            out[f'{a}|{d}|{seed}'] = {k: repr(v) for k, v in hparams_registry.random_hparams(a, d, seed).items()}
json.dump(out, sys.stdout)
"""


def test_builtin_hparams_identical_with_and_without_plugin(domainbed):
    from domainbed import hparams_registry

    proc = subprocess.run([PYTHON, "-c", _DUMP_HPARAMS], capture_output=True, text=True, timeout=600,
                          env=subprocess_env(DOMAINBED_FISH_AUTOLOAD="0"))
    assert proc.returncode == 0, proc.stderr
    without = json.loads(proc.stdout)
    assert len(without) > 1000

    def with_plugin(name, dataset, which):
        hp = (hparams_registry.default_hparams(name, dataset) if which == "default"
              else hparams_registry.random_hparams(name, dataset, int(which)))
        return {k: repr(v) for k, v in hp.items()}

    extra = {s.name for s in registry.HPARAMS["Fish"]}
    for key, expected in without.items():
        algorithm, dataset, which = key.split("|")
        got = with_plugin(algorithm, dataset, which)
        if algorithm == "Fish":  # taken over: DomainBed's values plus the plugin's options
            assert set(got) - set(expected) == extra
            got = {k: v for k, v in got.items() if k not in extra}
            assert with_plugin("FishDomainBed", dataset, which) == expected, key
        assert got == expected, key


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_plugin_hparams_have_defaults_and_seeded_random_values(domainbed, name):
    from domainbed import hparams_registry

    specs = registry.HPARAMS[name]
    default = hparams_registry.default_hparams(name, "PACS")
    assert {s.name: s.default for s in specs}.items() <= default.items()
    draws = [hparams_registry.random_hparams(name, "PACS", seed) for seed in range(20)]
    assert draws[3] == hparams_registry.random_hparams(name, "PACS", 3)
    if name == "Fish":
        assert default["meta_lr"] == 0.5 and {d["meta_lr"] for d in draws} == {0.05, 0.1, 0.5}
    if name == "IDGM":
        gammas = [d["idgm_gamma"] for d in draws]
        assert len(set(gammas)) == 20 and all(1e-3 <= g <= 1 for g in gammas)
    for draw in draws:  # every random draw is a valid configuration
        make_algorithm(domainbed, name, (10,), 3, {**draw, "mlp_width": 8, "mlp_depth": 3, "mlp_dropout": 0.0})


# --------------------------------------------------------------------------- bad input

BAD_HPARAMS = [
    ("Fish", "meta_lr", 0.0, r"'meta_lr' = 0\.0 is invalid: allowed 0 < meta_lr <= 1"),
    ("Fish", "meta_lr", 1.5, r"'meta_lr' = 1\.5 is invalid: allowed 0 < meta_lr <= 1"),
    ("Fish", "meta_steps", 0, r"'meta_steps' = 0 is invalid: allowed an integer >= 1"),
    ("Fish", "meta_steps", 4, r"'meta_steps' = 4 is invalid: allowed 1 <= meta_steps <= 3"),
    ("Fish", "fish_inner_optimizer", "adamw", r"'fish_inner_optimizer' = 'adamw' is invalid: allowed one of 'adam', 'amsgrad', 'sgd'"),
    ("Fish", "fish_epsilon", "eps", r"'fish_epsilon' = 'eps' is invalid"),
    ("Fish", "fish_warmup_steps", -1, r"'fish_warmup_steps' = -1 is invalid: allowed an integer >= 0"),
    ("IDGM", "idgm_gamma", -0.1, r"'idgm_gamma' = -0\.1 is invalid: allowed a finite idgm_gamma >= 0"),
    ("IDGM", "idgm_optimizer", "rmsprop", r"'idgm_optimizer' = 'rmsprop' is invalid: allowed one of 'adam', 'amsgrad', 'sgd'"),
    ("IDGM", "idgm_penalty_anneal_iters", 2.5, r"'idgm_penalty_anneal_iters' = 2\.5 is invalid"),
    ("IDGM", "idgm_bound_metric", "adam", r"'idgm_bound_metric' = 'adam' is invalid: allowed one of 'optimizer', 'euclidean'"),
    ("IDGM", "idgm_momentum", 1.0, r"'idgm_momentum' = 1\.0 is invalid: allowed 0 <= momentum < 1"),
    ("IDGM", "idgm_gama", 1.0, r"unknown hyperparameter 'idgm_gama': did you mean 'idgm_gamma'\? the idgm_… ones"),
    ("Fish", "fish_warmup", 10, r"unknown hyperparameter 'fish_warmup': did you mean 'fish_warmup_steps'\?"),
    ("Fish", "meta_step", 3, r"unknown hyperparameter 'meta_step': did you mean 'meta_steps'\?"),
    ("Fish", "gip_evry", 5, r"unknown hyperparameter 'gip_evry': did you mean 'gip_every'\?"),
    ("Fish", "lr", float("inf"), r"'lr' = inf is invalid: allowed a finite lr > 0"),
    ("IDGM", "lr", float("inf"), r"'lr' = inf is invalid: allowed a finite lr > 0"),
    ("Fish", "weight_decay", float("inf"), r"'weight_decay' = inf is invalid: allowed a finite weight_decay >= 0"),
    ("IDGM", "weight_decay", float("inf"), r"'weight_decay' = inf is invalid: allowed a finite weight_decay >= 0"),
]


@pytest.mark.parametrize("name, other", [("Fish", "idgm_gama"), ("IDGM", "fish_warmup")])
def test_the_other_algorithms_hyperparameters_are_left_alone(domainbed, name, other):
    """A sweep's --hparams reaches every algorithm: each checks only its own names."""
    from domainbed import hparams_registry

    hparams = {**hparams_registry.default_hparams(name, "Debug28"), other: 1}
    make_algorithm(domainbed, name, (3, 28, 28), 3, hparams)


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_every_registered_hyperparameter_name_is_left_alone(domainbed, name):
    """The typo check refuses names close to the plugin's own; no name any registered
    algorithm or dataset uses may be taken for one (a shared --hparams string)."""
    from domainbed import algorithms, datasets, hparams_registry

    everything = {}
    for algorithm in algorithms.ALGORITHMS:
        everything.update(hparams_registry.default_hparams(algorithm, "Debug28"))
    for dataset in datasets.DATASETS:
        everything.update(hparams_registry.default_hparams("ERM", dataset))
    assert {"meta_lr", "mldg_beta", "irm_penalty_anneal_iters", "weight_decay_d", "resnet18"} <= set(everything)
    everything["linear_model"] = False  # LinearToy's network takes flat inputs
    make_algorithm(domainbed, name, (3, 28, 28), 3, {**everything, **hparams_registry.default_hparams(name, "Debug28")})


@pytest.mark.parametrize("name, key, value, message", BAD_HPARAMS)
def test_invalid_hparams_fail_at_construction(domainbed, name, key, value, message):
    from domainbed import hparams_registry

    hparams = {**hparams_registry.default_hparams(name, "Debug28"), key: value}
    with pytest.raises(ValueError, match=message):
        make_algorithm(domainbed, name, (3, 28, 28), 3, hparams)


#: Values at the edge of what each check allows: accepted (the checks' boundaries).
BOUNDARY_HPARAMS = [
    ("Fish", "meta_lr", 1.0), ("Fish", "meta_steps", 3), ("Fish", "meta_steps", 1), ("Fish", "gip_every", 0),
    ("Fish", "fish_inner_momentum", 0.0), ("Fish", "fish_warmup_steps", 0), ("Fish", "weight_decay", 0.0),
    ("IDGM", "idgm_gamma", 0.0), ("IDGM", "idgm_momentum", 0.0), ("IDGM", "idgm_penalty_anneal_iters", 0),
    ("IDGM", "idgm_penalty_bound", "inf"), ("IDGM", "idgm_penalty_bound", 1e-9), ("IDGM", "weight_decay", 0.0),
]


@pytest.mark.parametrize("name, key, value", BOUNDARY_HPARAMS)
def test_hparams_at_the_edge_of_their_range_are_accepted(name, key, value):
    from conftest import fish_config, idgm_config

    config = fish_config(**{key: value}) if name == "Fish" else idgm_config(**{key: value})
    assert config is not None


def test_random_hparams_are_drawn_as_domainbed_draws_its_own(domainbed):
    """DomainBed's ``(default, random)`` contract: each name's random value comes from
    ``RandomState(misc.seed_hash(random_seed, name))`` (so adding a name changes no other draw);
    the plugin's datasets' entries too.  And the draws stay in their documented ranges (ρ < 1:
    the bounded penalty keeps a descent direction)."""
    import numpy as np
    from domainbed import hparams_registry
    from domainbed.lib import misc

    for dataset in ["PACS", *registry.DATASET_HPARAMS]:
        by_algorithm = registry.DATASET_HPARAMS.get(dataset, {})
        for algorithm in ["ERM", *ALGORITHM_NAMES]:
            # the algorithm's names, then the dataset's for every algorithm, then its for this one: the last wins
            specs = {s.name: s for key in ("plugin", "*", algorithm)
                     for s in (registry.HPARAMS.get(algorithm, ()) if key == "plugin" else by_algorithm.get(key, ()))}
            for seed in (0, 1, 7):
                drawn = hparams_registry.random_hparams(algorithm, dataset, seed)
                for spec in specs.values():
                    expected = spec.sample(np.random.RandomState(misc.seed_hash(seed, spec.name)))
                    assert drawn[spec.name] == expected, (algorithm, dataset, spec.name, seed)
    draws = [hparams_registry.random_hparams("IDGM", "PACS", seed) for seed in range(50)]
    assert all(0.25 <= d["idgm_penalty_bound"] <= 0.9 for d in draws)
    assert all(1 <= d["idgm_penalty_anneal_iters"] < 10_000 for d in draws)


def test_the_plugins_datasets_set_the_papers_settings_for_each_algorithm(domainbed):
    """Every CdSprites-N of the paper's Figure 4 (N = 5 … 50) is registered; the toy trains as the
    paper's linear example (Fish: inner SGD without momentum, a random domain order, ε = 0.1;
    IDGM: SGD at Fish's outer step, γ = 1, no warm-up); on CdSprites Fish warms up for 50 ERM
    steps and IDGM's penalty starts at once."""
    from domainbed import datasets, hparams_registry

    assert [f"CdSprites{n}" for n in range(5, 55, 5)] == [d for d in datasets.DATASETS if d.startswith("CdSprites")]
    fish, idgm = (hparams_registry.default_hparams(a, "LinearToy") for a in ("Fish", "IDGM"))
    assert (fish["fish_inner_optimizer"], fish["fish_inner_momentum"], fish["fish_random_order"], fish["meta_lr"],
            fish["lr"]) == ("sgd", 0.0, True, 0.1, 0.01)
    assert (idgm["idgm_optimizer"], idgm["lr"], idgm["idgm_gamma"], idgm["idgm_penalty_anneal_iters"]) == (
        "sgd", 0.0002, 1.0, 0)
    for n in (5, 50):
        assert hparams_registry.default_hparams("Fish", f"CdSprites{n}")["fish_warmup_steps"] == 50
        assert hparams_registry.default_hparams("IDGM", f"CdSprites{n}")["idgm_penalty_anneal_iters"] == 0


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_missing_plugin_hparams_say_how_to_get_them(domainbed, name):
    from domainbed import hparams_registry

    hparams = hparams_registry.default_hparams("ERM", "Debug28")
    with pytest.raises(ValueError, match="missing hyperparameters"):
        make_algorithm(domainbed, name, (3, 28, 28), 3, hparams)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_state_dict_is_a_complete_checkpoint(domainbed, name):
    from domainbed import hparams_registry

    hparams = {**hparams_registry.default_hparams(name, "Debug28"), "fish_random_order": True,
               "idgm_penalty_anneal_iters": 1}
    input_shape, batches = debug28_minibatches(domainbed, hparams, steps=5)
    a = make_algorithm(domainbed, name, input_shape, 3, hparams)
    for minibatches in batches[:3]:
        a.update(minibatches)
    state = roundtrip(a.state_dict())
    assert "_extra_state" in state
    b = make_algorithm(domainbed, name, input_shape, 3, hparams, seed=1)
    b.load_state_dict(state)
    for minibatches in batches[3:]:
        a.update(minibatches)
        b.update(minibatches)
    assert _max_difference(a, b) == 0.0


def _trained_with_warmup(domainbed, name: str, steps: int, trained: int):
    """(hparams, input shape, Debug28 minibatches of ``steps`` steps, the algorithm after the
    first ``trained`` of them), with Fish's warm-up and IDGM's penalty both under way."""
    from domainbed import hparams_registry

    hparams = {**hparams_registry.default_hparams(name, "Debug28"), "idgm_penalty_anneal_iters": 0,
               "fish_warmup_steps": 1}
    input_shape, batches = debug28_minibatches(domainbed, hparams, steps=steps)
    algorithm = make_algorithm(domainbed, name, input_shape, 3, hparams)
    for minibatches in batches[:trained]:
        algorithm.update(minibatches)
    return hparams, input_shape, batches, algorithm


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_a_state_dict_loaded_in_memory_shares_nothing_with_its_source(domainbed, name):
    """``b.load_state_dict(a.state_dict())`` without a file: training ``b`` must not move
    ``a``'s optimizer moments (torch keeps tensors already on the right device)."""

    hparams, input_shape, batches, a = _trained_with_warmup(domainbed, name, steps=5, trained=3)
    through_a_file = make_algorithm(domainbed, name, input_shape, 3, hparams, seed=2)
    through_a_file.load_state_dict(roundtrip(a.state_dict()))
    b = make_algorithm(domainbed, name, input_shape, 3, hparams, seed=1)
    b.load_state_dict(a.state_dict())
    for minibatches in batches[3:]:
        b.update(minibatches)  # b first: with shared moments a's next steps would differ
    for minibatches in batches[3:]:
        a.update(minibatches)
        through_a_file.update(minibatches)
    assert _max_difference(a, through_a_file) == 0.0
    assert _max_difference(b, through_a_file) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_fish_resumes_its_domain_order_from_a_checkpoint_mapped_to_a_device(domainbed, device):
    """``torch.load(map_location=device)`` moves the domain-order generator's byte state with
    everything else; torch's generators take their state only as a CPU tensor."""
    from domainbed import hparams_registry

    hparams = {**hparams_registry.default_hparams("Fish", "Debug28"), "fish_random_order": True}
    a = make_algorithm(domainbed, "Fish", (3, 28, 28), 3, hparams)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location=device, weights_only=True)
    b = make_algorithm(domainbed, "Fish", (3, 28, 28), 3, hparams, seed=1)
    b.to(device).load_state_dict(state)
    orders = [[domain_schedule(3, None, True, f.fish.generator) for _ in range(5)] for f in (a, b)]
    assert orders[0] == orders[1]


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_a_checkpoint_loaded_before_a_move_moves_with_the_model(domainbed, name):
    """DomainBed's order: build, load, then ``.to(device)``.  The optimizers' moments follow
    the weights (shown with a dtype, the change a CPU can make)."""

    hparams, input_shape, batches, a = _trained_with_warmup(domainbed, name, steps=3, trained=2)
    b = make_algorithm(domainbed, name, input_shape, 3, hparams, seed=1)
    b.load_state_dict(roundtrip(a.state_dict()))
    b.double()
    a.double()
    moments = [v for opt in _optimizers(b) for st in opt.state.values() for k, v in st.items() if k != "step"]
    assert moments and all(v.dtype == torch.float64 for v in moments)
    doubled = [(x.double(), y) for x, y in batches[2]]
    a.update(doubled)
    b.update(doubled)
    assert _max_difference(a, b) == 0.0


def _optimizers(algorithm) -> list[torch.optim.Optimizer]:
    if hasattr(algorithm, "fish"):
        return [algorithm.fish.inner_optimizer, algorithm.fish.warmup_optimizer]
    return [algorithm.idgm.optimizer]


# --------------------------------------------------------------------------- DomainBed's train script


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_domainbed_train_script_runs(domainbed, name, tmp_path):
    out = tmp_path / "run"
    hparams = json.dumps({"batch_size": 8, "idgm_penalty_anneal_iters": 2, "gip_every": 1})
    proc = subprocess.run(
        [PYTHON, "-m", "domainbed.scripts.train", "--dataset", "Debug28", "--algorithm", name,
         "--steps", "4", "--checkpoint_freq", "2", "--test_envs", "0", "--hparams", hparams,
         "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "done").read_text() == "done"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 3]
    assert all("gip" in r and "env0_in_acc" in r for r in records)
    assert records[0]["args"]["algorithm"] == name
    for spec in registry.HPARAMS[name]:
        assert spec.name in records[0]["hparams"]
    checkpoint = torch.load(out / "model.pkl", weights_only=False)
    assert "_extra_state" in checkpoint["model_dict"]


# --------------------------------------------------------------------------- DomainBed's training loaders


@pytest.mark.parametrize("name", ["InfiniteDataLoader", "InfiniteDataLoaderWithoutReplacement"])
def test_training_loader_rejects_a_batch_larger_than_its_split(domainbed, name):
    loader = getattr(import_domainbed("lib.fast_data_loader"), name)
    split = torch.utils.data.TensorDataset(torch.arange(13))
    with pytest.raises(BatchLargerThanSplitError, match=r"batch_size 14 is larger than a training split of 13 "
                                                         r"examples.*at most 13"):
        loader(split, None, 14, 0)
    (full,) = next(iter(loader(split, None, 13, 0)))  # the largest batch the split can fill
    assert full.shape == (13,)
    if name == "InfiniteDataLoaderWithoutReplacement":
        assert sorted(full.tolist()) == list(range(13))
    # Weighted sampling draws batch_size indices: with replacement any batch size fills,
    # without it none larger than the split does.
    if name == "InfiniteDataLoader":
        (weighted,) = next(iter(loader(split, torch.ones(13), 20, 0)))
        assert weighted.shape == (20,)
    else:
        with pytest.raises(BatchLargerThanSplitError, match="batch_size 20"):
            loader(split, torch.ones(13), 20, 0)
        (weighted,) = next(iter(loader(split, torch.ones(13), 13, 0)))
        assert sorted(weighted.tolist()) == list(range(13))


def test_an_empty_training_split_is_not_told_to_use_a_batch_of_0(domainbed):
    # --holdout_fraction 1 keeps nothing for training; the message said "at most 0", which the
    # loaders refuse as a batch size.
    loader = import_domainbed("lib.fast_data_loader").InfiniteDataLoader
    with pytest.raises(BatchLargerThanSplitError) as error:
        loader(torch.utils.data.TensorDataset(torch.arange(0)), None, 4, 0)
    assert str(error.value) == (
        "batch_size 4 is larger than a training split of 0 examples: this environment keeps nothing for "
        "training. Lower --holdout_fraction (the share of each environment held out; DomainBed's default 0.2), "
        "or give every environment more examples.")


@pytest.mark.parametrize("name", ["InfiniteDataLoader", "InfiniteDataLoaderWithoutReplacement"])
@pytest.mark.parametrize("batch_size", ["8", 8.0, 0, -4, True, None])
def test_training_loader_names_a_batch_size_that_is_no_whole_number(domainbed, name, batch_size):
    # "8" (a string in --hparams) failed as TypeError: '>' not supported between 'str' and
    # 'int'; 8.0, 0 and -4 in torch's sampler, naming neither the hyperparameter nor the fix.
    loader = getattr(import_domainbed("lib.fast_data_loader"), name)
    split = torch.utils.data.TensorDataset(torch.arange(13))
    with pytest.raises(InvalidBatchSizeError) as error:
        loader(split, None, batch_size, 0)
    assert str(error.value) == (
        f"batch_size {batch_size!r} is not a whole number >= 1, which DomainBed's training loaders need. "
        "Pass it as a JSON integer, e.g. --hparams '{\"batch_size\": 32}' (not \"32\" or 32.0).")
    (batch,) = next(iter(loader(split, None, np.int64(4), 0)))  # numpy's integers are whole numbers
    assert batch.shape == (4,)


def test_domainbed_train_script_fails_fast_on_a_batch_larger_than_the_split(domainbed, tmp_path):
    # Debug28 holds 16 examples per environment; DomainBed's train script keeps 13 of them
    # for training (holdout 0.2), and without the plugin's check this job never ends.
    proc = subprocess.run(
        [PYTHON, "-m", "domainbed.scripts.train", "--dataset", "Debug28", "--algorithm", "ERM",
         "--steps", "4", "--test_envs", "0", "--hparams", json.dumps({"batch_size": 32}),
         "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env(),
    )
    assert proc.returncode != 0
    # DomainBed's train script tees its stderr into the process's stdout (and err.txt).
    assert "BatchLargerThanSplitError: batch_size 32 is larger than a training split of 13" in proc.stdout
    assert not (tmp_path / "run" / "done").exists()
