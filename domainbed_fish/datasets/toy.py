"""The linear toy example of Shi et al. (ICLR 2022, Figures 1 and 2), reconstructed from the caption
of Figure 2 (README, "Datasets").

Inputs are 4-dimensional: coordinate 0 is shared by all domains, coordinate ``d``
(1, 2 or 3) belongs to domain ``d``.  Every domain holds three kinds of input:

- ``x1 = [0, 0, 0, 0]``, label 0, 50% of the domain;
- ``x2 = [1, e_d]`` (shared coordinate and the domain's own), label 1, 40%;
- ``x3 = [1, 0, 0, 0]``, label 1 for 30% of them and 0 for 70%, 10%.

Domains 1 and 2 are for training; domain 3 is held out.  A linear model that
explains ``x2`` by the domain coordinates pushes the shared weight down (most
``x3`` are label 0) and scores 50% + 7% = 57% on the held-out domain; one that
relies on the shared coordinate scores 50% + 40% + 3% = 93%.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

INPUT_DIM = 4
TRAINING_COORDINATES = (1, 2)
HELDOUT_COORDINATE = 3
#: Fractions of x1, x2, x3 in a domain, and of label 1 among the x3.
FRACTIONS = (0.5, 0.4, 0.1)
X3_POSITIVE = 0.3


def _counts(size: int) -> tuple[int, int, int, int]:
    n1, n2 = round(FRACTIONS[0] * size), round(FRACTIONS[1] * size)
    n3 = size - n1 - n2
    n3_pos = round(X3_POSITIVE * n3)
    return n1, n2, n3 - n3_pos, n3_pos


def toy_domain(coordinate: int, size: int, seed: int = 0) -> TensorDataset:
    """One domain of the toy, ``size`` examples in exact proportions, shuffled with ``seed``.

    ``coordinate`` is the domain's own input coordinate (1, 2 or 3).
    """
    if not 1 <= coordinate < INPUT_DIM:
        raise ValueError(f"a toy domain owns one of the coordinates 1..{INPUT_DIM - 1}, got {coordinate}")
    n1, n2, n3_neg, n3_pos = _counts(size)
    if min(n1, n2, n3_neg, n3_pos) < 1:
        raise ValueError(
            f"a toy domain needs every kind of input; {size} examples per domain is too few. "
            "Use toy_per_domain ≥ 20."
        )
    x2 = np.zeros(INPUT_DIM)
    x2[[0, coordinate]] = 1.0
    x3 = np.eye(INPUT_DIM)[0]
    x = np.concatenate([np.zeros((n1, INPUT_DIM)), np.tile(x2, (n2, 1)), np.tile(x3, (n3_neg + n3_pos, 1))])
    y = np.concatenate([np.zeros(n1), np.ones(n2), np.zeros(n3_neg), np.ones(n3_pos)])
    order = np.random.default_rng([seed, coordinate]).permutation(size)
    return TensorDataset(torch.as_tensor(x[order], dtype=torch.float32), torch.as_tensor(y[order], dtype=torch.long))


def expected_heldout_accuracy(shared_solution: bool) -> float:
    """Held-out accuracy of the two linear solutions: relying on the shared feature
    (1 on x2 and x3, 0 on x1: 0.93) or on the domain's own (0 on x1, x3 and the
    held-out domain's x2: 0.57)."""
    x1, x2, x3 = FRACTIONS
    if shared_solution:
        return x1 + x2 + x3 * X3_POSITIVE
    return x1 + x3 * (1 - X3_POSITIVE)
