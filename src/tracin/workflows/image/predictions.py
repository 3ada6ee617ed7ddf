"""The final model's predictions on the training images, kept in a gradient index's folder: ``tracin index build``
writes them once, so that ``tracin index query`` reports the proponents' predicted classes without reading a training
image. They are keyed by what they depend on (the weights file of the model that predicts, the images, the
preprocessing) and recomputed by the query when any of it differs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ...checkpoints import Checkpoint, check_one_run, checkpoint_at, checkpoint_source, weights_for
from ...io import file_sha256
from .folders import images_digest
from .setup import ImageSetup, OwnModel

FILE = "train_predictions.npz"

Predictions = Tuple[np.ndarray, np.ndarray]  # (predicted class [n], its probability [n]) per training image


def prediction_model(setup: ImageSetup, checkpoint_dir: Optional[Path], trust: bool, own: Optional[OwnModel]) -> Checkpoint:
    """The model whose predictions are reported (--model_path; else best_model.pt when training wrote one, else the
    last checkpoint), loaded and checked against the architecture before any scoring."""
    if setup.prediction_file is not None:
        weights_file = checkpoint_source(setup.prediction_file).resolve()  # inside a Trainer folder, its weights
        same = [c for c in setup.checkpoints if isinstance(c.source, Path) and c.source.resolve() == weights_file]
        if same:  # already loaded (and, for a pickled file, already warned about)
            return same[0]
        final = checkpoint_at(setup.prediction_file, trust=trust, learning_rate=0.0)
        weights_for(setup.model, final)
        return final
    best = Path(checkpoint_dir) / "best_model.pt" if checkpoint_dir is not None else None
    if best is None or not best.is_file() or own is not None:
        return setup.checkpoints[-1]
    final = Checkpoint(best, trust=trust)
    check_one_run([setup.checkpoints[-1], final], f"Checkpoint folder {checkpoint_dir} (best_model.pt)")
    weights_for(setup.model, final)
    return final


def prediction_key(final: Checkpoint, setup: ImageSetup) -> Optional[str]:
    """What the training images' predictions depend on, as one string (None for weights not read from a file)."""
    if not isinstance(final.source, (str, Path)) or not Path(final.source).is_file():
        return None
    return json.dumps({"weights": file_sha256(Path(final.source)), "images": images_digest(setup.train_split.paths),
                       "preprocessing": repr(setup.train.transform), "classes": list(setup.class_names)})


def save(index_dir: Path, key: str, probabilities: torch.Tensor) -> None:
    """Write the predictions of every training image ([n, classes] probabilities) with their key, whole or not at all."""
    confidence, predicted = probabilities.max(1)
    partial = Path(index_dir) / f"{FILE}.partial.npz"
    np.savez(partial, key=np.array(key), predicted=predicted.numpy(), confidence=confidence.numpy())
    partial.replace(Path(index_dir) / FILE)


def load(index_dir: Path, key: Optional[str], rows: np.ndarray) -> Optional[Predictions]:
    """The kept predictions of the training images ``rows`` when the index folder holds them under ``key``, else None."""
    path = Path(index_dir) / FILE
    if key is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as kept:
            if str(kept["key"]) != key or rows.size and int(rows.max()) >= kept["predicted"].shape[0]:
                return None
            return kept["predicted"][rows], kept["confidence"][rows]
    except (OSError, ValueError, KeyError):
        return None  # damaged: the query predicts them itself
