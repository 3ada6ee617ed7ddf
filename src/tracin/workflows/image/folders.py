"""Image folders in torchvision's ImageFolder layout: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``.

Unreadable images are skipped with a warning and listed (so the influence manifest records them);
indices always refer to the sorted list of readable images.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ...errors import DataError, TracInError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSplit:
    """One split: image paths [N], labels [N] (class indices), and the files skipped as unreadable."""

    paths: List[Path]
    labels: List[int]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _readable(path: Path) -> Optional[str]:
    """None if PIL can decode the image, else the reason it cannot (a file that is not a regular file, such as
    a named pipe, is never opened: reading it could wait forever)."""
    if not path.is_file():
        return "not a regular file"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image; 16- and 32-bit integer grey images are scaled to 8 bits (PIL's own conversion clips
    them, turning a 16-bit image almost white)."""
    if img.mode.startswith("I"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def scan_split(root: Path, split: str, class_names: Optional[Sequence[str]] = None) -> Tuple[ImageSplit, List[str]]:
    """Scan ``root/split/<class>/``; class indices follow ``class_names`` (default: sorted folder names)."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"Folder {folder} does not exist; --data_dir must hold train/<class>/ and test/<class>/ folders.")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"Folder {folder} has no class folders; put each class's images in {folder}/<class>/.")
    names = list(class_names) if class_names is not None else found
    unknown = [c for c in found if c not in names]
    if unknown:
        raise DataError(f"Class folder(s) {unknown} in {folder} are not among the classes {names}; rename or remove them.")
    split_data = ImageSplit([], [])
    listed = []
    for label, name in enumerate(names):
        class_dir = folder / name
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")) \
            if class_dir.is_dir() else []
        if not files and split == "train":
            raise DataError(f"Class folder {class_dir} has no images; add images or remove the class.")
        listed.extend((path, label) for path in files)
    # Decoding every image once finds corrupt files up front; PIL releases the GIL, so threads help.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(_readable, [path for path, _ in listed]))
    for (path, label), reason in zip(listed, reasons):
        if reason is not None:
            warnings.warn(f"Skipping unreadable image {path} ({reason}).", stacklevel=2)
            split_data.skipped.append((str(path), reason))
            continue
        split_data.paths.append(path)
        split_data.labels.append(label)
    if not split_data.paths:
        raise DataError(f"Folder {folder} has no readable images; check the files.")
    return split_data, names


def image_transform(image_size: int, normalize: Tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
                    random_steps: Sequence[Callable] = ()) -> Callable:
    """Resize to a square, 3 channels, (``random_steps`` on the resized image,) tensor in [0, 1],
    normalised: [3, S, S]."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize((image_size, image_size)),
        *random_steps,
        transforms.ToTensor(),
        transforms.Normalize(*normalize),
    ])


AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")


def check_augment(augment: str) -> None:
    """Refuse an ``augment`` that is not one of :data:`AUGMENTATIONS`."""
    if augment not in AUGMENTATIONS:
        raise TracInError(f"--augment {augment} is not one of {', '.join(AUGMENTATIONS)}; pick one of them.")


def training_transform(image_size: int, augment: str,
                       normalize: Tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD)) -> Callable:
    """The transform training reads images with: :func:`image_transform`, after a random shift
    (``crop``: pad by a reflected eighth of the side and crop back, as for CIFAR) and/or a random
    horizontal mirror (``flip``; not for classes a mirror changes, such as some digits). Influence,
    self-influence and evaluation always read the plain, unaugmented image: [3, S, S]."""
    check_augment(augment)
    from torchvision import transforms

    random_steps = []
    if "crop" in augment:
        random_steps.append(transforms.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"))
    if "flip" in augment:
        random_steps.append(transforms.RandomHorizontalFlip())
    return image_transform(image_size, normalize, random_steps)


class ImageDataset(Dataset):
    """(image tensor [3, S, S], label) for each readable image of a split."""

    def __init__(self, split: ImageSplit, transform: Callable):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, index: int):
        path = self.split.paths[index]
        try:
            with Image.open(path) as img:
                tensor = self.transform(img)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"Image {path} could not be read ({exc}); it changed after the scan, restore or remove it.") from exc
        return tensor, torch.tensor(self.split.labels[index])


def images_digest(paths: List[Path]) -> str:
    """A SHA-256 of the images' paths, sizes and modification times (what a resume or an index is keyed on)."""
    return hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths).encode()).hexdigest()
