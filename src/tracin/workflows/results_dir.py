"""The results directory of a job: the one owner of its file names, writers, manifest and readers.

A results directory is complete only when its ``manifest.json`` exists. A job writes into the folder's
``.staging/`` subfolder while the previous results (if any) stay complete; :meth:`ResultsDir.finish`
then removes the old manifest, moves every new file into place (each move atomic), removes the old
outputs the new run did not write again, and writes the new manifest last. A failure at any point before
that leaves the old results as they were; one during the moves leaves no manifest (incomplete). Every file
goes through the safe writers of :mod:`tracin.io`. While a job writes, it holds ``.lock`` in the folder,
so a second run into the same folder is refused instead of mixing its files with the first's.
"""
from __future__ import annotations

import json
import os
import platform
import warnings
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from ..version import __version__
from ..errors import DataError
from ..io import clear_path, file_sha256, read_csv, unwritable, write_csv, write_json, write_npy

if TYPE_CHECKING:
    from ..checkpoints import Checkpoint


class Scorer(Protocol):
    """What a manifest records of whatever scored: its settings, checkpoints, layers in scope and their kernels,
    parameter count, preconditioner and device (a :class:`tracin.TracIn`, or the in-run recorder
    :class:`tracin.InRun`, which has no checkpoints)."""

    config: Any
    checkpoints: List["Checkpoint"]
    preconditioner: Any

    @property
    def device(self) -> Any: ...

    @property
    def num_parameters(self) -> int: ...

    def scope(self) -> List[Dict[str, object]]: ...

MANIFEST = "manifest.json"
STAGING, LOCK = ".staging", ".lock"
TOP_VALUES, TOP_INDICES = "top_k_influences_values.npy", "top_k_influences_indices.npy"
OPP_VALUES, OPP_INDICES = "top_k_opponents_values.npy", "top_k_opponents_indices.npy"
TEST_INDICES, TRAIN_INDICES = "test_indices.npy", "train_indices.npy"
TOP_CSV = "top_k_influences.csv"
SELF_NPY, SELF_CSV, SELF_JSON = "self_influence.npy", "self_influence.csv", "self_influence.json"
SUMMED_LOSS = "summed_loss.npy"
MATRIX_NPY, MATRIX_CSV, MATRIX_JSON = "influence_matrix.npy", "influence.csv", "influence.json"
SCORES_CSV = "influence_scores.csv"
PROGRESS = ".progress"
REPORT_SUMMARY = "report_summary.json"  # written by 'tracin report', with the names of every file it wrote


def report_outputs(path: Path) -> List[str]:
    """The files and folders the last 'tracin report' wrote into the results folder ``path`` (plain names only,
    never a path elsewhere), from its summary; none when there is no readable summary."""
    try:
        listed = json.loads((Path(path) / REPORT_SUMMARY).read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in listed if isinstance(n, str) and Path(n).name == n and n not in (MANIFEST, STAGING, LOCK, PROGRESS)]


def predictions_csv(split: str) -> str:
    """``predictions_train.csv`` / ``predictions_test.csv``."""
    return f"predictions_{split}.csv"


def descending_ranks(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(positions of the finite values, highest first [m]; rank of each position [n], 1 = highest,
    0 where the value is NaN — an example left out by sampling)."""
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[: int(np.isfinite(values).sum())]
    rank_of = np.zeros(len(values), dtype=np.int64)
    rank_of[order] = np.arange(1, len(order) + 1)
    return order, rank_of


def seeded_subset(n: int, size: Optional[int], seed: int, what: str, noun: str = "examples") -> np.ndarray:
    """Sorted indices of a seeded random subset of ``size`` of a split's ``n`` examples (all when None, or with a
    warning when ``size`` is not smaller than ``n``); ``what`` names the split and its flag (``--train_subset``)."""
    if size is not None and size < 1:
        raise DataError(f"--{what}_subset must be at least 1, got {size}.")
    if size is None or size >= n:
        if size is not None:
            warnings.warn(f"--{what}_subset {size} is not smaller than the {n} {what} {noun}; scoring all of them.",
                          stacklevel=3)
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False))


@dataclass
class Scored:
    """One split's scored examples as the result tables name them, in scoring order.

    index [m]: positions in the whole split; file: where each comes from (an image's path, a text's ``file:line``);
    label, predicted: class names (a language model's: its completion and the model's); confidence [m]; correct [m]
    bools; text: what a text example says, for display (None for images)."""

    index: np.ndarray
    file: List[str]
    label: List[str]
    predicted: List[str]
    confidence: np.ndarray
    correct: np.ndarray
    text: Optional[List[str]] = None

    def row(self, position: int, prefix: str = "") -> Dict[str, Any]:
        """The table columns of the example at ``position`` (in scoring order), each name prefixed."""
        row = {f"{prefix}file": self.file[position]}
        if self.text is not None:
            row[f"{prefix}text"] = self.text[position]
        return {**row, f"{prefix}label": self.label[position], f"{prefix}predicted": self.predicted[position]}

    def columns(self, prefix: str = "") -> List[str]:
        return [f"{prefix}file"] + ([f"{prefix}text"] if self.text is not None else []) + [f"{prefix}label", f"{prefix}predicted"]


def write_top_k(out: "ResultsDir", result: Any, train: Scored, test: Scored) -> None:
    """The top-k arrays (indices: positions in the whole training split), the subsets' indices,
    ``top_k_influences.csv`` and both prediction tables, from an :class:`tracin.results.InfluenceResult`."""
    pro_i, opp_i = train.index[result.proponents.indices.numpy()], train.index[result.opponents.indices.numpy()]
    pro_v, opp_v = result.proponents.values.numpy(), result.opponents.values.numpy()
    for name, array in ((TOP_VALUES, pro_v), (TOP_INDICES, pro_i), (OPP_VALUES, opp_v), (OPP_INDICES, opp_i),
                        (TEST_INDICES, test.index), (TRAIN_INDICES, train.index)):
        out.npy(name, array)
    train_row = {int(j): train.row(p, "train_") for p, j in enumerate(train.index.tolist())}  # each example's columns once

    def rows() -> Iterator[Dict[str, Any]]:
        for r, t in enumerate(test.index.tolist()):
            test_row = test.row(r, "test_")
            for kind, vals, idxs in (("proponent", pro_v, pro_i), ("opponent", opp_v, opp_i)):
                for rank, (j, score) in enumerate(zip(idxs[r].tolist(), vals[r].tolist()), start=1):
                    yield {"test_index": t, **test_row, "kind": kind, "rank": rank, "train_index": j, **train_row[j],
                           "score": score}

    out.csv(TOP_CSV, rows(), ["test_index", *test.columns("test_"), "kind", "rank", "train_index", *train.columns("train_"),
                              "score"])
    for split, table in (("train", train), ("test", test)):
        out.csv(predictions_csv(split), ({"index": int(i), **table.row(p), "confidence": float(table.confidence[p]),
                                          "correct": int(table.correct[p])} for p, i in enumerate(table.index.tolist())),
                ["index", *table.columns(), "confidence", "correct"])


def write_self_influence(out: "ResultsDir", scores: np.ndarray, train: Scored,
                         extra: Optional[Dict[str, np.ndarray]] = None) -> None:
    """``self_influence.npy`` [m] and ``self_influence.csv`` ranked highest first (``extra``: more [m] columns)."""
    extra = extra or {}
    order, rank_of = descending_ranks(scores)  # sampled examples only
    out.npy(SELF_NPY, scores)
    columns = ["train_file" if c == "file" else c for c in train.columns()]  # the file column named as in every version
    out.csv(SELF_CSV, ({"train_index": int(train.index[p]), **dict(zip(columns, train.row(p).values())),
                        "score": float(scores[p]), "rank": int(rank_of[p]), **{k: v[p].item() for k, v in extra.items()}}
                       for p in order), ["train_index", *columns, "score", "rank", *extra])


class ResultsDir:
    """One results directory; a context manager while a job writes into it (see the module docstring).
    Writers record what they wrote (``written``) for the manifest."""

    def __init__(self, path: Path, keep_partial: bool = False):
        self.path = Path(path)
        self.staging = self.path / STAGING
        self.keep_partial = keep_partial  # a resumed run keeps the partial outputs staged by the interrupted one
        self.written: List[Path] = []
        self._lock: Optional[Any] = None

    def __enter__(self) -> "ResultsDir":
        self.begin()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def file(self, name: str) -> Path:
        """Where a new output named ``name`` is written (in the staging folder until :meth:`finish`)."""
        return self.staging / name

    @property
    def progress(self) -> Path:
        """Where an interrupted influence run keeps its progress."""
        return self.path / PROGRESS

    # -- writing -------------------------------------------------------------------------------
    def begin(self) -> None:
        """Create the folder, take its lock, and empty the staging folder (unless ``keep_partial``)."""
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"The output folder {self.path} is a file; give a folder (new or holding tracin results).")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = folder_lock(self.path / LOCK)
            if not self.keep_partial or self.staging.is_symlink():  # a link planted there is removed, never followed
                clear_path(self.staging)
            self.staging.mkdir(exist_ok=True)
        except OSError as exc:
            raise unwritable(self.path, exc) from None

    def mark_incomplete(self) -> None:
        """Remove a manifest left in the folder: what is written into it next is not those results."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MANIFEST).unlink(missing_ok=True)

    def release(self) -> None:
        """Give the folder's lock back (the staging folder stays for a resumed run)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _record(self, path: Path) -> Path:
        self.written.append(path)
        return path

    def npy(self, name: str, array: np.ndarray) -> Path:
        return self._record(write_npy(self.file(name), array))

    def csv(self, name: str, rows: Iterable[Dict[str, Any]], fields: Sequence[str]) -> Path:
        return self._record(write_csv(self.file(name), rows, fields))

    def json(self, name: str, obj: Any) -> Path:
        return self._record(write_json(self.file(name), obj))

    def adopt(self, name: str) -> Path:
        """Record a file written into the staging folder by someone else (the engine's memory-mapped matrix)."""
        return self._record(self.file(name))

    def self_influence_tables(self, ids: Sequence[str], scores: np.ndarray) -> None:
        """``self_influence.{npy,csv,json}`` keyed by example ids; JSON: ``{id: {"tracin_self_influence": score}}``,
        the CSV ranked highest first."""
        order, _ = descending_ranks(scores)
        self.npy(SELF_NPY, scores)
        self.csv(SELF_CSV, ({"id": ids[i], "score": float(scores[i]), "rank": r + 1} for r, i in enumerate(order)),
                 ["id", "score", "rank"])
        self.json(SELF_JSON, {ids[i]: {"tracin_self_influence": float(scores[i])} for i in range(len(ids)) if np.isfinite(scores[i])})

    def influence_tables(self, train_ids: Sequence[str], test_ids: Sequence[str], matrix: np.ndarray) -> None:
        """``influence_matrix.npy`` [n_test, n_train], ``influence.csv`` (one row per test x train) and
        ``influence.json``: ``{train id: {"tracin_influence_<test id>": score}}``."""
        self.npy(MATRIX_NPY, matrix)
        self.csv(MATRIX_CSV, ({"test_id": t, "train_id": train_ids[j], "score": float(matrix[r, j])}
                              for r, t in enumerate(test_ids) for j in range(len(train_ids))), ["test_id", "train_id", "score"])
        self.json(MATRIX_JSON, {train_ids[j]: {f"tracin_influence_{t}": float(matrix[r, j]) for r, t in enumerate(test_ids)}
                                for j in range(len(train_ids))})

    def finish(self, command: str, tr: "Scorer", record: "RunRecord") -> Dict[str, Any]:
        """Write ``manifest.json`` (last: its presence marks the results complete) and return it."""
        manifest = {
            "tool": "tracin", "command": command, "complete": True, "version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in record.parameters.items()},
            "settings": tr.config.to_dict(),
            "data": record.data,
            "checkpoints": _checkpoint_rows(tr, record.hashes),
            "scope": tr.scope(), "num_parameters": tr.num_parameters,
            "precondition": tr.preconditioner.describe() if tr.preconditioner is not None else None,
            "device": str(tr.device),
            "engine": _engine_stats(record.stats),
            "timings": record.timings,
            "versions": _versions(),
            "outputs": sorted(p.name for p in self.written),
            **record.extra,
        }
        self._commit(manifest)
        return manifest

    def _commit(self, manifest: Dict[str, Any]) -> None:
        """Swap the staged outputs in: old manifest out, new files in, stale old outputs out, new manifest last."""
        old = self.path / MANIFEST
        stale = []
        if old.is_file():
            try:
                stale = [str(n) for n in json.loads(old.read_text()).get("outputs", [])]
            except (json.JSONDecodeError, AttributeError):
                stale = []
        stale += [*report_outputs(self.path), REPORT_SUMMARY]  # a report of the old results no longer describes these
        try:
            old.unlink(missing_ok=True)
            for name in manifest["outputs"]:
                os.replace(self.staging / name, self.path / name)
            for name in set(stale) - set(manifest["outputs"]):
                if Path(name).name == name and name != MANIFEST:  # a plain file name, never a path elsewhere
                    clear_path(self.path / name)
        except OSError as exc:
            raise unwritable(self.path, exc) from None
        write_json(self.path / MANIFEST, manifest)
        clear_path(self.staging)

    # -- reading -------------------------------------------------------------------------------
    def manifest(self) -> Dict[str, Any]:
        """The manifest of a complete results directory, or a clear error."""
        path = self.path / MANIFEST
        if not self.path.is_dir():
            raise DataError(f"Results directory {self.path} does not exist; run 'tracin influence --output_dir {self.path}' first.")
        if not path.is_file():
            raise DataError(f"{self.path} has no {MANIFEST}, so its results are missing or incomplete; run 'tracin influence' into it first.")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is corrupt ({exc}); re-run 'tracin influence'.") from exc

    def missing(self, names: Sequence[str]) -> List[str]:
        return [n for n in names if not (self.path / n).is_file()]

    def table(self, name: str) -> List[Dict[str, str]]:
        return read_csv(self.path / name)

    def array(self, name: str) -> np.ndarray:
        return np.load(self.path / name)


class RunRecord:
    """What a job tells the manifest besides the scorer: its parameters, data description, timings (seconds),
    the engine's statistics, the checkpoints' file hashes (computed when None) and extra top-level entries."""

    def __init__(self, parameters: Dict[str, Any], data: Dict[str, Any], timings: Dict[str, float],
                 stats: Dict[str, Any], hashes: Optional[Sequence[str]] = None, extra: Optional[Dict[str, Any]] = None):
        self.parameters, self.data, self.timings, self.stats = parameters, data, timings, stats
        self.hashes, self.extra = hashes, extra or {}


def _engine_stats(stats: Dict[str, Any]) -> Dict[str, Any]:
    """A pass's statistics as the manifest keeps them (the per-layer kernels are in its scope, the sampled indices in
    train_indices.npy)."""
    return {k: v for k, v in stats.items() if k not in ("layer_modes", "sampled_indices")}


def pass_stats(tr: Any) -> Dict[str, Any]:
    """The manifest's engine statistics of a job that ran several passes: each pass's, in order."""
    return {"passes": [_engine_stats(p) for p in tr.passes]}


def job_parameters(job: Any) -> Dict[str, Any]:
    """A job dataclass's fields for the manifest, its scoring settings flattened beside them."""
    params = {k: asdict(v) if is_dataclass(v) else v for k, v in vars(job).items() if k != "scoring"}
    scoring = getattr(job, "scoring", None)
    return {**params, **(scoring.to_dict() if scoring is not None else {})}


def folder_lock(path: Path) -> Any:
    """An exclusive lock on ``path`` (held while the returned file is open), or one clear error when another
    run holds it. Where the platform has no ``fcntl`` no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    if path.is_symlink():
        path.unlink()
    handle = open(path, "a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataError(f"Another tracin run is writing into {path.parent} (it holds {path.name}); wait for it to finish "
                        "or choose another folder.") from None
    return handle


def _checkpoint_rows(tr: "Scorer", hashes: Optional[Sequence[str]]) -> List[Dict[str, Any]]:
    hashes = hashes or [file_sha256(Path(c.source)) if isinstance(c.source, Path) else "" for c in tr.checkpoints]
    return [{"file": str(c.source.resolve()) if isinstance(c.source, Path) else c.name, "sha256": h,
             "learning_rate": c.learning_rate, "learning_rate_source": c.metadata.get("learning_rate_source", "file"),
             "epoch": c.epoch, "step": c.step} for c, h in zip(tr.checkpoints, hashes)]


def _versions() -> Dict[str, str]:
    versions = {"tracin": __version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return versions
