"""Dead ReLU units in saved CdSprites checkpoints of DomainBed's train script.

    python benchmarks/cdsprites_dead_units.py RUN_DIR_OR_PKL [...] [--probe 32]

For each checkpoint (a run directory's ``model_step*.pkl`` in step order, then its
``model.pkl``; or the ``.pkl`` files given) prints, per convolution of the CdSprites
network, the share of units that no probe image switches on (dead: the unit and
everything it feeds get no gradient) and the share that every probe image switches on
everywhere (always on: the unit is affine in its input).  The probe is the first
``--probe`` images of each training domain of the checkpoint's own dataset and
hyperparameters.  A network whose last convolution is all dead predicts a constant:
its training loss sits at log 2 = 0.693 and only the classifier's bias still learns.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import Tensor, nn

import domainbed_fish
from domainbed_fish.locate import import_domainbed
from domainbed_fish.networks import CdSpritesCNN


def checkpoints(paths: list[Path]) -> list[Path]:
    """The ``.pkl`` files of ``paths``: run directories expand to their checkpoints by step."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            steps = sorted(path.glob("model_step*.pkl"), key=lambda p: int(re.findall(r"step(\d+)", p.name)[0]))
            in_dir = steps + [p for p in [path / "model.pkl"] if p.exists()]
            if not in_dir:
                raise SystemExit(f"{path}: no model.pkl or model_step*.pkl in it; train with DomainBed's "
                                 "--save_model_every_checkpoint for the per-step ones")
            found += in_dir
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"{path}: no such run directory or checkpoint file")
    return found


@torch.no_grad()
def unit_activity(network: CdSpritesCNN, images: Tensor) -> list[tuple[float, float]]:
    """Per convolution: (share of units never on, share of units always on) over ``images``,
    a unit being one channel, on for an image when positive anywhere in it."""
    result, h = [], images.contiguous(memory_format=network.MEMORY_FORMAT)
    for layer in network.layers:
        h = layer(h)
        if isinstance(layer, nn.ReLU):
            on = (h > 0).flatten(2)
            ever, always = on.any(2).any(0), on.all(2).all(0)
            result.append(((~ever).float().mean().item(), always.float().mean().item()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--probe", type=int, default=32, help="images per training domain")
    args = parser.parse_args()
    domainbed_fish.register()
    algorithms, datasets = import_domainbed("algorithms"), import_domainbed("datasets")
    torch.set_num_threads(1)

    probes: dict[tuple, Tensor] = {}
    print("checkpoint  per convolution: dead / always on")
    for path in checkpoints(args.paths):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        run, hparams = saved["args"], saved["model_hparams"]
        if not run["dataset"].startswith("CdSprites"):
            raise SystemExit(f"{path}: a checkpoint of {run['dataset']}; give checkpoints of CdSprites-N runs")
        key = (run["dataset"], tuple(run["test_envs"]), repr(sorted(hparams.items())))
        if key not in probes:
            dataset = datasets.get_dataset_class(run["dataset"])(None, run["test_envs"], hparams)
            probes[key] = torch.cat([env.images(slice(0, args.probe))
                                     for i, env in enumerate(dataset) if i not in run["test_envs"]])
        algorithm = algorithms.get_algorithm_class(run["algorithm"])(
            saved["model_input_shape"], saved["model_num_classes"], saved["model_num_domains"], hparams)
        algorithm.load_state_dict(saved["model_dict"])
        network = next(m for m in algorithm.modules() if isinstance(m, CdSpritesCNN))
        activity = unit_activity(network, probes[key])
        print(f"{path.parent.name}/{path.name}  " + "  ".join(f"{d:.2f}/{a:.2f}" for d, a in activity), flush=True)


if __name__ == "__main__":
    main()
