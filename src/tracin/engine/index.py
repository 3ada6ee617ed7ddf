"""A gradient index: every training example's gradient vector written once, queried many times with one matrix
product.

A row holds one training example's vectors at every checkpoint, each scaled by sqrt(|learning rate|) (and unit
length first when ``normalize`` asks) and concatenated, so ``query_row . row`` is the whole checkpoint sum
sum_c lr_c g_c(test) . g_c(train); under K-FAC both sides are whitened, so the dot product is g^T P g'. The
directory holds:

- ``index.json``: what the rows depend on (layers, projection, preconditioner, normalisation, every checkpoint's
  name, learning rate and weight hash), the storage dtype and the shard table, written before any
  shard and compared on every build, add and query;
- ``kfac_whiteners.npz`` (under K-FAC): the fitted whiteners, so a query needs no training data (read without
  unpickling);
- ``shard-NNNNN.npy`` [rows, width] and ``shard-NNNNN.self.npy`` [rows] (each example's self-influence, float32),
  then ``shard-NNNNN.json``, written last: a shard without it is incomplete, and a build that is run again writes
  only the shards that are.

Shards are planned in parts: a build plans the training set's, :func:`plan_part` appends a part for new examples.
Under torchrun, shard i of a part is written by rank i mod world.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torch.utils.data import DataLoader, Subset

from ..checkpoints import Checkpoint
from ..errors import TracInError
from ..io import write_bytes, write_json, write_npy
from .accumulate import TopKAccumulator
from .distributed import barrier, rank_and_world

META = "index.json"
WHITENERS = "kfac_whiteners.npz"
FORMAT = 1
DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "bfloat16": (np.uint16, torch.bfloat16)}  # bfloat16 rows are stored as their raw 16 bits
COMPARED = ("layers", "precondition", "projection", "normalize", "checkpoints")


def weights_sha256(checkpoint: Checkpoint) -> str:
    digest = hashlib.sha256()
    for key in sorted(checkpoint.state_dict()):
        digest.update(key.encode())
        digest.update(checkpoint.state_dict()[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def describe_checkpoints(checkpoints: Sequence[Checkpoint]) -> List[Dict[str, Any]]:
    return [{"name": c.name, "learning_rate": c.learning_rate, "sha256": weights_sha256(c)} for c in checkpoints]


@dataclass
class IndexMeta:
    """The contents of ``index.json``. ``description``: the :data:`COMPARED` keys and the settings; ``shards``: ``{"name", "first", "rows", "part"}`` in row order; ``parts``:
    ``{"first", "rows", "source"}``, one per build or add (``source``: the caller's note of what the rows are). The
    row width is the shards' own."""

    description: Dict[str, Any]
    dtype: str
    shard_rows: int
    fit_examples: int = 0
    shards: List[Dict[str, Any]] = field(default_factory=list)
    parts: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return sum(p["rows"] for p in self.parts)

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}


class GradientIndex:
    """An index directory: its metadata, its shards, and the checks every use makes."""

    def __init__(self, directory: Path, meta: IndexMeta):
        self.directory = Path(directory)
        self.meta = meta

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> "GradientIndex":
        """The index in ``directory``, its metadata read and nothing checked."""
        directory = Path(directory)
        path = directory / META
        if not path.is_file():
            raise TracInError(f"{directory} holds no gradient index; build one there with build_index "
                              "(tracin index build) first.")
        try:
            raw = json.loads(path.read_text())
            meta = IndexMeta(**{k: v for k, v in raw.items() if k != "format"})
            _check_meta(meta)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise TracInError(f"{path} is not a tracin index description ({exc}); build the index again.") from None
        return cls(directory, meta)

    def decided_plain(self) -> bool:
        """Whether the index was built with ``precondition="auto"`` decided as plain TracIn (a layer K-FAC does not
        cover), which a query with "auto" then repeats."""
        settings = self.meta.description.get("settings")
        return isinstance(settings, dict) and settings.get("precondition") == "auto" \
            and self.meta.description.get("precondition", "kfac") is None

    def check(self, expected: Dict[str, Any]) -> None:
        """Refuse the index unless it was made with ``expected`` (:data:`COMPARED` keys)."""
        for key in COMPARED:
            if self.meta.description.get(key) != json.loads(json.dumps(expected[key])):
                raise TracInError(f"The gradient index in {self.directory} was made with different {key}; query it with "
                                  "the settings and checkpoints it was built with, or build a new index.")

    def write_meta(self) -> None:
        write_json(self.directory / META, self.meta.to_json())

    # -- shards -------------------------------------------------------------------------------------
    def complete(self, shard: Dict[str, Any]) -> bool:
        return (self.directory / f"{shard['name']}.json").is_file()

    def missing(self) -> List[Dict[str, Any]]:
        return [s for s in self.meta.shards if not self.complete(s)]

    def require_complete(self) -> None:
        missing = self.missing()
        if missing:
            raise TracInError(f"The gradient index in {self.directory} is incomplete ({len(missing)} of "
                              f"{len(self.meta.shards)} shards missing, the first at row {missing[0]['first']}); run the "
                              "same build (or add) again to finish it.")

    def write_shard(self, shard: Dict[str, Any], rows: np.ndarray, selfs: np.ndarray) -> None:
        """``rows`` [n, width] float32 -> stored dtype; the sidecar last, as the shard's commit."""
        stored = torch.from_numpy(rows).to(DTYPES[self.meta.dtype][1])
        array = stored.view(torch.int16).numpy().view(np.uint16) if self.meta.dtype == "bfloat16" else stored.numpy()
        write_npy(self.directory / f"{shard['name']}.npy", array)
        write_npy(self.directory / f"{shard['name']}.self.npy", selfs.astype(np.float32))
        write_json(self.directory / f"{shard['name']}.json", {"first": shard["first"], "rows": shard["rows"]})

    def read_rows(self, shard: Dict[str, Any]) -> np.ndarray:
        """The shard's rows as stored, memory-mapped [rows, width] (checked against the shard table)."""
        return self._read(shard, ".npy", (np.dtype(DTYPES[self.meta.dtype][0]),), 2)

    def _read(self, shard: Dict[str, Any], suffix: str, dtypes: Tuple[np.dtype, ...], ndim: int) -> np.ndarray:
        path = self.directory / f"{shard['name']}{suffix}"
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise TracInError(f"{path} is missing or damaged ({exc}); delete {shard['name']}.json and run the build "
                              "again to rewrite that shard.") from None
        if array.dtype not in dtypes or array.ndim != ndim or array.shape[0] != shard["rows"]:
            raise TracInError(f"{path} holds {array.dtype} {tuple(array.shape)}, not the {shard['rows']} rows of "
                              f"{self.meta.dtype} the index lists; delete {shard['name']}.json and run the build again.")
        return array

    def as_float(self, stored: np.ndarray, copy: bool = True) -> torch.Tensor:
        """Stored rows (:meth:`read_rows`, or a slice of them) as float32 [n, width], bfloat16 decoded from its stored
        bits: a copy, or with ``copy=False`` float32 rows read in place (not to be written: the file is mapped
        read-only) and other dtypes converted in one pass instead of being copied first."""
        if copy:
            stored = np.array(stored)
        with warnings.catch_warnings():  # a read-only mapping: torch warns that writing to it would fail; nothing does
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            block = torch.from_numpy(stored.view(np.int16) if self.meta.dtype == "bfloat16" else stored)
        if self.meta.dtype == "bfloat16":
            return block.view(torch.bfloat16).float()
        return block.float()

    def summary(self) -> Dict[str, Any]:
        """What the index holds, for people: rows, parts (and what each says it is), shards done and missing, storage,
        and what its rows depend on."""
        missing = self.missing()
        files = list(self.directory.glob("shard-*"))
        d = self.meta.description
        return {"rows": self.meta.n_rows, "dtype": self.meta.dtype, "parts": [dict(p) for p in self.meta.parts],
                "shards": len(self.meta.shards), "missing_shards": len(missing),
                "width": self.width() if self.meta.shards and not missing else None,
                "bytes": sum(f.stat().st_size for f in files if f.is_file()), "layers": d.get("layers"),
                "precondition": d.get("precondition"), "projection": d.get("projection"), "normalize": d.get("normalize"),
                "checkpoints": len(d.get("checkpoints") or []), "fit_examples": self.meta.fit_examples}

    def width(self) -> int:
        """Numbers per row (checkpoints x vector size), as the first shard holds them."""
        self.require_complete()
        return int(self.read_rows(self.meta.shards[0]).shape[1]) if self.meta.shards else 0

    def self_influence(self) -> torch.Tensor:
        """Every row's stored self-influence, [n_rows] float32."""
        self.require_complete()
        parts = [np.array(self._read(s, ".self.npy", (np.dtype(np.float32),), 1)) for s in self.meta.shards]
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.float32))

    # -- K-FAC whiteners ----------------------------------------------------------------------------
    def save_whiteners(self, tensors: Dict[str, torch.Tensor]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **{k: v.detach().cpu().numpy() for k, v in tensors.items()})
        write_bytes(self.directory / WHITENERS, buffer.getvalue())

    def load_whiteners(self) -> Dict[str, torch.Tensor]:
        path = self.directory / WHITENERS
        if not path.is_file():
            raise TracInError(f"The gradient index in {self.directory} has no {WHITENERS}; build the index again.")
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {k: torch.from_numpy(stored[k]) for k in stored.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise TracInError(f"{path} is damaged ({exc}); build the index again.") from None


SHARD_NAME = re.compile(r"shard-\d{5,}")


def _check_meta(meta: IndexMeta) -> None:
    """Raise ValueError unless ``meta`` is well formed: a known dtype, whole numbers where rows are counted, and shard
    names of the form the builder writes (a planted name never reaches a path)."""
    if meta.dtype not in DTYPES or not _whole(meta.shard_rows, 1) or not isinstance(meta.description, dict):
        raise ValueError("unknown dtype, shard size or description")
    for shard in meta.shards:
        if not (SHARD_NAME.fullmatch(str(shard["name"])) and _whole(shard["first"], 0) and _whole(shard["rows"], 1)
                and _whole(shard["part"], 0) and shard["part"] < len(meta.parts)):
            raise ValueError(f"bad shard entry {shard!r}")
    for part in meta.parts:
        if not (_whole(part["first"], 0) and _whole(part["rows"], 1)):
            raise ValueError(f"bad part entry {part!r}")


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def plan_part(meta: IndexMeta, n_rows: int, source: Optional[str]) -> Dict[str, Any]:
    """Append a part of ``n_rows`` rows (and its shards of ``meta.shard_rows``) to ``meta``; returns the part."""
    first, number = meta.n_rows, len(meta.shards)
    part = {"first": first, "rows": n_rows, "source": source}
    meta.parts.append(part)
    for start in range(0, n_rows, meta.shard_rows):
        rows = min(meta.shard_rows, n_rows - start)
        meta.shards.append({"name": f"shard-{number:05d}", "first": first + start, "rows": rows, "part": len(meta.parts) - 1})
        number += 1
    return part


def plan_or_resume(index: GradientIndex, n_rows: int, source: Optional[str], add: bool) -> Dict[str, Any]:
    """The part a build or add writes: a build's is the first (planned with the metadata when the index is new); an
    add resumes the last part when it is unfinished and of ``n_rows`` rows, else plans a new one (rank 0 writes the
    metadata)."""
    meta = index.meta
    if not add:
        if not meta.parts:
            return _published(index, plan_part(meta, n_rows, source))
        if len(meta.parts) > 1 or meta.parts[0]["rows"] != n_rows:
            raise TracInError(f"The gradient index in {index.directory} holds {meta.n_rows} rows from other data than "
                              f"these {n_rows} training examples; add them with add_to_index or build "
                              "into a new directory.")
        return meta.parts[0]
    last = meta.parts[-1]
    unfinished = any(s["part"] == len(meta.parts) - 1 for s in index.missing())
    if unfinished and last["rows"] == n_rows:
        return last
    if unfinished:
        raise TracInError(f"The gradient index in {index.directory} has an unfinished part of {last['rows']} rows; "
                          "finish it by running that add (or build) again before adding other data.")
    return _published(index, plan_part(meta, n_rows, source))


def _published(index: GradientIndex, part: Dict[str, Any]) -> Dict[str, Any]:
    """``part``, once rank 0 has written the metadata that plans it and every rank has seen it written."""
    if rank_and_world()[0] == 0:
        index.write_meta()
    barrier()
    return part


def mine(index: GradientIndex, part: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The part's missing shards this process writes: under torchrun, the i-th shard of the part on rank i mod world."""
    rank, world = rank_and_world()
    number = index.meta.parts.index(part)
    shards = [s for s in index.meta.shards if s["part"] == number]
    return [s for i, s in enumerate(shards) if i % world == rank and not index.complete(s)]


def rows_to_compute(dataset: Any, loader: Any, part: Dict[str, Any], todo: Sequence[Dict[str, Any]]) -> Tuple[Any, np.ndarray]:
    """(a dataset of just the examples of ``todo``, or None to read ``loader`` whole; the index row of each example
    read, in order). A DataLoader given by the caller is read whole (its examples cannot be picked); the writer drops
    the rows of shards that are done."""
    if isinstance(dataset, DataLoader) or _covers(part, todo):
        return None, part["first"] + np.arange(part["rows"])
    positions = np.concatenate([np.arange(s["first"], s["first"] + s["rows"]) for s in todo]) - part["first"]
    return Subset(dataset, positions.tolist()), part["first"] + positions


def _covers(part: Dict[str, Any], todo: Sequence[Dict[str, Any]]) -> bool:
    return sum(s["rows"] for s in todo) == part["rows"]


def shard_rows_for(width: int, budget: int, cap: int = 65536) -> int:
    """Rows per shard: a shard's float32 buffer of every checkpoint's vectors (``width`` numbers per example, an
    estimate) in an eighth of ``budget`` (two shards can be in progress at once), at most ``cap``."""
    return int(max(1, min(cap, budget // max(1, 8 * 4 * width))))


class FoldingWriter:
    """Receives ``(checkpoint, position, vectors [B, D])`` for the examples at ``rows`` (their index rows, in the
    order they are read), folds each example's checkpoints into one row and writes every shard of ``shards`` as soon
    as all its rows have every checkpoint; vectors of rows outside ``shards`` are dropped."""

    def __init__(self, index: GradientIndex, shards: Sequence[Dict[str, Any]], rows: np.ndarray,
                 learning_rates: Sequence[float], normalize: str):
        self.index, self.rows = index, rows
        self.first_of = {s["first"]: s for s in shards}
        self.starts = np.array(sorted(s["first"] for s in index.meta.shards))
        self.rates = np.asarray(learning_rates, dtype=np.float64)
        self.normalize = normalize
        self.open: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}  # name -> (vectors [C, rows, D], filled [C, rows])

    def __call__(self, c: int, position: int, vectors: torch.Tensor) -> None:
        rows = self.rows[position:position + vectors.shape[0]]
        values = vectors.detach().float().cpu().numpy()
        owners = self.starts[np.searchsorted(self.starts, rows, side="right") - 1]
        for first in np.unique(owners):
            shard = self.first_of.get(int(first))
            if shard is None:
                continue
            mine = owners == first
            buffer, filled = self._buffer(shard, values.shape[1])
            at = rows[mine] - shard["first"]
            buffer[c, at] = values[mine]
            filled[c, at] = True
            if filled.all():
                self._finish(shard)

    def _buffer(self, shard: Dict[str, Any], dim: int) -> Tuple[np.ndarray, np.ndarray]:
        if shard["name"] not in self.open:
            C = len(self.rates)
            self.open[shard["name"]] = (np.zeros((C, shard["rows"], dim), np.float32), np.zeros((C, shard["rows"]), bool))
        return self.open[shard["name"]]

    def _finish(self, shard: Dict[str, Any]) -> None:
        vectors, _ = self.open.pop(shard["name"])
        rows, selfs = fold(torch.from_numpy(vectors), self.rates, self.normalize, "training")
        self.index.write_shard(shard, rows.numpy(), selfs.numpy())


def fold(vectors: torch.Tensor, learning_rates: Sequence[float], normalize: str, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-checkpoint vectors [C, n, D] -> (rows [n, C * D], self-influence [n] = sum_c lr_c |v_c|^2, computed before
    any normalisation). ``what`` ``"training"``: each checkpoint scaled by sqrt(|lr_c|), unit length first unless
    ``normalize`` is "none"; ``"test"``: by sign(lr_c) sqrt(|lr_c|), unit length first under "cosine"."""
    rates = torch.as_tensor(np.asarray(learning_rates, dtype=np.float64))
    selfs = (vectors.double().pow(2).sum(2) * rates[:, None]).sum(0).float()
    unit = normalize != "none" if what == "training" else normalize == "cosine"
    if unit:
        vectors = vectors / vectors.norm(dim=2, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    scale = rates.abs().sqrt() * (rates.sign() if what == "test" else 1.0)
    scale = torch.where(rates == 0, torch.zeros_like(scale), scale)
    folded = vectors * scale.to(vectors.dtype)[:, None, None]
    return folded.permute(1, 0, 2).reshape(vectors.shape[1], -1).contiguous(), selfs


def search(index: GradientIndex, queries: torch.Tensor, top_k: int, tile_bytes: int) -> TopKAccumulator:
    """Exact top-k of ``queries`` [m, width] (on their device) against every row, read in row tiles of about
    ``tile_bytes`` converted to float32."""
    width = index.width()
    if queries.shape[1] != width:
        raise TracInError(f"The gradient index in {index.directory} holds rows of {width} numbers, the queries have "
                          f"{queries.shape[1]}; the model in scope differs from the one it was built with.")
    device, m = queries.device, queries.shape[0]
    acc = TopKAccumulator(m, top_k, device, queries.dtype)
    step = max(1, tile_bytes // (4 * (width + 2 * m)))
    for shard in index.meta.shards:
        stored = index.read_rows(shard)
        for start in range(0, shard["rows"], step):
            tile = index.as_float(stored[start:start + step], copy=False).to(device)
            acc.update(queries @ tile.T, shard["first"] + start)
    return acc
