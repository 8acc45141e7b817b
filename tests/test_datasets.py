"""The paper's datasets: CdSprites-N and the linear toy, alone and through DomainBed."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, subprocess_env

from domainbed_fish import registry
from domainbed_fish.datasets.cdsprites import MIN_COLOUR_DISTANCE, build_cdsprites, max_per_domain
from domainbed_fish.datasets.sprites import SPRITES_PER_SHAPE, SpriteLatents, rasterise
from domainbed_fish.datasets.toy import expected_heldout_accuracy, toy_domain

# --------------------------------------------------------------------------- sprites


def _one(shape: int, scale: int = 5, orientation: int = 0, x: int = 16, y: int = 16):
    return SpriteLatents.from_flat_index(shape, np.array([((scale * 40 + orientation) * 32 + x) * 32 + y]))


def test_sprites_are_binary_centred_and_scale_with_the_scale_latent():
    masks = rasterise(SpriteLatents.concatenate([_one(0, 0), _one(0, 5), _one(1, 0), _one(1, 5)]))
    assert masks.shape == (4, 64, 64) and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) == {0, 1}
    areas = masks.flatten(1).sum(1).tolist()
    assert areas[1] > 2 * areas[0] and areas[3] > 2 * areas[2]  # scale 5 much larger than scale 0
    # a square fills its bounding box, an ellipse about π/4 of it
    for mask, fill in ((masks[1], 1.0), (masks[3], np.pi / 4)):
        rows, cols = mask.nonzero(as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mask.sum().item() / box.item() == pytest.approx(fill, abs=0.08)


def test_pixel_count_does_not_give_the_label_away():
    rng = np.random.default_rng(0)
    latents = SpriteLatents.concatenate(
        [SpriteLatents.from_flat_index(s, rng.permutation(SPRITES_PER_SHAPE)[:1500]) for s in (0, 1)]
    )
    counts = rasterise(latents).flatten(1).sum(1).numpy()
    labels = latents.shape
    for scale in range(6):  # same area at every scale, to within rasterisation
        square, ellipse = (counts[(labels == s) & (latents.scale == scale)].mean() for s in (0, 1))
        assert ellipse == pytest.approx(square, rel=0.03)
    # the best rule "label = [count > t]" or "[count ≤ t]" is near chance (66.6% with the old ellipse)
    best = max(max(((counts > t) == labels).mean(), ((counts <= t) == labels).mean()) for t in np.unique(counts))
    assert best < 0.56


def test_sprite_position_moves_the_mask():
    left, right, top, bottom = rasterise(SpriteLatents.concatenate([_one(1, x=0), _one(1, x=31),
                                                                    _one(1, y=0), _one(1, y=31)]))
    # pos_x moves the sprite along the columns only, pos_y along the rows only
    assert left.nonzero()[:, 1].float().mean() < 24 < right.nonzero()[:, 1].float().mean()
    assert left.nonzero()[:, 0].float().mean() == pytest.approx(right.nonzero()[:, 0].float().mean(), abs=0.5)
    assert top.nonzero()[:, 0].float().mean() < 24 < bottom.nonzero()[:, 0].float().mean()
    assert top.nonzero()[:, 1].float().mean() == pytest.approx(bottom.nonzero()[:, 1].float().mean(), abs=0.5)


def test_orientations_turn_the_sprite_a_whole_turn():
    """Orientation k turns the sprite by 2πk/40: the ellipse's long axis (in (x, y) = (column,
    row) coordinates) points at 2πk/40 modulo π, over all 40 orientations."""
    masks = rasterise(SpriteLatents.concatenate([_one(1, orientation=k) for k in range(40)]))
    for k, mask in enumerate(masks):
        points = mask.nonzero().double()[:, [1, 0]]
        _, vectors = torch.linalg.eigh(torch.cov(points.T))
        axis = np.arctan2(vectors[1, -1].item(), vectors[0, -1].item())
        error = (axis - 2 * np.pi * k / 40 + np.pi / 2) % np.pi - np.pi / 2
        assert abs(error) < np.radians(3), k


# --------------------------------------------------------------------------- CdSprites-N


@pytest.fixture(scope="module")
def cdsprites5():
    return build_cdsprites(5, 300, seed=3)


def test_cdsprites_shapes_sizes_and_balanced_labels(cdsprites5):
    assert len(cdsprites5) == 6
    for env in cdsprites5:
        assert len(env) == 300
        image, label = env[0]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert label.item() in (0, 1)
        assert env.masks.dtype == torch.uint8  # stored compactly, coloured on access
        assert env.labels.sum().item() == 150
        assert torch.equal(env.images(torch.arange(4)), torch.stack([env[i][0] for i in range(4)]))


def test_a_data_loader_batch_is_the_items_it_asked_for(cdsprites5):
    """A ``DataLoader`` fetches a whole batch through ``__getitems__``: the same images and labels,
    in the same order, as item by item."""
    env = cdsprites5[-1]
    indices = torch.randperm(len(env), generator=torch.Generator().manual_seed(0))[:7].tolist()
    loader = torch.utils.data.DataLoader(env, batch_size=7, sampler=indices)
    images, labels = next(iter(loader))
    assert torch.equal(images, torch.stack([env[i][0] for i in indices]))
    assert torch.equal(labels, torch.stack([env[i][1] for i in indices]))


def _colour_accuracy(env) -> float:
    """Accuracy of the best classifier that sees only the colour (majority label per colour)."""
    colours = [tuple(c) for c in env.colours.tolist()]
    correct = 0
    for colour in set(colours):
        labels = env.labels[[c == colour for c in colours]]
        correct += max(int(labels.sum()), len(labels) - int(labels.sum()))
    return correct / len(env)


def test_environments_hold_disjoint_sprites(monkeypatch):
    """No sprite of the grid is in two environments.  Masks cannot show it (a square turned by
    90° is the same mask), so the rasteriser is replaced by one that writes each sprite's
    latents into its mask."""
    from domainbed_fish.datasets import cdsprites

    def latents_as_masks(latents):
        fields = np.stack([latents.shape, latents.scale, latents.orientation, latents.pos_x, latents.pos_y], 1)
        masks = torch.zeros((len(latents), 64, 64), dtype=torch.uint8)
        masks[:, 0, :5] = torch.as_tensor(fields, dtype=torch.uint8)
        return masks

    monkeypatch.setattr(cdsprites, "rasterise", latents_as_masks)
    envs = cdsprites.build_cdsprites.__wrapped__(5, 300, seed=3)
    sprites = [{tuple(m[0, :5].tolist()) for m in env.masks} for env in envs]
    assert [len(s) for s in sprites] == [300] * 6  # no sprite twice within an environment either
    assert len(set().union(*sprites)) == 6 * 300
    for env, found in zip(envs, sprites, strict=True):
        assert sorted(shape for shape, *_ in found) == sorted(env.labels.tolist())  # the label is the shape


def test_colour_predicts_the_label_in_training_domains_only(cdsprites5):
    palettes = []
    for env in cdsprites5[:-1]:
        assert _colour_accuracy(env) == 1.0
        palette = torch.stack([env.colours[env.labels == k][0] for k in (0, 1)])
        assert torch.equal(env.colours, palette[env.labels])
        assert torch.dist(palette[0], palette[1]) >= MIN_COLOUR_DISTANCE
        palettes.append(palette)
    assert len({tuple(p.flatten().tolist()) for p in palettes}) == 5  # a palette per domain
    decorrelated = cdsprites5[-1]
    assert 0.4 < _colour_accuracy(decorrelated) < 0.65  # 10 colours, 300 images: chance level
    used = {tuple(c) for c in decorrelated.colours.tolist()}
    assert used == {tuple(c) for p in palettes for c in p.tolist()}  # every domain's two colours


def test_each_domain_colours_label_k_with_its_palettes_colour_k(monkeypatch):
    """Colour index = label: domain d's label-k sprites have colour palettes[d][k], as drawn."""
    from domainbed_fish.datasets import cdsprites

    drawn, draw = [], cdsprites.domain_palettes

    def recording(num_domains, rng):
        drawn.append(draw(num_domains, rng))
        return drawn[-1]

    monkeypatch.setattr(cdsprites, "domain_palettes", recording)
    envs = cdsprites.build_cdsprites.__wrapped__(3, 40, seed=5)
    palettes = torch.as_tensor(drawn[0], dtype=torch.float32)
    for d, env in enumerate(envs[:-1]):
        assert torch.equal(env.colours, palettes[d][env.labels])


def test_shape_is_the_label(cdsprites5):
    # a square's pixels spread equally in every direction, an ellipse's along its long
    # axis ((1.5 / 0.85)² ≈ 3.1 times more): the label is visible in the mask alone
    env = cdsprites5[0]
    elongation = []
    for mask in env.masks[:60]:
        points = mask.nonzero().double()
        low, high = torch.linalg.eigvalsh(torch.cov(points.T))
        elongation.append((high / low).item())
    elongation = torch.tensor(elongation)
    labels = env.labels[:60]
    assert elongation[labels == 0].max() < 1.5 < 2.2 < elongation[labels == 1].min()


def test_cdsprites_is_deterministic_and_the_seed_matters():
    a, b = build_cdsprites(3, 40, seed=11), build_cdsprites.__wrapped__(3, 40, seed=11)
    c = build_cdsprites.__wrapped__(3, 40, seed=12)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.masks, y.masks) and torch.equal(x.colours, y.colours) and torch.equal(x.labels, y.labels)
    assert not torch.equal(a[0].masks, c[0].masks)


@pytest.mark.parametrize("n", [1, 5, 50])
def test_the_size_limit_is_the_largest_that_keeps_the_environments_disjoint(n):
    # N + 1 environments of k sprites take ⌈k/2⌉ squares and ⌊k/2⌋ ellipses each
    limit = max_per_domain(n)
    assert limit % 2 == 0 and (n + 1) * limit // 2 <= SPRITES_PER_SHAPE < (n + 1) * (limit // 2 + 1)


def test_cdsprites_sizes_are_checked_with_the_fix_named():
    with pytest.raises(ValueError, match="cdsprites_per_domain"):
        build_cdsprites(50, max_per_domain(50) + 2)
    with pytest.raises(ValueError, match="at least one training domain"):
        build_cdsprites(0, 10)


# --------------------------------------------------------------------------- the linear toy


def test_toy_domains_have_the_documented_proportions():
    x, y = toy_domain(2, 1000).tensors
    x1 = (x == 0).all(1)
    x2 = (x == torch.tensor([1.0, 0, 1, 0])).all(1)
    x3 = (x == torch.tensor([1.0, 0, 0, 0])).all(1)
    assert (x1.sum(), x2.sum(), x3.sum()) == (500, 400, 100)
    assert y[x1].sum() == 0 and y[x2].sum() == 400 and y[x3].sum() == 30
    assert expected_heldout_accuracy(True) == pytest.approx(0.93)
    assert expected_heldout_accuracy(False) == pytest.approx(0.57)
    with pytest.raises(ValueError, match="toy_per_domain"):
        toy_domain(1, 5)


# --------------------------------------------------------------------------- through DomainBed

PLUGIN_DATASETS = list(registry.DATASETS)


@pytest.mark.parametrize("name", PLUGIN_DATASETS)
def test_every_listed_dataset_is_a_domainbed_dataset(domainbed, name):
    from domainbed import datasets, hparams_registry

    cls = datasets.get_dataset_class(name)
    assert name in datasets.DATASETS
    assert issubclass(cls, datasets.MultipleDomainDataset)
    hparams = hparams_registry.default_hparams("ERM", name)
    if name.startswith("CdSprites"):
        n = int(name.removeprefix("CdSprites"))
        assert cls.ENVIRONMENTS == [f"spurious{d}" for d in range(n)] + ["decorrelated"]
        assert cls.decorrelated_env() == n == datasets.num_environments(name) - 1
        hparams["cdsprites_per_domain"] = 4
    else:
        assert cls.ENVIRONMENTS == ["domain1", "domain2", "heldout"]
        hparams["toy_per_domain"] = 20
    dataset = cls("unused", [cls.decorrelated_env()], hparams)
    assert len(dataset) == len(cls.ENVIRONMENTS)
    assert dataset.input_shape == cls.INPUT_SHAPE and dataset.num_classes == 2
    x, y = dataset[0][0]
    assert tuple(x.shape) == cls.INPUT_SHAPE and y.item() in (0, 1)


def test_cdsprites_hparams_are_cpu_sized_and_sizes_are_an_option(domainbed):
    from domainbed import datasets, hparams_registry

    hparams = hparams_registry.default_hparams("ERM", "CdSprites15")
    assert hparams["lr"] == 1e-3 and hparams["batch_size"] == 32
    assert hparams["cdsprites_per_domain"] == 2000
    random = hparams_registry.random_hparams("ERM", "CdSprites15", 3)
    assert random == hparams_registry.random_hparams("ERM", "CdSprites15", 3)
    assert 8 <= random["batch_size"] <= 64
    dataset = datasets.get_dataset_class("CdSprites10")("", [10], {**hparams, "cdsprites_per_domain": 6})
    assert [len(env) for env in dataset] == [6] * 11


def test_the_data_seed_hyperparameter_chooses_the_data(domainbed):
    from domainbed import datasets, hparams_registry

    cls = datasets.get_dataset_class("CdSprites5")
    hparams = {**hparams_registry.default_hparams("ERM", "CdSprites5"), "cdsprites_per_domain": 6}
    a, b, c = (cls("", [5], {**hparams, "cdsprites_data_seed": seed}) for seed in (1, 1, 2))
    assert all(torch.equal(x.masks, y.masks) and torch.equal(x.colours, y.colours) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].masks, c[0].masks)
    built = build_cdsprites(5, 6, seed=2)
    assert all(torch.equal(x.masks, y.masks) and torch.equal(x.colours, y.colours) for x, y in zip(c, built, strict=True))


def test_linear_toy_environments_are_domains_1_2_then_the_held_out_3(domainbed):
    """Environment i owns input coordinate i + 1; the held-out domain's coordinate 3 never occurs
    in training."""
    from domainbed import datasets, hparams_registry

    cls = datasets.get_dataset_class("LinearToy")
    assert cls.decorrelated_env() == 2 and cls.ENVIRONMENTS[cls.decorrelated_env()] == "heldout"
    dataset = cls("", [2], {**hparams_registry.default_hparams("ERM", "LinearToy"), "toy_per_domain": 20})
    for i, env in enumerate(dataset):
        x, y = env.tensors
        own = x[:, 1:].nonzero()[:, 1].unique().tolist()
        assert own == [i]
        assert torch.equal(x[:, 1 + i], y.float() * x[:, 1 + i])  # only x2, label 1, uses it


@pytest.mark.parametrize(("name", "size_hparam"), [("CdSprites5", "cdsprites_per_domain"), ("LinearToy", "toy_per_domain")])
def test_dataset_sizes_must_be_whole_numbers(domainbed, name, size_hparam):
    from domainbed import datasets, hparams_registry

    cls = datasets.get_dataset_class(name)
    hparams = hparams_registry.default_hparams("ERM", name)
    whole = {size_hparam: 24.0} if name == "LinearToy" else {size_hparam: np.int64(6), "cdsprites_data_seed": 1.0}
    assert [len(env) for env in cls("", [0], {**hparams, **whole})] == [int(whole[size_hparam])] * len(cls.ENVIRONMENTS)
    for bad in (10.5, "20", True, -4):
        with pytest.raises(ValueError, match=f"{name}: the hyperparameter {size_hparam} must be a whole number "
                                             f">= 0, got {bad!r}; set it as one"):
            cls("", [0], {**hparams, size_hparam: bad})
    if name == "CdSprites5":  # a negative data seed: our message, not NumPy's
        with pytest.raises(ValueError, match="the hyperparameter cdsprites_data_seed must be a whole number >= 0"):
            cls("", [0], {**hparams, "cdsprites_data_seed": -1})


TOY_ENVIRONMENTS = "pass --test_envs 2, the intended test environment (environments: 0: domain1, 1: domain2, 2: heldout)"


@pytest.mark.parametrize(("test_envs", "problem"), [
    ([3], "--test_envs 3 names no environment (they are 0 … 2)"),
    ([-1], "--test_envs -1 names no environment (they are 0 … 2)"),
    ([2, 2], "--test_envs 2 2 repeats an environment, which DomainBed's train script would count twice as held out"),
    ([0, 1, 2], "--test_envs 0 1 2 holds out every environment, leaving none to train on"),
])
def test_test_envs_that_hold_out_nothing_or_everything_are_refused(domainbed, test_envs, problem):
    """DomainBed's train script trained on all three toy environments with --test_envs 3 or -1
    (exit status 0), told the algorithm 1 training domain for 2 with 2 2, and stopped with a
    bare StopIteration with 0 1 2."""
    from domainbed import datasets, hparams_registry

    hparams = {**hparams_registry.default_hparams("ERM", "LinearToy"), "toy_per_domain": 20}
    with pytest.raises(ValueError) as error:
        datasets.get_dataset_class("LinearToy")("", test_envs, hparams)
    assert str(error.value) == f"LinearToy: {problem}; {TOY_ENVIRONMENTS}"
    with pytest.raises(ValueError, match=r"^CdSprites5: --test_envs 6 names no environment \(they are 0 … 5\); "
                                         r"pass --test_envs 5, the intended test environment \(environments: "
                                         r"0: spurious0, .*, 5: decorrelated\)$"):
        datasets.get_dataset_class("CdSprites5")("", [6], hparams_registry.default_hparams("ERM", "CdSprites5"))
    assert len(datasets.get_dataset_class("LinearToy")("", [0, 2], hparams)) == 3  # two held out is fine


def test_domainbed_train_script_refuses_a_test_env_out_of_range(domainbed, tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "domainbed.scripts.train", "--dataset", "LinearToy", "--algorithm", "ERM", "--steps", "2",
         "--test_envs", "3", "--hparams", json.dumps({"toy_per_domain": 20, "batch_size": 4}),
         "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env(),
    )
    assert proc.returncode != 0
    # DomainBed's train script tees its stderr into the process's stdout (and err.txt).
    assert f"ValueError: LinearToy: --test_envs 3 names no environment (they are 0 … 2); {TOY_ENVIRONMENTS}" in proc.stdout
    assert not (tmp_path / "run" / "done").exists()


@pytest.mark.parametrize(("name", "typo", "meant"), [("CdSprites5", "cdsprites_per_domian", "cdsprites_per_domain"),
                                                     ("CdSprites5", "cdsprites_seed", "cdsprites_data_seed"),
                                                     ("LinearToy", "toy_per_domian", "toy_per_domain")])
def test_a_mistyped_dataset_hyperparameter_is_refused(domainbed, name, typo, meant):
    """DomainBed's train script would pass it through unread and build the default size."""
    from domainbed import datasets, hparams_registry

    hparams = {**hparams_registry.default_hparams("ERM", name), typo: 6}
    with pytest.raises(ValueError, match=rf"^{name}: unknown hyperparameter '{typo}': did you mean '{meant}'\? "):
        datasets.get_dataset_class(name)("", [0], hparams)


@pytest.mark.parametrize(("dataset", "featurizer"), [("CdSprites5", "CdSpritesCNN"), ("Debug28", "MNIST_CNN")])
def test_every_algorithm_gets_the_cdsprites_network_for_64px_inputs(domainbed, dataset, featurizer):
    from domainbed import algorithms, hparams_registry

    for name in ("ERM", "CORAL", "Fish", "IDGM"):
        hparams = hparams_registry.default_hparams(name, dataset)
        cls = algorithms.get_algorithm_class(name)
        shape = (3, 64, 64) if dataset.startswith("CdSprites") else (3, 28, 28)
        model = cls(shape, 2, 3, hparams)
        assert type(model.network[0] if hasattr(model, "network") else model.featurizer).__name__ == featurizer


def test_the_cdsprites_classifier_is_the_papers_last_layer(domainbed):
    from domainbed import algorithms, hparams_registry

    torch.manual_seed(0)
    model = algorithms.get_algorithm_class("ERM")((3, 64, 64), 2, 5, hparams_registry.default_hparams("ERM", "CdSprites5"))
    assert isinstance(model.classifier, torch.nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (128, 2)
    # DomainBed's random initialisation: only the linear toy's classifier starts at zero
    for shape, dataset in (((3, 64, 64), "CdSprites5"), ((3, 28, 28), "Debug28")):
        model = algorithms.get_algorithm_class("ERM")(shape, 2, 3, hparams_registry.default_hparams("ERM", dataset))
        assert model.classifier.weight.abs().min() > 0, dataset


def test_domainbeds_own_inputs_keep_domainbeds_networks(domainbed, monkeypatch):
    """The plugin takes only 64×64 images and the linear toy's ``linear_model``; every other input
    shape gets the network DomainBed's own selection gives it."""
    from domainbed import hparams_registry, networks

    from domainbed_fish.networks import CdSpritesCNN, LinearFeatures

    class StubResNet(torch.nn.Module):  # DomainBed's would download ImageNet weights
        def __init__(self, input_shape, hparams):
            super().__init__()

    monkeypatch.setattr(networks, "ResNet", StubResNet)
    hparams = {**hparams_registry.default_hparams("ERM", "Debug28"), "mlp_width": 8, "mlp_depth": 3, "mlp_dropout": 0.0}
    expected = {(10,): networks.MLP, (4,): networks.MLP, (2, 28, 28): networks.MNIST_CNN,
                (3, 28, 28): networks.MNIST_CNN, (3, 32, 32): networks.wide_resnet.Wide_ResNet,
                (3, 224, 224): StubResNet, (3, 64, 64): CdSpritesCNN}
    for shape, cls in expected.items():
        assert type(networks.Featurizer(shape, hparams)) is cls, shape
    assert type(networks.Featurizer((4,), {**hparams, "linear_model": True})) is LinearFeatures


def test_linear_toy_model_is_linear_and_starts_at_zero(domainbed):
    from domainbed import algorithms, hparams_registry

    for name in ("ERM", "Fish", "IDGM"):
        model = algorithms.get_algorithm_class(name)((4,), 2, 2, hparams_registry.default_hparams(name, "LinearToy"))
        params = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in params) == 4 * 2 + 2  # one linear layer, 4 -> 2
        assert all(p.abs().sum() == 0 for p in params)


@pytest.mark.parametrize(("dataset", "algorithm", "test_env", "hparams"), [
    ("CdSprites5", "Fish", 5, {"cdsprites_per_domain": 20, "batch_size": 4, "gip_every": 1}),
    ("LinearToy", "IDGM", 2, {"toy_per_domain": 100, "batch_size": 50, "gip_every": 1}),
])
def test_domainbed_train_script_on_the_papers_datasets(domainbed, tmp_path, dataset, algorithm, test_env, hparams):
    out = tmp_path / "run"
    proc = subprocess.run(
        [PYTHON, "-m", "domainbed.scripts.train", "--dataset", dataset, "--algorithm", algorithm,
         "--steps", "3", "--checkpoint_freq", "2", "--test_envs", str(test_env),
         "--hparams", json.dumps(hparams), "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "done").exists()
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    assert f"env{test_env}_out_acc" in records[-1] and "gip" in records[-1]
    assert records[0]["hparams"] | hparams == records[0]["hparams"]
