"""Reading a text data file into rows: JSON Lines, JSON, CSV, TSV, Parquet, or a ``datasets`` ``save_to_disk``
folder. Every row keeps where it came from (``train.jsonl:17``, the line or row number, 1-based), which the result
files name it by."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from ...errors import DataError

FORMATS = ".jsonl, .json, .csv, .tsv, .parquet or a datasets save_to_disk folder"


@dataclass
class Records:
    """The rows of one data file: ``rows[i]`` is a dict of its fields, ``where[i]`` names it (``file:line``)."""

    path: Path
    rows: List[Dict[str, Any]]
    where: List[str]

    @property
    def fields(self) -> List[str]:
        """The fields the rows hold, in first-seen order."""
        seen: Dict[str, None] = {}
        for row in self.rows[:1000]:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def column(self, name: str, flag: str) -> List[Any]:
        """The values of field ``name`` in every row; one clear error naming the flag and the fields that exist when a
        row lacks it or holds nothing there."""
        missing = [w for w, r in zip(self.where, self.rows) if r.get(name) is None]
        if missing:
            held = ", ".join(self.fields) or "none"
            where = "in any row" if len(missing) == len(self.rows) else f"at {missing[0]}"
            raise DataError(f"{self.path} has no field {name!r} ({flag}) {where}; its fields are: {held}. Give {flag} the "
                            "field that holds it.")
        return [r[name] for r in self.rows]


def read_records(path: Path, what: str) -> Records:
    """The rows of the ``what`` (train/test) data file ``path``; an empty, unreadable or unknown file is one error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"The {what} data {path} does not exist; give a {FORMATS}.")
    if path.is_dir():
        records = _from_disk(path, what)
    else:
        reader = {".jsonl": _jsonl, ".ndjson": _jsonl, ".json": _json, ".csv": _csv, ".tsv": _csv, ".parquet": _parquet}.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"The {what} data {path} is not a {FORMATS} (by its name); convert it or rename it.")
        try:
            records = reader(path)
        except UnicodeDecodeError:
            raise DataError(f"The {what} data {path} is not UTF-8 text; save it as UTF-8.") from None
    if not records.rows:
        raise DataError(f"The {what} data {path} holds no examples; give a file with at least one row.")
    return records


def _jsonl(path: Path) -> Records:
    rows, where = [], []
    with open(path, encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not valid JSON ({exc.msg}); every line of a .jsonl file is one JSON "
                                "object.") from None
            rows.append(_object(row, f"{path}:{n}"))
            where.append(f"{path.name}:{n}")
    return Records(path, rows, where)


def _json(path: Path) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # JSON Lines under a .json name
        return _jsonl(path)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; give a list of objects, one per example (or JSON "
                        "Lines).")
    return Records(path, [_object(r, f"{path}[{i}]") for i, r in enumerate(data)], [f"{path.name}:{i + 1}" for i in range(len(data))])


def _object(row: Any, where: str) -> Dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, not an object of fields; give one object per example.")
    return row


def _csv(path: Path) -> Records:
    with open(path, encoding="utf-8", newline="") as handle:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        rows = [dict(r) for r in csv.DictReader(handle, dialect=dialect)]
    return Records(path, [{k: v for k, v in r.items() if k is not None} for r in rows],
                   [f"{path.name}:{i + 2}" for i in range(len(rows))])  # line 1 is the header


def _parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"Reading {path} needs pyarrow (pip install pyarrow), or give the data as .jsonl or .csv.") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types for a damaged file
        raise DataError(f"{path} is not a readable Parquet file ({type(exc).__name__}); check the file.") from None
    return Records(path, rows, [f"{path.name}:{i + 1}" for i in range(len(rows))])


def _from_disk(path: Path, what: str) -> Records:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"The {what} data {path} is a folder but not a datasets save_to_disk folder; give a {FORMATS}.")
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise DataError(f"Reading {path} needs the datasets package (pip install datasets).") from None
    data = load_from_disk(str(path))
    if not isinstance(data, Dataset):
        splits = ", ".join(getattr(data, "keys", lambda: [])())
        raise DataError(f"{path} holds several splits ({splits}); give the folder of one split, e.g. {path / 'train'}.")
    return Records(path, data.to_list(), [f"{path.name}:{i + 1}" for i in range(len(data))])


def display(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters (with an ellipsis) for tables and pages."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


