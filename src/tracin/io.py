"""Safe file writers: every file the package writes goes through :func:`write_bytes`.

* Atomic: the bytes go to a fresh temporary file in the same folder, renamed over the target, so no
  reader ever sees a half-written file; a failed write leaves no temporary file behind.
* No symlink is followed: the temporary file is created exclusively (never an existing file or link),
  and the rename replaces a link planted at the target itself, not the file it points to.
* CSV cells a spreadsheet would evaluate as a formula (text starting with ``=``, ``+``, ``-``, ``@``, a tab
  or a carriage return) are written with a leading apostrophe, as OWASP advises; a cell that starts with
  an apostrophe gets one more, and :func:`read_csv` removes exactly one, so every value reads back as it was.
* The file gets the permissions an ordinary ``open()`` would give it (0666 less the process's umask; 0644 under
  the usual 022), not the owner-only 0600 of a temporary file, so colleagues and web servers can read results.
* A write that the file system refuses (read-only folder, full disk) is one clear
  :class:`~tracin.errors.DataError`.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from .errors import DataError


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, following no link; returns ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # O_EXCL: a new file
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise unwritable(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else by setting and restoring."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unwritable(path: Path, exc: OSError) -> DataError:
    """The one-line error for a file the system would not let us write."""
    return DataError(f"Cannot write {path} ({exc.strerror or exc}); check that its folder is writable and the disk has "
                     "space, or choose another output folder.")


def clear_path(path: Path) -> None:
    """Remove whatever is at ``path`` (a link itself, never its target; a file; a folder tree) so a fresh one
    can be made there."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def csv_cell(value: Any) -> Any:
    """A CSV value a spreadsheet shows as text, never as a formula (see the module docstring)."""
    if isinstance(value, str) and value and (value[0] in FORMULA_START or value[0] == "'"):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The value :func:`csv_cell` wrote."""
    return cell[1:] if cell.startswith("'") else cell


def write_npy(path: Path, array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return write_bytes(path, buffer.getvalue())


def write_csv(path: Path, rows: Iterable[Dict[str, Any]], fields: Sequence[str]) -> Path:
    """``rows`` as a CSV with the columns ``fields`` (a missing value is empty), each cell through :func:`csv_cell`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = list(fields)
    writer.writerow(names)
    writer.writerows([csv_cell(row.get(name, "")) for name in names] for row in rows)
    return write_bytes(path, buffer.getvalue().encode())


def write_json(path: Path, obj: Any) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_figure(path: Path, fig: Any, dpi: int = 90) -> Path:
    """A matplotlib figure as a file (format from the suffix), through :func:`write_bytes`; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi)
    finally:
        plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def read_csv(path: Path) -> List[Dict[str, str]]:
    """The rows of a CSV that :func:`write_csv` wrote, each value as it was written."""
    with open(path, newline="") as f:
        return [{k: csv_value(v) if isinstance(v, str) else v for k, v in row.items()} for row in csv.DictReader(f)]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
