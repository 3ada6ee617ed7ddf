"""Writing results atomically (temporary name, then rename) and reading them back.

A results directory is complete only when its ``manifest.json`` exists: writers remove an old
manifest before writing anything and write the new one last.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from .errors import DataError

MANIFEST = "manifest.json"


def _atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return _atomic(path, buffer.getvalue())


def write_csv(path: Path, rows: Iterable[Dict[str, Any]], fields: Sequence[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    return _atomic(path, buffer.getvalue().encode())


def write_json(path: Path, obj: Any) -> Path:
    return _atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def begin_results(directory: Path) -> None:
    """Mark ``directory`` incomplete (remove its manifest) before new results are written."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)


def read_manifest(directory: Path) -> Dict[str, Any]:
    """The manifest of a complete results directory, or a clear error."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise DataError(f"Results directory {directory} does not exist; run 'tracin influence --output_dir {directory}' first.")
    if not path.is_file():
        raise DataError(f"{directory} has no {MANIFEST}, so its results are missing or incomplete; run 'tracin influence' into it first.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt ({exc}); re-run 'tracin influence'.") from exc
