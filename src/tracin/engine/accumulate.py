"""Accumulators fed by the scheduler with checkpoint-summed score tiles."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Protocol, Tuple

import numpy as np
import torch

from ..errors import TracInError
from ..io import clear_path


class TopKAccumulator:
    """Running top-k proponents (largest scores) and opponents (smallest) for a block of test examples.

    ``update(scores [m, n_tile], first_train_index)`` merges a tile whose scores are already summed
    over every checkpoint, so the final lists are the exact top-k of the TracIn score.
    """

    def __init__(self, n_test: int, k: int, device: torch.device, dtype: torch.dtype):
        self.k = k
        self.pos_values = torch.empty(n_test, 0, device=device, dtype=dtype)
        self.pos_indices = torch.empty(n_test, 0, device=device, dtype=torch.long)
        self.neg_values = torch.empty(n_test, 0, device=device, dtype=dtype)  # negated scores
        self.neg_indices = torch.empty(n_test, 0, device=device, dtype=torch.long)

    @staticmethod
    def _merge(values: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor, k: int):
        cand_v = torch.cat([values, scores], dim=1)
        cand_i = torch.cat([indices, idx], dim=1)
        top_v, where = torch.topk(cand_v, min(k, cand_v.shape[1]), dim=1, largest=True, sorted=True)
        return top_v, torch.gather(cand_i, 1, where)

    def update(self, scores: torch.Tensor, first_train_index: int) -> None:
        m, n = scores.shape
        idx = torch.arange(first_train_index, first_train_index + n, device=scores.device).expand(m, n)
        self.pos_values, self.pos_indices = self._merge(self.pos_values, self.pos_indices, scores, idx, self.k)
        self.neg_values, self.neg_indices = self._merge(self.neg_values, self.neg_indices, -scores, idx, self.k)

    def result(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(proponent values, proponent indices, opponent values, opponent indices), each [m, k]."""
        return self.pos_values, self.pos_indices, -self.neg_values, self.neg_indices

    def restore(self, lists: "TopKLists") -> None:
        """Continue from an earlier :meth:`result` (e.g. an interrupted run's): lists of this accumulator's shape."""
        pv, pi, nv, ni = lists
        dtype, device = self.pos_values.dtype, self.pos_values.device
        self.pos_values, self.pos_indices = pv.to(device, dtype), pi.to(device)
        self.neg_values, self.neg_indices = -nv.to(device, dtype), ni.to(device)


TopKLists = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # TopKAccumulator.result()


class TopKProgress(Protocol):
    """An interrupted run's top-k progress as :class:`TopKSink` resumes it (:class:`tracin.engine.resume.ResumeState`)."""

    done: Dict[int, TopKLists]  # first row of each finished test chunk -> its final lists

    def accumulator(self, rows: slice, m: int, k: int, device: torch.device, dtype: torch.dtype) -> TopKAccumulator:
        """The running top-k of the test chunk at ``rows`` (restored when the chunk was under way)."""


class TopKSink:
    """The scheduler's sink for top-k runs: one :class:`TopKAccumulator` per test chunk (restored from ``state``,
    a :class:`TopKProgress`, when a resumed run had the chunk under way), and each tile
    also written to ``disk`` when the full matrix is asked for. ``offset``: this process's first training index."""

    def __init__(self, k: int, offset: int, state: Optional[TopKProgress] = None, disk: Optional["DiskMatrix"] = None):
        self.k, self.offset, self.state, self.disk = k, offset, state, disk
        self.parts: Dict[int, TopKAccumulator] = {}

    def __call__(self, rows: slice, scores: torch.Tensor, first: int) -> None:
        if rows.start not in self.parts:
            m = scores.shape[0]
            self.parts[rows.start] = (self.state.accumulator(rows, m, self.k, scores.device, scores.dtype) if self.state is not None
                                      else TopKAccumulator(m, self.k, scores.device, scores.dtype))
        self.parts[rows.start].update(scores, self.offset + first)
        if self.disk is not None:
            self.disk.update(rows, scores, first)

    def results(self) -> TopKLists:
        """This process's top-k lists of every test example (chunks finished by an interrupted run included), on the CPU."""
        results = {start: acc.result() for start, acc in self.parts.items()}
        if self.state is not None:
            results.update(self.state.done)
        pieces = [results[start] for start in sorted(results)]
        return tuple(torch.cat([p[i] for p in pieces]).cpu() for i in range(4))  # type: ignore[return-value]


class MatrixAccumulator:
    """The full score matrix [n_test, n_train] (on the CPU, in the scores' dtype), filled tile by tile."""

    def __init__(self, n_test: int, n_train: int):
        self.shape = (n_test, n_train)
        self.matrix: Optional[torch.Tensor] = None

    def update(self, rows: slice, scores: torch.Tensor, first_train_index: int) -> None:
        if self.matrix is None:
            self.matrix = torch.zeros(self.shape, dtype=scores.dtype)
        self.matrix[rows, first_train_index:first_train_index + scores.shape[1]] = scores.cpu()


class DiskMatrix:
    """The full score matrix [n_test, n_train] as a float32 ``.npy`` memory map, written tile by tile
    to a temporary name and renamed into place by :meth:`finish`. With ``sampled`` (full-set indices of
    the scored training examples, in scoring order) the other columns are NaN."""

    def __init__(self, path: Path, n_test: int, n_train: int, sampled: Optional[np.ndarray] = None, reopen: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.sampled = sampled
        if reopen:  # a resumed run: keep the tiles already written (a finished matrix is reopened too)
            if not self.tmp.is_file() and self.path.is_file() and not self.path.is_symlink():
                os.replace(self.path, self.tmp)
            if not self.tmp.is_file() or self.tmp.is_symlink():
                raise TracInError(f"The interrupted run's partial matrix {self.tmp} is missing, so its finished tiles would be "
                                  "lost; pass --overwrite (or overwrite=True) to start again.")
            self.array = np.load(self.tmp, mmap_mode="r+")
            if self.array.shape != (n_test, n_train):
                raise TracInError(f"The interrupted run's partial matrix {self.tmp} is {self.array.shape}, not {(n_test, n_train)}; "
                                  "pass --overwrite (or overwrite=True) to start again.")
            return
        clear_path(self.tmp)  # never write through a link planted there
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(n_test, n_train))
        if sampled is not None:
            self.array[:] = np.nan

    def update(self, rows: slice, scores: torch.Tensor, first_train_index: int) -> None:
        block = scores.detach().float().cpu().numpy()
        n = block.shape[1]
        if self.sampled is None:
            self.array[rows, first_train_index:first_train_index + n] = block
        else:
            self.array[rows, self.sampled[first_train_index:first_train_index + n]] = block

    def finish(self) -> Path:
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.path)
        return self.path
