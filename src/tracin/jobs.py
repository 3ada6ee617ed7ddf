"""What the non-image command-line jobs (ranking, kge) share: self-influence and influence tables
keyed by example ids, and the manifest written last."""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from .checkpoints import Checkpoint
from .outputs import MANIFEST, file_sha256, write_csv, write_json, write_npy


def descending_ranks(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(positions of the finite values, highest first [m]; rank of each position [n], 1 = highest,
    0 where the value is NaN — an example left out by sampling)."""
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[: int(np.isfinite(values).sum())]
    rank_of = np.zeros(len(values), dtype=np.int64)
    rank_of[order] = np.arange(1, len(order) + 1)
    return order, rank_of


def write_self_influence(out: Path, ids: Sequence[str], scores: np.ndarray) -> List[Path]:
    """``self_influence.{npy,csv,json}``; JSON: ``{id: {"tracin_self_influence": score}}``, CSV ranked."""
    order, _ = descending_ranks(scores)
    return [
        write_npy(out / "self_influence.npy", scores),
        write_csv(out / "self_influence.csv", ({"id": ids[i], "score": float(scores[i]), "rank": r + 1}
                                              for r, i in enumerate(order)), ["id", "score", "rank"]),
        write_json(out / "self_influence.json", {ids[i]: {"tracin_self_influence": float(scores[i])}
                                                 for i in range(len(ids)) if np.isfinite(scores[i])}),
    ]


def write_influence(out: Path, train_ids: Sequence[str], test_ids: Sequence[str], matrix: np.ndarray) -> List[Path]:
    """``influence_matrix.npy`` [n_test, n_train], ``influence.csv`` (one row per test x train) and
    ``influence.json``: ``{train id: {"tracin_influence_<test id>": score}}``."""
    return [
        write_npy(out / "influence_matrix.npy", matrix),
        write_csv(out / "influence.csv", ({"test_id": t, "train_id": train_ids[j], "score": float(matrix[r, j])}
                                          for r, t in enumerate(test_ids) for j in range(len(train_ids))),
                  ["test_id", "train_id", "score"]),
        write_json(out / "influence.json", {train_ids[j]: {f"tracin_influence_{t}": float(matrix[r, j]) for r, t in enumerate(test_ids)}
                                            for j in range(len(train_ids))}),
    ]


def write_manifest(out: Path, command: str, parameters: Dict[str, Any], checkpoints: Sequence[Checkpoint],
                   scope: List[Dict[str, Any]], num_parameters: int, device: torch.device, stats: Dict[str, Any],
                   written: Sequence[Path], data: Dict[str, Any], seconds: float,
                   hashes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Write ``manifest.json`` (last: its presence marks the results complete) and return it."""
    hashes = hashes or [file_sha256(Path(c.source)) if isinstance(c.source, Path) else "" for c in checkpoints]
    manifest = {
        "tool": "tracin", "command": command, "complete": True, "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in parameters.items()},
        "data": data,
        "checkpoints": [{"file": str(c.source) if isinstance(c.source, Path) else c.name, "sha256": h,
                         "learning_rate": c.learning_rate, "epoch": c.epoch} for c, h in zip(checkpoints, hashes)],
        "scope": scope, "num_parameters": num_parameters, "device": str(device),
        "engine": {k: v for k, v in stats.items() if k not in ("layer_modes", "sampled_indices")},
        "timings": {"total_s": seconds},
        "versions": {"tracin": __version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "outputs": sorted(p.name for p in written),
    }
    write_json(out / MANIFEST, manifest)
    return manifest
