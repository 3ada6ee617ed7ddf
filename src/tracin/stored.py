"""Saved training gradients: compute (projected) per-example training gradients once, score new
test sets later without touching the training data.

A store is a directory with ``train_gradients.npy`` ([C, n_train, D] float32, memory-mapped) and
``store.json`` (written last), which records the layers, the projection, and every checkpoint's name,
learning rate and a SHA-256 of its weights; loading checks them against the scorer and refuses a
store made with anything different.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .checkpoints import Checkpoint
from .errors import TracInError
from .outputs import write_json

GRADIENTS = "train_gradients.npy"
META = "store.json"


def weights_sha256(checkpoint: Checkpoint) -> str:
    digest = hashlib.sha256()
    for key in sorted(checkpoint.state_dict()):
        digest.update(key.encode())
        digest.update(checkpoint.state_dict()[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def describe(layers: List[str], projection: Optional[Dict[str, Any]], checkpoints: List[Checkpoint],
             precondition: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a store depends on (compared on load)."""
    return {
        "layers": layers,
        "projection": projection,
        "precondition": precondition,
        "checkpoints": [{"name": c.name, "learning_rate": c.learning_rate, "sha256": weights_sha256(c)} for c in checkpoints],
    }


class StoreWriter:
    """Receives ``(checkpoint, first index, vectors)`` and writes them into the memory-mapped array."""

    def __init__(self, directory: Path, n_checkpoints: int, n_train: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / META).unlink(missing_ok=True)  # incomplete until the metadata is written
        self.shape = (n_checkpoints, n_train)
        self.array: Optional[np.memmap] = None

    def __call__(self, c: int, first: int, vectors: torch.Tensor) -> None:
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.directory / GRADIENTS, mode="w+", dtype=np.float32,
                                                   shape=self.shape + (vectors.shape[1],))
        self.array[c, first:first + vectors.shape[0]] = vectors.detach().float().cpu().numpy()

    def finish(self, meta: Dict[str, Any]) -> None:
        assert self.array is not None
        self.array.flush()
        write_json(self.directory / META, {**meta, "n_train": self.shape[1], "dim": int(self.array.shape[2]), "complete": True})


def open_store(directory: Path, expected: Dict[str, Any]) -> np.memmap:
    """The stored gradients [C, n_train, D], after checking the metadata matches ``expected``."""
    directory = Path(directory)
    if not (directory / META).is_file() or not (directory / GRADIENTS).is_file():
        raise TracInError(f"{directory} holds no complete gradient store; create it with save_train_gradients first.")
    meta = json.loads((directory / META).read_text())
    for key in ("layers", "projection", "precondition", "checkpoints"):
        if meta.get(key) != json.loads(json.dumps(expected[key])):
            raise TracInError(f"The gradient store in {directory} was made with different {key}; recreate it with this configuration.")
    return np.load(directory / GRADIENTS, mmap_mode="r")
