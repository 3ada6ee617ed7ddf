"""Setting up an image-folder run from the checkpoints of one ``tracin train`` run: its metadata, the scanned
folders with its classes, and a fresh model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

import torch

from ...checkpoints import Checkpoint
from ...errors import CheckpointError
from .folders import ImageDataset, image_transform, scan_split
from .models import build_model, checkpoint_metadata, normalization
from .train import CHECKPOINT_PATTERN


@dataclass
class ImageSetup:
    """Checkpoints of one `tracin train` run, its metadata, the scanned image folders and a fresh model."""

    checkpoints: List[Checkpoint]
    arch: str
    class_names: List[str]
    image_size: int
    train_split: Any
    test_split: Any
    train: ImageDataset
    test: ImageDataset
    model: torch.nn.Module


def image_setup(data_dir: Path, checkpoint_dir: Path, trust: bool = False) -> ImageSetup:
    """Discover the checkpoints, check they come from one run, scan the folders with its classes."""
    checkpoints = Checkpoint.discover(checkpoint_dir, pattern=CHECKPOINT_PATTERN + ".*", trust=trust)
    arch, class_names, image_size = checkpoint_metadata(checkpoints[-1].metadata, checkpoints[-1].name or "")
    for ck in checkpoints:
        other = checkpoint_metadata(ck.metadata, ck.name or "")
        if other != (arch, class_names, image_size):
            raise CheckpointError(
                f"Checkpoint {ck.name} was trained as {other[0]} on {len(other[1])} classes but {checkpoints[-1].name} as "
                f"{arch} on {len(class_names)}; keep one training run per --checkpoint_dir."
            )
    data_dir = Path(data_dir).resolve()  # paths in the outputs then work from any folder
    train_split, _ = scan_split(data_dir, "train", class_names)
    test_split, _ = scan_split(data_dir, "test", class_names)
    transform = image_transform(image_size, normalization(arch))
    return ImageSetup(checkpoints, arch, class_names, image_size, train_split, test_split,
                      ImageDataset(train_split, transform), ImageDataset(test_split, transform),
                      build_model(arch, len(class_names), image_size))
