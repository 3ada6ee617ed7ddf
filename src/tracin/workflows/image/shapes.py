"""A generated image folder that is not digits: five kinds of shape in colour on textured backgrounds.

Each image draws one shape (circle, square, triangle, cross, ring) at a random position, size,
rotation and colour over a noisy background, so classes differ by geometry alone. Used to check
that what holds on the digits holds on other images; nothing is downloaded.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "cross", "ring", "square", "triangle")


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
            for k in range(sides)]


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image [size, size] of ``kind``."""
    background = rng.integers(0, 120, 3)
    pixels = np.clip(background + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(130, 256, 3))
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    width = max(1, int(r / 3))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=colour)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, angle), fill=colour)
    elif kind == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=width + 1)
    else:
        raise ValueError(kind)
    return img


def write_shapes_folder(root: Path, n_train: int = 120, n_test: int = 30, size: int = 24, seed: int = 0) -> Path:
    """``root/{train,test}/<shape>/*.png`` with ``n_train`` / ``n_test`` images per shape."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for kind in SHAPES:
            folder = Path(root) / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(kind, size, rng).save(folder / f"{kind}_{i:04d}.png")
    return Path(root)
