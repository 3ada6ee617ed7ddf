"""Resumable influence runs: progress committed after every train tile, atomically.

The state file (``state.pt`` in the resume directory, written to a temporary name and renamed)
holds the finished test chunks' top-k lists, the current chunk's running top-k, the partial
self-influence, the next training index, the tiling plan (so a resumed run cuts identical tiles)
and a fingerprint of the configuration and inputs. Resuming with a different fingerprint is
refused. ``TRACIN_KILL_AFTER_TILES=N`` makes the process kill itself with SIGKILL right after
committing tile N: a fault-injection hook for testing resumption.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .accumulate import TopKAccumulator
from .errors import TracInError

STATE = "state.pt"


def fingerprint(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class ResumeState:
    """Progress of one influence run; passed to the scheduler as its progress hook."""

    def __init__(self, directory: Path, config: Dict[str, Any]):
        self.directory = Path(directory)
        self.config = config
        self.key = fingerprint(config)
        self.tiles = 0
        self.done: Dict[int, tuple] = {}  # row start -> (pv, pi, nv, ni) of finished test chunks
        self.current: Optional[Dict[str, Any]] = None  # {"rows": start, "next": train index, "topk": (...)}
        self.self_scores: Optional[torch.Tensor] = None
        self.plan: Optional[Dict[str, int]] = None
        self.accumulators: Dict[int, TopKAccumulator] = {}
        path = self.directory / STATE
        if path.is_file():
            saved = torch.load(path, weights_only=False)  # our own file, written below
            if saved["key"] != self.key:
                changed = sorted(k for k in set(saved["config"]) | set(config) if saved["config"].get(k) != config.get(k))
                raise TracInError(
                    f"The interrupted run in {self.directory} was started with different settings or inputs "
                    f"({', '.join(changed) or 'fingerprint'}); pass --overwrite (or overwrite=True) to start again."
                )
            self.tiles, self.done, self.current = saved["tiles"], saved["done"], saved["current"]
            self.self_scores, self.plan = saved["self"], saved["plan"]

    @property
    def resumed(self) -> bool:
        return self.tiles > 0

    def accumulator(self, rows: slice, m: int, k: int, device: torch.device, dtype: torch.dtype) -> TopKAccumulator:
        """The running top-k of a test chunk, restored from the state when the chunk was under way."""
        if rows.start not in self.accumulators:
            acc = TopKAccumulator(m, k, device, dtype)
            if self.current is not None and self.current["rows"] == rows.start:
                pv, pi, nv, ni = (t.to(device) for t in self.current["topk"])
                acc.pos_values, acc.pos_indices, acc.neg_values, acc.neg_indices = pv, pi, -nv, ni
            self.accumulators[rows.start] = acc
        return self.accumulators[rows.start]

    # -- the scheduler's progress hook -------------------------------------------------------------
    def chunk_finished(self, first_row: int) -> bool:
        """Whether the test chunk starting at ``first_row`` was finished by the interrupted run."""
        return first_row in self.done

    def next_train(self, rows: slice) -> int:
        return self.current["next"] if self.current is not None and self.current["rows"] == rows.start else 0

    def tile_done(self, rows: slice, next_train: int, self_scores: Optional[torch.Tensor], plan: Dict[str, int]) -> None:
        acc = self.accumulators[rows.start]
        self.current = {"rows": rows.start, "next": next_train, "topk": tuple(t.cpu() for t in acc.result())}
        if self_scores is not None:
            self.self_scores = self_scores.detach().cpu()
        self.plan = plan
        self.tiles += 1
        self._commit()
        limit = os.environ.get("TRACIN_KILL_AFTER_TILES")
        if limit and self.tiles == int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    def chunk_done(self, rows: slice) -> None:
        if rows.start in self.accumulators:
            self.done[rows.start] = tuple(t.cpu() for t in self.accumulators[rows.start].result())
        else:  # every tile was committed before the interruption: the running top-k is final
            assert self.current is not None and self.current["rows"] == rows.start
            self.done[rows.start] = self.current["topk"]
        self.current = None
        self._commit()

    def _commit(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{STATE}.tmp"
        torch.save({"key": self.key, "config": self.config, "tiles": self.tiles, "done": self.done,
                    "current": self.current, "self": self.self_scores, "plan": self.plan}, tmp)
        os.replace(tmp, self.directory / STATE)

    def finish(self) -> None:
        """The run completed: its progress is no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)


def reset(directory: Path) -> None:
    """Forget an interrupted run (``--overwrite``)."""
    shutil.rmtree(directory, ignore_errors=True)
