"""Resumable influence runs: progress committed after every train tile, atomically, as plain data.

The state file (``state.safetensors`` in the resume directory, written to a temporary name and renamed)
holds tensors only — the finished test chunks' top-k lists, the current chunk's running top-k and the
partial self-influence — and, in its JSON header, the next training index, the tiling plan (so a resumed
run cuts identical tiles) and a fingerprint of the configuration and inputs. Nothing in it is unpickled,
so a file planted in an output folder cannot run code; a file that is not such a state, or whose
contents disagree with themselves, is refused in one sentence. Resuming with a different fingerprint is
refused too. ``TRACIN_KILL_AFTER_TILES=N`` makes the process kill itself with SIGKILL right after
committing tile N: a fault-injection hook for testing resumption.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, Optional, Protocol, Tuple

import torch

from ..errors import TracInError
from ..io import write_bytes
from .accumulate import TopKAccumulator, TopKLists

STATE = "state.safetensors"
OLD_STATE = "state.pt"  # written by tracin 0.1.0 with pickle: never read
FORMAT = "tracin-progress-1"


def fingerprint(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class ProgressHook(Protocol):
    """What the scheduler tells a resumable run, and what it asks of it."""

    def chunk_finished(self, first_row: int) -> bool:
        """Whether the test chunk starting at ``first_row`` was finished by an interrupted run."""

    def next_train(self, rows: slice) -> int:
        """The first training index of the chunk ``rows`` that the interrupted run did not commit."""

    def tile_done(self, rows: slice, next_train: int, self_scores: Optional[torch.Tensor], plan: Dict[str, int]) -> None:
        """A tile of chunk ``rows`` was scored up to ``next_train``; commit the progress."""

    def chunk_done(self, rows: slice) -> None:
        """Every tile of chunk ``rows`` was scored."""


class ResumeState:
    """Progress of one influence run; passed to the scheduler as its :class:`ProgressHook`."""

    def __init__(self, directory: Path, config: Dict[str, Any]):
        self.directory = Path(directory)
        self.config = config
        self.key = fingerprint(config)
        self.tiles = 0
        self.done: Dict[int, TopKLists] = {}  # row start -> (pv, pi, nv, ni) of finished test chunks
        self.current: Optional[Dict[str, Any]] = None  # {"rows": start, "next": train index, "topk": (...)}
        self.self_scores: Optional[torch.Tensor] = None
        self.plan: Optional[Dict[str, int]] = None
        self.accumulators: Dict[int, TopKAccumulator] = {}
        if (self.directory / OLD_STATE).exists():
            raise TracInError(f"{self.directory / OLD_STATE} holds progress in a pickled format that tracin no longer reads "
                              "(unpickling could run code); pass --overwrite (or overwrite=True) to start again.")
        if (self.directory / STATE).exists():
            self._restore(*_read_state(self.directory / STATE))

    def _restore(self, header: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
        if header.get("key") != self.key:
            saved = header.get("config") if isinstance(header.get("config"), dict) else {}
            changed = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != _plain(self.config.get(k)))
            raise TracInError(
                f"The interrupted run in {self.directory} was started with different settings or inputs "
                f"({', '.join(changed) or 'fingerprint'}); pass --overwrite (or overwrite=True) to start again."
            )
        try:
            self.tiles, self.plan = int(header["tiles"]), _plan(header["plan"])
            self.done = {int(start): _lists(tensors, f"done.{int(start)}") for start in header["done"]}
            current = header["current"]
            if current is not None:
                self.current = {"rows": int(current["rows"]), "next": int(current["next"]), "topk": _lists(tensors, "current")}
            self.self_scores = tensors.get("self")
            for lists in [*self.done.values(), *([self.current["topk"]] if self.current is not None else [])]:
                self._check_range(lists)
        except (KeyError, TypeError, ValueError) as exc:
            raise _tampered(self.directory / STATE, f"its contents disagree ({type(exc).__name__}: {exc})") from None

    @property
    def resumed(self) -> bool:
        return self.tiles > 0

    def accumulator(self, rows: slice, m: int, k: int, device: torch.device, dtype: torch.dtype) -> TopKAccumulator:
        """The running top-k of a test chunk, restored from the state when the chunk was under way."""
        if rows.start not in self.accumulators:
            acc = TopKAccumulator(m, k, device, dtype)
            if self.current is not None and self.current["rows"] == rows.start:
                lists = self.current["topk"]
                self._check_lists(lists, m, k)
                acc.restore(lists)
            self.accumulators[rows.start] = acc
        return self.accumulators[rows.start]

    def _check_lists(self, lists: TopKLists, m: int, k: int) -> None:
        """Refuse saved top-k lists that are not [m, k]."""
        for t in lists:
            if tuple(t.shape) != (m, k):
                raise _tampered(self.directory / STATE, f"its top-k lists are {tuple(t.shape)} for a chunk of {m} x top {k}")

    def _check_range(self, lists: TopKLists) -> None:
        limit = self.config.get("n_train")
        for t in (lists[1], lists[3]):
            if t.numel() and (int(t.min()) < 0 or (isinstance(limit, int) and int(t.max()) >= limit)):
                raise _tampered(self.directory / STATE, f"its top-k lists name training examples outside 0..{limit}")

    # -- the scheduler's progress hook -------------------------------------------------------------
    def chunk_finished(self, first_row: int) -> bool:
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
            self.done[rows.start] = tuple(t.cpu() for t in self.accumulators[rows.start].result())  # type: ignore[assignment]
        else:  # every tile was committed before the interruption: the running top-k is final
            assert self.current is not None and self.current["rows"] == rows.start
            self.done[rows.start] = self.current["topk"]
        self.current = None
        self._commit()

    def _commit(self) -> None:
        from safetensors.torch import save

        tensors: Dict[str, torch.Tensor] = {}
        for start, lists in self.done.items():
            tensors.update(_named(f"done.{start}", lists))
        if self.current is not None:
            tensors.update(_named("current", self.current["topk"]))
        if self.self_scores is not None:
            tensors["self"] = self.self_scores
        header = {"format": FORMAT, "key": self.key, "config": _plain(self.config), "tiles": self.tiles,
                  "done": sorted(self.done), "plan": self.plan,
                  "current": None if self.current is None else {"rows": self.current["rows"], "next": self.current["next"]}}
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"tracin": json.dumps(header)})
        write_bytes(self.directory / STATE, data)

    def finish(self) -> None:
        """The run completed: its progress is no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)


def reset(directory: Path) -> None:
    """Forget an interrupted run (``--overwrite``)."""
    shutil.rmtree(directory, ignore_errors=True)


def _read_state(path: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(header, tensors) of a progress file; safetensors holds plain tensors and a JSON header, nothing that runs."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file() or path.is_symlink():
        raise _tampered(path, "it is not a regular file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("tracin", "null"))
        tensors = load_file(str(path))
    except Exception as exc:  # any parse failure: not our file
        raise _tampered(path, f"it cannot be read ({type(exc).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _tampered(path, "it has no tracin progress header")
    return header, tensors


def _tampered(path: Path, why: str) -> TracInError:
    return TracInError(f"The progress file {path} was not written by this version of tracin or was changed ({why}); "
                       "pass --overwrite (or overwrite=True) to start again.")


def _named(prefix: str, lists) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.{i}": t for i, t in enumerate(lists)}


def _lists(tensors: Dict[str, torch.Tensor], prefix: str) -> TopKLists:
    """(pv, pi, nv, ni) stored under ``prefix``; raises KeyError/ValueError when they are missing or inconsistent."""
    pv, pi, nv, ni = (tensors[f"{prefix}.{i}"] for i in range(4))
    if pv.dim() != 2 or not (pv.shape == pi.shape == nv.shape == ni.shape) or pi.dtype != torch.long or ni.dtype != torch.long:
        raise ValueError(f"top-k lists {prefix} have mismatched shapes or types")
    return pv, pi, nv, ni


def _plan(plan: Any) -> Optional[Dict[str, int]]:
    if plan is None:
        return None
    if not isinstance(plan, dict):
        raise TypeError("the tiling plan is not a mapping")
    return {str(k): int(v) for k, v in plan.items()}


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, other objects their str)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
