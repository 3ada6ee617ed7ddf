"""Label noise with a known answer: copy an image folder with some training labels flipped.

Kinds:
  uniform:    ``noise_rate`` of the training images, drawn at random, move to another class chosen
              uniformly among the rest.
  asymmetric: class-dependent flips ``source -> target``; each image of a source class flips with
              probability ``noise_rate``. The default map for the digits is the usual MNIST one
              (2->7, 3->8, 5->6, 6->5, 7->1); for other folders each class flips to the next one in
              sorted order (a "pair flip"), unless a map is given.
Test images are linked unchanged. Files are hard-linked where the file system allows, else copied.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ...errors import DataError
from ...io import write_csv
from .folders import scan_split

DIGITS_ASYMMETRIC = {"2": "7", "3": "8", "5": "6", "6": "5", "7": "1"}


def parse_flip_map(text: str) -> Dict[str, str]:
    """``"7:1,3:8"`` -> {"7": "1", "3": "8"}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.count(":") != 1:
            raise DataError(f"--flip {text!r}: each entry must be source:target (e.g. 7:1,3:8).")
        src, dst = (s.strip() for s in part.split(":"))
        out[src] = dst
    return out


def place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (copy where links are not possible), creating folders."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def inject_label_noise(source: Path, target: Path, noise_rate: float, seed: int, kind: str = "uniform",
                       flip_map: Optional[Dict[str, str]] = None) -> List[Dict[str, object]]:
    """Copy ``source`` (train/<class>/, test/<class>/) to ``target`` with flipped training labels.
    Returns the flipped records (file relative to ``target``, true class, given class), also written
    to ``target/injected_noise.csv``."""
    if not 0 <= noise_rate < 1:
        raise DataError(f"--noise_rate must be in [0, 1), got {noise_rate}.")
    if kind not in ("uniform", "asymmetric"):
        raise DataError(f"--noise must be uniform or asymmetric, got {kind!r}.")
    source, target = Path(source), Path(target)
    train, classes = scan_split(source, "train")
    test, _ = scan_split(source, "test", classes)
    if len(classes) < 2:
        raise DataError(f"{source}/train has {len(classes)} class folder(s); label noise needs at least two classes.")
    rng = np.random.default_rng(seed)
    given = list(train.labels)
    n = len(given)
    if kind == "uniform":
        for i in rng.choice(n, size=int(round(noise_rate * n)), replace=False):
            given[i] = int((given[i] + rng.integers(1, len(classes))) % len(classes))
    else:
        if flip_map is None:
            flip_map = DIGITS_ASYMMETRIC if set(DIGITS_ASYMMETRIC) | set(DIGITS_ASYMMETRIC.values()) <= set(classes) else \
                {c: classes[(k + 1) % len(classes)] for k, c in enumerate(classes)}
        unknown = [c for pair in flip_map.items() for c in pair if c not in classes]
        if unknown:
            raise DataError(f"--flip names class {unknown[0]!r}, which {source}/train does not have (classes: {', '.join(classes)}).")
        index = {c: k for k, c in enumerate(classes)}
        for i in range(n):
            src = classes[given[i]]
            if src in flip_map and rng.random() < noise_rate:
                given[i] = index[flip_map[src]]
    records = []
    # a running number keeps names unique when files of two classes share a name; it says nothing of the label
    for i, (path, true, label) in enumerate(zip(train.paths, train.labels, given)):
        dst = target / "train" / classes[label] / f"{i:06d}_{Path(path).name}"
        place(Path(path), dst)
        if label != true:
            records.append({"file": str(dst.relative_to(target)), "true_label": classes[true], "given_label": classes[label]})
    for i, (path, label) in enumerate(zip(test.paths, test.labels)):
        place(Path(path), target / "test" / classes[label] / f"{i:06d}_{Path(path).name}")
    for split in ("train", "test"):
        for c in classes:
            (target / split / c).mkdir(parents=True, exist_ok=True)
    write_csv(target / "injected_noise.csv", records, ["file", "true_label", "given_label"])
    return records
