"""CdSprites-N (Shi et al., ICLR 2022, section 4.1): coloured sprites with a spurious colour.

Each of the N training domains has its own palette of two colours and colours
every sprite with colour ``palette[label]``: inside a domain colour predicts the
label perfectly, and so does the shape (square 0, ellipse 1), which is the only
cue shared by all domains.  One more environment, the paper's test split, colours
each sprite with a random colour of a random training palette, independently of
the label.  The domains hold disjoint sprites of the dSprites grid, half of each
shape.

Images are stored as uint8 masks plus one colour per image (4 KiB + 12 B each)
and coloured on access, so CdSprites-50 at 2,000 images per domain stays near
400 MiB.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from domainbed_fish.datasets.sprites import SPRITES_PER_SHAPE, SpriteLatents, rasterise

#: Minimum Euclidean distance (in RGB, each channel in [0, 1]) between a domain's two colours.
MIN_COLOUR_DISTANCE = 0.35
_COLOUR_RANGE = (0.15, 1.0)


@dataclass
class ColouredSprites(Dataset):
    """One environment: masks ``(n, 64, 64)`` uint8, colours ``(n, 3)``, labels ``(n,)``."""

    masks: Tensor
    colours: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.masks[index].unsqueeze(0) * self.colours[index][:, None, None], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        # One vectorised gather per batch when a DataLoader asks for a whole batch.
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images(index)
        return list(zip(images.unbind(0), self.labels[index].unbind(0), strict=True))

    def images(self, index: Tensor | slice = slice(None)) -> Tensor:
        """Float images ``(k, 3, 64, 64)`` of the sprites ``index``."""
        return self.masks[index].unsqueeze(1) * self.colours[index][:, :, None, None]


def domain_palettes(num_domains: int, rng: np.random.Generator) -> np.ndarray:
    """``(num_domains, 2, 3)`` colours: row ``d`` is domain ``d``'s palette, index = label.

    Colours are uniform in [0.15, 1]³ (dark colours would be hard to see on the
    black background), redrawn until the two colours of a palette are at least
    ``MIN_COLOUR_DISTANCE`` apart so colour is a usable shortcut in every domain.
    """
    palettes = np.empty((num_domains, 2, 3))
    for d in range(num_domains):
        while True:
            pair = rng.uniform(*_COLOUR_RANGE, size=(2, 3))
            if np.linalg.norm(pair[0] - pair[1]) >= MIN_COLOUR_DISTANCE:
                break
        palettes[d] = pair
    return palettes


def max_per_domain(num_domains: int) -> int:
    """The most sprites per environment with disjoint environments (N domains + test)."""
    return 2 * (SPRITES_PER_SHAPE // (num_domains + 1))


@functools.lru_cache(maxsize=2)
def build_cdsprites(num_domains: int, per_domain: int, seed: int = 0) -> tuple[ColouredSprites, ...]:
    """The N spurious training domains followed by the decorrelated environment.

    Deterministic in ``(num_domains, per_domain, seed)``: the sprites come from a
    seeded permutation of the dSprites grid and are rasterised in float64.
    """
    if num_domains < 1:
        raise ValueError(f"CdSprites needs at least one training domain, got num_domains={num_domains}")
    limit = max_per_domain(num_domains)
    if not 2 <= per_domain <= limit:
        raise ValueError(
            f"CdSprites{num_domains}: {per_domain} images per domain is not possible; the "
            f"dSprites grid holds 2 to {limit} disjoint sprites per environment for "
            f"{num_domains + 1} environments. Set the hyperparameter cdsprites_per_domain in that range."
        )
    num_envs = num_domains + 1
    rng = np.random.default_rng(seed)
    per_shape = (math.ceil(per_domain / 2), per_domain // 2)
    chosen = [rng.permutation(SPRITES_PER_SHAPE)[: n * num_envs] for n in per_shape]
    palettes = domain_palettes(num_domains, rng)

    latents, colours = [], []
    for env in range(num_envs):
        parts = [
            SpriteLatents.from_flat_index(shape, chosen[shape][env * n : (env + 1) * n])
            for shape, n in enumerate(per_shape)
        ]
        env_latents = SpriteLatents.concatenate(parts)
        order = rng.permutation(per_domain)
        env_latents = SpriteLatents(*(getattr(env_latents, f)[order] for f in SpriteLatents.__dataclass_fields__))
        labels = env_latents.shape
        if env < num_domains:
            env_colours = palettes[env, labels]
        else:  # decorrelated: a random palette and a random colour of it, whatever the label
            env_colours = palettes[rng.integers(num_domains, size=per_domain), rng.integers(2, size=per_domain)]
        latents.append(env_latents)
        colours.append(env_colours)

    masks = rasterise(SpriteLatents.concatenate(latents)).split(per_domain)
    return tuple(
        ColouredSprites(
            masks=env_masks,
            colours=torch.as_tensor(env_colours, dtype=torch.float32),
            labels=torch.as_tensor(env_latents.shape, dtype=torch.long),
        )
        for env_masks, env_colours, env_latents in zip(masks, colours, latents, strict=True)
    )
