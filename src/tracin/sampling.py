"""Training-set sampling: an explicit approximation that scores a seeded subset of the training set.

Reported indices always refer to the full training set; training examples left out get NaN in
full-length outputs (self-influence, the influence matrix)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .errors import TracInError


def sample_indices(n: int, rate: float, seed: int = 0, strata: Optional[torch.Tensor] = None) -> np.ndarray:
    """Sorted indices of about ``rate * n`` examples. With ``strata`` [n] (labels or any key), each
    stratum keeps round(rate * its size) examples, at least one, so proportions are preserved."""
    if not 0 < rate <= 1:
        raise TracInError(f"sample_rate must be in (0, 1], got {rate}.")
    rng = np.random.default_rng(seed)
    if strata is None:
        return np.sort(rng.choice(n, size=max(1, int(round(rate * n))), replace=False))
    keys = strata.cpu().numpy()
    if len(keys) != n:
        raise TracInError(f"stratify_by gave {len(keys)} keys for {n} training examples.")
    chosen = []
    for value in np.unique(keys):
        members = np.flatnonzero(keys == value)
        chosen.append(rng.choice(members, size=max(1, int(round(rate * len(members)))), replace=False))
    return np.sort(np.concatenate(chosen))
