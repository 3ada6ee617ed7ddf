"""Training-set sampling: an explicit approximation that scores a seeded subset of the training set.

Reported indices always refer to the full training set; training examples left out get NaN in
full-length outputs (self-influence, the influence matrix)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .loaders import DataSource, dataset_size, make_loader
from .distributed import rank_and_world, shard_range
from ..errors import TracInError


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


@dataclass
class TrainPlan:
    """What this process scores: ``loader`` over its examples, which are positions
    ``offset .. offset + n_local`` of the ``n_scored`` scored examples; ``sampled`` maps scored
    positions to full-set indices (None without sampling); ``n_full`` is the full training set size."""

    loader: DataLoader
    sampled: Optional[np.ndarray]
    n_full: int
    n_scored: int
    offset: int
    n_local: int

    def to_full(self, positions: torch.Tensor) -> torch.Tensor:
        """Scored positions -> full training-set indices."""
        return torch.as_tensor(self.sampled)[positions] if self.sampled is not None else positions

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """[..., n_scored] values -> [..., n_full], NaN for examples left out by sampling."""
        if self.sampled is None:
            return values
        out = torch.full(values.shape[:-1] + (self.n_full,), float("nan"), dtype=values.dtype)
        out[..., torch.as_tensor(self.sampled)] = values
        return out


def plan_training(data: DataSource, batch_size: int, num_workers: int, task, sample_rate: Optional[float],
                  stratify_by: Union[str, Callable, None], seed: int) -> TrainPlan:
    """Sample (when ``sample_rate``) and shard (under torch.distributed) the training set.
    ``stratify_by``: a key the task knows (``task.strata(batch, key)``) or a callable batch -> keys [B]."""
    loader = make_loader(data, batch_size, "training", num_workers)
    n_full = dataset_size(loader)
    sampled = None
    if sample_rate is not None:
        strata = None
        if stratify_by is not None:
            if isinstance(stratify_by, str):
                parts = [task.strata(batch, stratify_by) for batch in loader]
            else:
                parts = [stratify_by(batch) for batch in loader]
            if any(p is None for p in parts):
                raise TracInError(f"stratify_by={stratify_by!r} is not a key this task provides; use 'label' with a "
                                  "task that has labels, a key the task documents, or a callable batch -> keys.")
            strata = torch.cat([torch.as_tensor(p).reshape(-1) for p in parts])
        sampled = sample_indices(n_full, sample_rate, seed, strata)
        loader = make_loader(Subset(loader.dataset, sampled.tolist()), batch_size, "training", num_workers)
    n_scored = dataset_size(loader)
    rank, world = rank_and_world()
    start, stop = 0, n_scored
    if world > 1:
        start, stop = shard_range(n_scored, batch_size, rank, world)
        if stop <= start:
            raise TracInError(f"Rank {rank} has no training examples: {n_scored} examples in batches of {batch_size} "
                              f"cannot feed {world} ranks; use fewer processes or a smaller batch_size.")
        loader = make_loader(Subset(loader.dataset, range(start, stop)), batch_size, "training", num_workers)
    return TrainPlan(loader, sampled, n_full, n_scored, start, stop - start)
