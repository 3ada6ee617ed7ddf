"""The embedded demo data: scikit-learn's 8x8 handwritten digits written as an image folder,
with a known fraction of training labels flipped."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from ...io import write_csv


def write_digits_folder(root: Path, noise_rate: float = 0.1, seed: int = 0, test_fraction: float = 0.2) -> List[Dict[str, object]]:
    """Write ``root/train/<digit>/*.png`` and ``root/test/<digit>/*.png`` (stratified split) and flip
    ``noise_rate`` of the training labels to another class, uniformly. Returns the flipped records
    (file, true label, given label), also written to ``root/injected_noise.csv``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)
    labels = digits.target.astype(int)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_mask[idx[: int(round(test_fraction * len(idx)))]] = True
    train_idx = np.flatnonzero(~test_mask)
    n_flip = int(round(noise_rate * len(train_idx)))
    flipped = set(rng.choice(train_idx, size=n_flip, replace=False).tolist()) if n_flip else set()
    records: List[Dict[str, object]] = []
    for i, (img, label) in enumerate(zip(images, labels)):
        split = "test" if test_mask[i] else "train"
        given = label
        if i in flipped:
            given = int((label + rng.integers(1, 10)) % 10)
        path = root / split / str(given) / f"digit_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(path)
        if i in flipped:
            records.append({"file": str(path.relative_to(root)), "true_label": int(label), "given_label": given})
    for split in ("train", "test"):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
    write_csv(root / "injected_noise.csv", records, ["file", "true_label", "given_label"])
    return records
