"""The seed's train/validation split: a seeded random permutation, the last int(f * n) rows held out."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MIN_TRAIN_ROWS = 2  # a line through fewer points is not determined
MIN_VAL_ROWS = 1


def validation_size(n_rows: int, val_fraction: float) -> int:
    """int(val_fraction * n) as the seed computes it, robust to float error (0.29 * 100 -> 29)."""
    return math.floor(val_fraction * n_rows + 1e-9)


def rows_needed(val_fraction: float) -> int:
    """Fewest rows that leave MIN_TRAIN_ROWS for training and, when a split is asked, MIN_VAL_ROWS held out."""
    n = MIN_TRAIN_ROWS
    while val_fraction > 0 and (validation_size(n, val_fraction) < MIN_VAL_ROWS or n - validation_size(n, val_fraction) < MIN_TRAIN_ROWS):
        n += 1
    return n


def split_indices(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices; the same seed gives the same indices in any process.

    torch.randperm on the CPU with its own Generator is deterministic for a given seed,
    independent of the global RNG and of other threads.
    """
    import torch  # here, not above: the flow imports this module for rows_needed, and a cached run needs no torch

    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n_rows, generator=generator).numpy()
    n_val = validation_size(n_rows, val_fraction)
    if n_val == 0:
        return shuffled, shuffled[:0]
    return shuffled[:-n_val], shuffled[-n_val:]
