"""The training side of a pass: the training data read once for every checkpoint (groups of raw batches, each
seeing every checkpoint in turn) and, for an influence pass, in tiles of batches sized from the memory budget.
``run`` is a :class:`TrainingRun` (the scheduler): its checkpoints, plan and budget.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Protocol, Tuple

import torch
from torch.utils.data import DataLoader

from . import blocks
from .blocks import batch_bytes
from .loaders import loader_from
from ..tasks.base import Task


class TrainingRun(Protocol):
    """What the training side of a pass reads of its run (the scheduler provides it)."""

    task: Task
    device: torch.device
    dtype: torch.dtype  # of the scores
    checkpoints: list
    budget: int  # bytes of working memory
    plan: Dict[str, int]  # "tile_limit" (training examples per tile) once decided, or preset to repeat a run's tiling
    stats: Dict[str, object]

    def load(self, index: int) -> None:
        """Load checkpoint ``index`` into the model."""

    def numbered(self, loader: DataLoader, first: int = 0) -> Iterator[Tuple[int, object]]:
        """(index of the batch's first example, raw batch) over ``loader``, counting from ``first``."""


def groups(run: TrainingRun, loader: DataLoader) -> Iterator[List[Tuple[int, object]]]:
    """Consecutive raw batches (index of the first example, batch) in host-memory groups of about
    ``blocks.STAGING_BYTES`` (at least one batch), so a pass over every checkpoint reads the data once."""
    group: List[Tuple[int, object]] = []
    size = 0
    for first, batch in run.numbered(loader):
        group.append((first, batch))
        size += batch_bytes(batch)
        if size > blocks.STAGING_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def at_checkpoints(run: TrainingRun, loader: DataLoader) -> Iterator[Tuple[int, int, object]]:
    """(checkpoint index, index of the batch's first example, raw batch) for every batch at every
    checkpoint, with that checkpoint loaded. Each group of raw batches (:func:`groups`) sees every
    checkpoint in turn, so the data is read once and each checkpoint loaded once per group."""
    for group in groups(run, loader):
        for c in range(len(run.checkpoints)):
            run.load(c)
            for first, batch in group:
                yield c, first, batch


def tiles(run: TrainingRun, train: DataLoader, m: int, cache_bytes: int, skip_until: int = 0) -> Iterator[List[Tuple[int, object]]]:
    """Groups of consecutive train batches (moved to the device) sized from the budget, or from
    ``run.plan["tile_limit"]`` when preset. Batches before ``skip_until`` (scored by an interrupted
    run) are not read when the loader can start there (:func:`tracin.engine.loaders.loader_from`), else
    read but not moved."""
    free = max(0, run.budget - cache_bytes)
    tile: List[Tuple[int, object]] = []
    count = 0
    resumed = loader_from(train, skip_until)
    source, offset = (resumed, skip_until) if resumed is not None else (train, 0)
    if skip_until and resumed is not None:
        run.stats["resumed_from"] = skip_until
    for first, batch in run.numbered(source, offset):
        b = run.task.batch_size(batch)
        if first + b > skip_until:
            batch = run.task.to_device(batch, run.device)
        if tile and first == skip_until:  # a resumed run restarts its tiles where the last one ended
            yield tile
            tile, count = [], 0
        if "tile_limit" not in run.plan:
            per_example = 3 * m * torch.finfo(run.dtype).bits // 8 + batch_bytes(batch) / max(1, b)
            run.plan["tile_limit"] = max(1, int(free // max(1.0, per_example)))
        # read every time: an out-of-memory split lowers it for the tiles that follow
        if tile and count + b > run.plan["tile_limit"]:
            yield tile
            tile, count = [], 0
        tile.append((first, batch))
        count += b
    if tile:
        yield tile
