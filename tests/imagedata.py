"""Tiny generated image folders for CLI tests."""
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), n_train=8, n_test=3, size=12, seed=0) -> Path:
    """Colour-coded squares per class with noise: train/<class>/*.png, test/<class>/*.png."""
    rng = np.random.default_rng(seed)
    palette = {c: rng.integers(0, 255, 3) for c in classes}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(palette[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{c}_{i:02d}.png")
    return root
