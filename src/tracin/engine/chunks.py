"""The test side of an influence pass: the test set in chunks, each chunk's factors computed once per checkpoint.

A chunk is sized so that its factors for every checkpoint fit in half the memory budget (probed on the first batch);
raw test batches are staged in host memory up to ``blocks.STAGING_BYTES`` and then run through every checkpoint,
each loaded once. ``run`` is a :class:`TestRun` (the scheduler): its model at each checkpoint, its plan and budget.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from torch.utils.data import DataLoader

from . import blocks
from .blocks import FactorDict, batch_bytes, factor_bytes, factor_rows, merge_blocks
from ..tasks.base import Task


class TestRun(Protocol):
    """What the test side of an influence pass reads of its run (the scheduler provides it)."""

    task: Task
    device: torch.device
    checkpoints: list
    budget: int  # bytes of working memory
    plan: Dict[str, int]  # "chunk_examples" (test examples per chunk) once probed, or preset to repeat a run's tiling
    normalize: str  # "cosine" keeps the test gradients' norms with their factors
    loaded: Optional[int]  # the checkpoint the model holds
    detect_source: Optional[DataLoader]  # the training data the exact layers are decided on, when the pass has it

    def load(self, index: int) -> None:
        """Load checkpoint ``index`` into the model."""

    def detect(self, loader: Optional[DataLoader] = None, batch: object = None) -> None:
        """Decide the exact layers on the first batch of ``loader`` (or on ``batch``), once."""

    def factors(self, batch: object, what: str, first_index: int) -> FactorDict:
        """Factors of a batch on the device at the loaded checkpoint."""

    def numbered(self, loader: DataLoader, first: int = 0) -> Iterator[Tuple[int, object]]:
        """(index of the batch's first example, raw batch) over ``loader``."""

    def self_scores(self, factors: FactorDict, size: int) -> torch.Tensor:
        """Squared gradient norms [size] from a batch's factors."""

    def norms(self, squared: torch.Tensor) -> torch.Tensor:
        """Gradient norms from squared norms, kept away from zero."""


def _stage(run: TestRun, staged: List[Tuple[int, object]], per_checkpoint: List[List[FactorDict]]) -> None:
    """Test factors of the ``staged`` raw batches at every checkpoint (each loaded once), appended
    to ``per_checkpoint``; the raw batches are released."""
    if not staged:
        return
    for c, factors in enumerate(per_checkpoint):
        run.load(c)
        for first, batch in staged:
            factors.append(run.factors(run.task.to_device(batch, run.device), "test", first))
    staged.clear()


def _chunk_cache(run: TestRun, per_checkpoint: List[List[FactorDict]]) -> list:
    """For each checkpoint: the chunk's test factors merged into few blocks (row offset within the
    chunk, factors), and the test gradients' norms [m] when scores are cosine-normalised."""
    cache = []
    for per_batch in per_checkpoint:
        norms = None
        if run.normalize == "cosine":
            norms = run.norms(torch.cat([run.self_scores(f, factor_rows(f)) for f in per_batch]))
        cache.append((merge_blocks(per_batch), norms))
    return cache


def _chunk_examples(run: TestRun, first_batch) -> int:
    """Test examples per chunk, so that a chunk's factors for every checkpoint fit in half the
    budget. Probes one batch at the first checkpoint (once; a preset plan is kept)."""
    run.detect(run.detect_source, first_batch)  # on the training data when the run has it
    if "chunk_examples" not in run.plan:
        if run.loaded != 0:
            run.load(0)
        probe = run.factors(run.task.to_device(first_batch, run.device), "test", 0)
        per_test = factor_bytes(probe) / max(1, run.task.batch_size(first_batch))
        run.plan["chunk_examples"] = max(1, int(run.budget * 0.5 // max(1.0, len(run.checkpoints) * per_test)))
    return run.plan["chunk_examples"]


def test_chunks(run: TestRun, test: DataLoader, skip: Optional[Callable[[int], bool]] = None) -> Iterator[Tuple[slice, Optional[list]]]:
    """(rows, cache) for each chunk of the test set, reading ``test`` once; ``cache`` is
    :func:`_chunk_cache`'s per-checkpoint factors, or None for a chunk whose first row ``skip``
    names (finished by an interrupted run: its factors are not computed).

    Raw test batches wait in host memory only until at most ``blocks.STAGING_BYTES`` of them are
    staged; then every checkpoint is loaded once and their factors are computed, so a test set
    of any size needs memory for its factors, not for its decoded inputs."""
    chunk_examples = start = end = staged_bytes = 0
    finished = False  # the current chunk was finished by an interrupted run
    staged: List[Tuple[int, object]] = []
    per_checkpoint: List[List[FactorDict]] = [[] for _ in run.checkpoints]

    def close() -> Tuple[slice, Optional[list]]:
        _stage(run, staged, per_checkpoint)
        return slice(start, end), (None if finished else _chunk_cache(run, per_checkpoint))

    for first, batch in run.numbered(test):
        b = run.task.batch_size(batch)
        new_chunk = not chunk_examples
        if new_chunk:
            chunk_examples = _chunk_examples(run, batch)
        elif first > start and first + b - start > chunk_examples:
            yield close()
            per_checkpoint = [[] for _ in run.checkpoints]
            start, staged_bytes, new_chunk = first, 0, True
        if new_chunk:
            finished = skip is not None and skip(start)
        end = first + b
        if finished:
            continue
        staged.append((first, batch))
        staged_bytes += batch_bytes(batch)
        if staged_bytes > blocks.STAGING_BYTES:
            _stage(run, staged, per_checkpoint)
            staged_bytes = 0
    if end > start:
        yield close()
