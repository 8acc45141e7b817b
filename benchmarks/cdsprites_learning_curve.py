"""Learning curve of one algorithm on CdSprites-N, fast, for diagnosing the N = 15 results.

    python benchmarks/cdsprites_learning_curve.py --algorithm Fish --domains 15 --seed 0 \
        [--steps 251] [--every 50] [--hparams '{"meta_lr": 0.1}'] [--shape_only] [--init he] [--linearity] \
        [--per_domain] [--centre_palettes] [--rounds 2]

The algorithm and its hyperparameters are DomainBed's (``default_hparams`` for the
dataset, then ``--hparams``; the reproduction preset's 1,000 sprites per domain and 32
per domain per step unless overridden), but the minibatches are drawn straight from the
dataset's tensors and only the training domains' held-out 20% and the decorrelated
environment are evaluated (251 steps of a CdSprites-15 Fish curve, evaluation included, took
2.3-2.4 min two runs at a time on 2 cores on 2026-12-03; the preset's train-script job of the
same length spends 2.2 min in its training steps alone).  The split
and the sampling are seeded here, not as DomainBed's train script seeds them, so seed k
here is not seed k of the reproduction.  Prints, every ``--every`` steps: the mean
training loss since the last line, the training-domain validation accuracy and the
accuracy on the decorrelated environment; for IDGM also the last step's cross-entropy, Ĝ and
penalty weight γ_t.  A run whose loss turns non-finite ends with a line
``step N  diverged (…): <the error>`` and exit status 1, not a traceback.

Controls:
- ``--shape_only`` recolours the training domains with their own colours shuffled across
  labels, so only shape predicts the label: how many steps the network needs to learn
  shape when colour is no shortcut;
- ``--init he`` or ``--init lecun`` re-initialises the convolutions with He's or LeCun's
  normal initialisation (zero biases) instead of PyTorch's default: whether the N = 15
  outcome is a race out of the default initialisation's plateau;
- ``--linearity`` prints, for the initial network (after ``--init``), how much of each
  convolution's pre-activations varies with the image and how much its ReLUs' on/off
  pattern does (``input_dependence``), then stops: how close to affine the network starts;
- ``--per_domain`` adds each training domain's validation accuracy, the domains ordered by the
  cosine between their colour difference (label-1 colour minus label-0 colour) and its mean
  over domains, and ``--centre_palettes`` shifts each palette entry by half that mean (label 0
  up, label 1 down, the decorrelated environment's colours with them) so that the mean is zero:
  whether the colour cue the domains share on average is what an algorithm fits;
- ``--rounds k`` gives the algorithm k fresh minibatches of every domain per step (for Fish,
  kS inner steps per outer step over S distinct domains): whether Fish at N needs N domains or
  only N inner steps per outer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import numpy as np
import torch
from torch import Tensor

import domainbed_fish  # noqa: F401  (registers the datasets and algorithms)
from domainbed_fish.errors import NonFiniteLossError
from domainbed_fish.fish import copy_state_, model_state_tensors
from domainbed_fish.locate import import_domainbed

PRESET_HPARAMS = {"cdsprites_per_domain": 1000, "batch_size": 32}
HOLDOUT_FRACTION = 0.2  # DomainBed's default
#: ``--init`` choices besides PyTorch's default: normal weights of variance gain²/fan_in with
#: the gain of this nonlinearity (He: 2/fan_in, which keeps the signal's scale through ReLUs;
#: LeCun: 1/fan_in, which halves it at each ReLU), and zero biases.
INIT_NONLINEARITY = {"he": "relu", "lecun": "linear"}


def setup(algorithm: str, domains: int, seed: int, overrides: str) -> tuple:
    """(dataset, algorithm class, hparams, generator) of a CdSprites-N run, everything seeded.

    hparams are DomainBed's defaults for ``algorithm`` on CdSprites-N, then the preset's sizes,
    then ``overrides`` (JSON).  DomainBed's lookups come first: on a typo they name the choices.
    """
    algorithms = import_domainbed("algorithms")
    datasets = import_domainbed("datasets")
    name = f"CdSprites{domains}"
    dataset_class = datasets.get_dataset_class(name)
    algorithm_class = algorithms.get_algorithm_class(algorithm)
    try:
        overrides_dict = json.loads(overrides)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--hparams is not valid JSON ({error}): pass an object such as "
                         """'{"lr": 0.002}'""") from None
    registry = import_domainbed("hparams_registry")
    hparams = {**registry.default_hparams(algorithm, name), **PRESET_HPARAMS, **overrides_dict}
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return dataset_class("", [domains], hparams), algorithm_class, hparams, generator


def split(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(training part, held-out part) of one domain, as DomainBed's holdout fraction."""
    perm = torch.randperm(len(y), generator=generator)
    k = int(HOLDOUT_FRACTION * len(y))
    return (x[perm[k:]], y[perm[k:]]), (x[perm[:k]], y[perm[:k]])


@torch.no_grad()
def input_dependence(module: torch.nn.Module, images: Tensor) -> list[tuple[float, float]]:
    """Per convolution of ``module`` (in order, ReLU after each): (share, gate variability).

    share = mean over units of Var_x[z] / E_x[z²] for the pre-activation z over ``images``:
    near 0 when the bias dominates, so the unit hardly sees the image.  Gate variability =
    mean of 4·p(1 − p), p the fraction of images that switch the ReLU on: 0 when every image
    gets the same on/off pattern, so the network is affine in its input.
    """
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    result, h = [], images
    for conv in convs:
        z = conv(h)
        on = (z > 0).float().mean(0)
        result.append(((z.var(0) / (z ** 2).mean(0).clamp_min(1e-30)).mean().item(), (4 * on * (1 - on)).mean().item()))
        h = torch.relu(z)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="Fish")
    parser.add_argument("--domains", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=251)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--hparams", default="{}", help="JSON, over the defaults and the preset's sizes")
    parser.add_argument("--shape_only", action="store_true")
    parser.add_argument("--init", choices=("default", *INIT_NONLINEARITY), default="default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per_domain", action="store_true",
                        help="also print each training domain's validation accuracy, ordered by how far its "
                             "colour difference points along the mean over domains")
    parser.add_argument("--centre_palettes", action="store_true",
                        help="shift every palette so that the colour differences average to zero over domains")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh minibatches of every domain this many times over per step (Fish: "
                             "inner steps per outer step)")
    parser.add_argument("--linearity", action="store_true",
                        help="print how far the initial network is from linear in its input, then stop")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give each domain at least one minibatch a step (--rounds 1 or more)")
    torch.set_num_threads(args.threads)

    dataset, algorithm_class, hparams, generator = setup(args.algorithm, args.domains, args.seed, args.hparams)
    *training, decorrelated = list(dataset)
    palettes = torch.stack([torch.stack([env.colours[env.labels == c][0] for c in (0, 1)]) for env in training])
    mean_difference = (palettes[:, 1] - palettes[:, 0]).mean(0)
    alignment = torch.nn.functional.cosine_similarity(palettes[:, 1] - palettes[:, 0], mean_difference[None], dim=1)
    domain_order = alignment.argsort(descending=True)
    if args.per_domain or args.centre_palettes:
        print(f"mean colour difference over domains {mean_difference.norm():.3f} (per domain "
              f"{(palettes[:, 1] - palettes[:, 0]).norm(dim=1).mean():.3f}); cosine of each domain's with it, "
              f"descending: {' '.join(f'{a:+.2f}' for a in alignment[domain_order])}")
    shift = torch.stack([mean_difference / 2, -mean_difference / 2])

    def recolour(colours: Tensor) -> Tensor:
        """With ``--centre_palettes``, each colour moved by its palette entry's shift."""
        if not args.centre_palettes:
            return colours
        match = (colours[:, None, None] == palettes[None]).all(-1)  # (n, domain, entry)
        entry = match.any(1).float().argmax(1)
        return (colours + shift[entry]).clamp(0, 1)

    train_parts, val_parts = [], []
    for env in training:
        colours = recolour(env.colours)
        if args.shape_only:
            colours = colours[torch.randperm(len(colours), generator=generator)]
        images = dataclasses.replace(env, colours=colours).images()
        train, val = split(images, env.labels, generator)
        train_parts.append(train)
        val_parts.append(val)
    test = (dataclasses.replace(decorrelated, colours=recolour(decorrelated.colours)).images(), decorrelated.labels)

    algorithm = algorithm_class(dataset.input_shape, dataset.num_classes, args.domains, hparams)
    if args.init != "default":
        for module in algorithm.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity=INIT_NONLINEARITY[args.init])
                torch.nn.init.zeros_(module.bias)
        if hasattr(algorithm, "fish"):  # Fish's inner copy must start from the same weights
            copy_state_(model_state_tensors(algorithm.fish.inner_network), model_state_tensors(algorithm.network))

    if args.linearity:
        images = torch.cat([x[:64] for x, _ in train_parts])
        for layer, (share, gates) in enumerate(input_dependence(algorithm.featurizer, images), start=1):
            print(f"conv {layer}: {100 * share:5.1f}% of the pre-activations' second moment varies with the "
                  f"image; gate variability {gates:.2f}")
        return

    @torch.no_grad()
    def accuracy(x: Tensor, y: Tensor) -> float:
        algorithm.eval()
        value = (algorithm.predict(x).argmax(1) == y).float().mean().item()
        algorithm.train()
        return value

    batch = hparams["batch_size"]
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        minibatches = []
        for x, y in train_parts * args.rounds:
            index = torch.randint(len(y), (batch,), generator=generator)
            minibatches.append((x[index], y[index]))
        try:
            logged = algorithm.update(minibatches)
        except NonFiniteLossError as error:
            # A diverged run is a result here (a penalty that ran away), not a crash: say where.
            print(f"step {step:4d}  diverged ({time.perf_counter() - start:.0f} s): {error}", flush=True)
            raise SystemExit(1) from None
        losses.append(logged["loss"])
        if step % args.every == 0 or step == args.steps - 1:
            per_domain = [accuracy(x, y) for x, y in val_parts]
            val = float(np.mean(per_domain))
            print(f"step {step:4d}  loss {np.mean(losses[-args.every:]):.3f}  val {100 * val:5.1f}  "
                  f"decorrelated {100 * accuracy(*test):5.1f}  ({time.perf_counter() - start:.0f} s)"
                  + _idgm_values(logged), flush=True)
            if args.per_domain:
                print("    per domain: " + " ".join(f"{100 * per_domain[d]:3.0f}" for d in domain_order), flush=True)


def _idgm_values(logged: dict[str, float]) -> str:
    """IDGM's cross-entropy, Ĝ and penalty weight γ_t at this step: whether the penalty is
    running away (Ĝ and the cross-entropy jumping together) or held down by the bound."""
    if "penalty_weight" not in logged:
        return ""
    return f"  nll {logged['nll']:.3f}  gip {logged['gip']:.3g}  gamma_t {logged['penalty_weight']:.3g}"


if __name__ == "__main__":
    main()
