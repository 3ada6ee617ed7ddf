"""What an image training run reads: its settings (the ``tracin train`` flags), the validation split, and the
loaders of the training images (shuffled optimisation steps, each example with its position in the split) and of the
images measured after every epoch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ...engine.loaders import Indexed
from ...errors import TracInError
from .folders import ImageDataset, ImageSplit, image_transform, scan_split, training_transform
from .models import normalization


@dataclass
class ImageTraining:
    """How :func:`train_image_classifier` trains (the ``tracin train`` flags)."""

    arch: str = "resnet18"
    epochs: int = 10
    save_every: int = 1
    learning_rate: float = 0.01
    batch_size: int = 32
    pretrained: Optional[Path] = None
    image_size: int = 224
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "none"
    lr_schedule: str = "constant"
    optimizer: str = "sgd"  # sgd (with momentum) | adamw (its state is stored in every checkpoint)
    val_fraction: float = 0.0  # of each class, held out to choose best_model.pt (0: the last epoch's model)
    in_run: Optional[Path] = None  # a results folder: in-run TracIn recorded while training (tracin.engine.inrun)
    in_run_query_every: int = 0  # steps between the test images' gradients in the in-run record (0: once per epoch)


def validation_split(labels: List[int], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(fit positions, validation positions) of a training split: ``fraction`` of each class (rounded, never a
    class's last image), seeded. The validation images choose best_model.pt and are not trained on."""
    if not 0 <= fraction < 1:
        raise TracInError(f"--val_fraction must be in [0, 1), got {fraction}.")
    rng = np.random.default_rng(seed)
    held: List[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        take = min(len(members) - 1, int(round(fraction * len(members))))
        held += rng.permutation(members)[:take].tolist() if take > 0 else []
    if fraction > 0 and not held:
        raise TracInError(f"--val_fraction {fraction} holds out no image (a share of each class, rounded, never its last "
                          "image); raise it, or use 0 to keep the last epoch's model as best_model.pt.")
    chosen = set(held)
    return [i for i in range(len(labels)) if i not in chosen], sorted(held)


@dataclass
class TrainingData:
    """What a training run reads: the loaders for the optimisation steps and for measuring, the class names, and the
    validation images' paths relative to the data folder."""

    data_dir: Path
    classes: List[str]
    steps: DataLoader  # (position in the training split, image, label) batches, shuffled
    measure: Dict[str, DataLoader]  # fit, val (when there is a validation split), test
    validation_files: List[str]
    train_split: ImageSplit
    test_split: ImageSplit
    fit: List[int]  # positions of the training split that are trained on
    plain: Callable  # the transform of the measured (and scored) images


def training_data(data_dir: Path, training: ImageTraining) -> TrainingData:
    data_dir = Path(data_dir)
    train_split, classes = scan_split(data_dir, "train")
    test_split, _ = scan_split(data_dir, "test", classes)
    fit, val = validation_split(train_split.labels, training.val_fraction, training.seed)
    size, norm = training.image_size, normalization(training.arch)
    plain, augmented = image_transform(size, norm), training_transform(size, training.augment, norm)
    batch = max(training.batch_size, 64)
    steps = DataLoader(Subset(Indexed(ImageDataset(train_split, augmented)), fit), batch_size=training.batch_size,
                       shuffle=True, generator=torch.Generator().manual_seed(training.seed))
    measure = {"train": DataLoader(Subset(ImageDataset(train_split, plain), fit), batch_size=batch),
               "test": DataLoader(ImageDataset(test_split, plain), batch_size=batch)}
    if val:
        measure["val"] = DataLoader(Subset(ImageDataset(train_split, plain), val), batch_size=batch)
    return TrainingData(data_dir, classes, steps, measure, [str(train_split.paths[i].relative_to(data_dir)) for i in val], train_split,
                 test_split, fit, plain)
