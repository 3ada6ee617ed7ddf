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
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..checkpoints import Checkpoint
from ..config import ScoringConfig
from ..device import default_memory_budget
from ..errors import TracInError
from ..io import clear_path, write_json
from ..layers.projection import Projector
from .accumulate import TopKAccumulator

GRADIENTS = "train_gradients.npy"
META = "store.json"


def weights_sha256(checkpoint: Checkpoint) -> str:
    digest = hashlib.sha256()
    for key in sorted(checkpoint.state_dict()):
        digest.update(key.encode())
        digest.update(checkpoint.state_dict()[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def describe(config: ScoringConfig, layers: List[str], checkpoints: List[Checkpoint],
             precondition: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a store depends on (layers, projection, precondition and checkpoints are compared on load),
    and the settings it was made with."""
    projection = (Projector(config.projection_dim, config.projection, config.seed).for_vectors().describe()
                  if config.projection_dim is not None else None)
    return {
        "settings": config.to_dict(),
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
            clear_path(self.directory / GRADIENTS)  # never write through a link planted there
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


def score_store(store: np.memmap, test: torch.Tensor, learning_rates: Sequence[float], config: ScoringConfig,
                device: torch.device, top_k: int) -> TopKAccumulator:
    """Top-k of the checkpoint-summed scores of ``test`` vectors [C, m, D] (on ``device``) against the stored
    training gradients [C, n_train, D], read in row tiles sized from the memory budget; each checkpoint's
    products weighted by its learning rate, normalised as ``config.normalize`` asks."""
    C, m, D = test.shape
    n_train = store.shape[1]
    tiny = torch.finfo(test.dtype).tiny
    if config.normalize == "cosine":
        test = test / test.norm(dim=2, keepdim=True).clamp_min(tiny)
    acc = TopKAccumulator(m, top_k, device, test.dtype)
    budget = default_memory_budget(device, config.memory_budget)
    rows = max(1, int(budget // max(1, 4 * (3 * m + C * D))))
    for start in range(0, n_train, rows):
        scores = torch.zeros(m, min(rows, n_train - start), device=device)
        for c, lr in enumerate(learning_rates):
            tile = torch.from_numpy(np.array(store[c, start:start + rows])).to(device)
            if config.normalize != "none":
                tile = tile / tile.norm(dim=1, keepdim=True).clamp_min(tiny)
            scores.add_(test[c] @ tile.T, alpha=float(lr))
        acc.update(scores, start)
    return acc
