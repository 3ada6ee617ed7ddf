"""The ``tracin influence`` job for image classifiers trained by ``tracin train``: set up, score,
predict, write."""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from torch.utils.data import Subset

from ...api import TracIn
from ...checkpoints import Checkpoint, weights_for
from ...config import ScoringConfig
from ...engine.distributed import process_group, rank_and_world
from ...engine.resume import reset
from ...engine.index import GradientIndex
from ...errors import TracInError
from ...io import file_sha256
from ...results import InfluenceResult
from ...tasks.classification import checkpoint_probabilities, label_losses, predict_proba
from .. import results_dir as names
from ..results_dir import (ResultsDir, RunRecord, Scored, descending_ranks, job_parameters, seeded_subset, write_self_influence,
                           write_top_k)
from . import predictions
from .folders import images_digest
from .setup import ImageSetup, OwnModel, image_setup


@dataclass
class InfluenceJob:
    """A ``tracin influence`` run: the folders, what to write, and the scoring settings."""

    data_dir: Path
    checkpoint_dir: Optional[Path]
    output_dir: Path
    top_k: int = 100
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    self_influence: bool = False
    device: str = "auto"
    trust_checkpoint: bool = False
    full_matrix: bool = False
    overwrite: bool = False
    summed_loss: bool = False
    own: Optional[OwnModel] = None  # a model trained outside 'tracin train'
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(layers="last", batch_size=32))
    # what self-influence (the mislabel ranking) is scored over: "output_bias" (K-FAC over the output layer's bias,
    # the best detector measured in docs/quality.md; the last layer when the model has no output bias) or "same"
    # (the influence scope and settings, in the same pass)
    self_influence_layers: str = "output_bias"
    # a gradient index of the training images (tracin index build): scores come from it, without the training pass;
    # self-influence is then the one the index stores (its layers and settings)
    index_dir: Optional[Path] = None
    ann_probes: Optional[int] = None  # with index_dir: approximate search probing this many FAISS lists


@dataclass
class _Run:
    """One influence run as it goes: the set-up, the scored subsets, the scorer and the output folder."""

    job: InfluenceJob
    setup: ImageSetup
    train_idx: np.ndarray
    test_idx: np.ndarray
    tr: TracIn
    out: ResultsDir
    final: Checkpoint  # the model whose predictions are reported
    timings: Dict[str, float] = field(default_factory=dict)
    accuracy: Dict[str, float] = field(default_factory=dict)  # split -> share of its scored images the final model gets right

    @property
    def train_set(self) -> Subset:
        return Subset(self.setup.train, self.train_idx.tolist())

    @property
    def test_set(self) -> Subset:
        return Subset(self.setup.test, self.test_idx.tolist())


def run_influence(job: InfluenceJob) -> Optional[Dict[str, Any]]:
    """Score top-k proponents/opponents (and optionally self-influence); write the result files
    and, last, ``manifest.json``. Returns the manifest (None on ranks other than 0 under torchrun,
    where every rank scores its shard of the training set and rank 0 writes)."""
    with process_group():
        return _run_influence(job)


def _run_influence(job: InfluenceJob) -> Optional[Dict[str, Any]]:
    t_start = time.perf_counter()
    run = _set_up(job)
    run.timings["scan_s"] = time.perf_counter() - t_start
    hashes = [file_sha256(Path(c.source)) for c in run.setup.checkpoints]  # read once: resume key and manifest
    if rank_and_world()[0] != 0:  # ranks other than 0 score their shard; rank 0 holds the folder and writes
        _score(run, hashes)
        return None
    with run.out:
        result = _score(run, hashes)
        run.timings["influence_s"] = time.perf_counter() - t_start - run.timings["scan_s"]
        predictions = _predict(run)
        run.timings["predictions_s"] = time.perf_counter() - t_start - run.timings["scan_s"] - run.timings["influence_s"]
        run.accuracy = _accuracy(run, predictions)
        tables = _scored(run, predictions)
        _write_top_k(run, result, tables)
        if result.self_influence is not None:
            _write_self_influence(run, result.self_influence.numpy(), tables["train"])
        run.timings["total_s"] = time.perf_counter() - t_start
        manifest = _write_manifest(run, result, hashes)
    reset(run.out.progress)  # only now: a failure before this resumes with nothing left to score
    return manifest


def _set_up(job: InfluenceJob) -> _Run:
    """Scan the folders, draw the subsets, build the scorer and say what it scores; begin the results folder."""
    rank, world = rank_and_world()
    _check_folders(job)
    setup = image_setup(job.data_dir, job.checkpoint_dir, job.trust_checkpoint, job.own)
    final = predictions.prediction_model(setup, job.checkpoint_dir, job.trust_checkpoint, job.own)
    seed = job.scoring.seed
    train_idx = seeded_subset(len(setup.train), job.train_subset, seed, "train", "images")
    test_idx = seeded_subset(len(setup.test), job.test_subset, seed + 1, "test", "images")
    if job.top_k > len(train_idx):
        raise TracInError(f"--top_k {job.top_k} is larger than the training set ({len(train_idx)} images); use --top_k {len(train_idx)} or less.")
    config = job.scoring.replace(progress=job.scoring.progress and rank == 0)
    tr = TracIn(setup.model, setup.checkpoints, device=job.device, config=config)
    if config.progress:
        print(_scope_line(tr, world), file=sys.stderr)
    progress = Path(job.output_dir) / names.PROGRESS
    if job.overwrite:
        reset(progress / f"rank{rank}" if world > 1 else progress)
    out = ResultsDir(Path(job.output_dir), keep_partial=progress.exists())
    return _Run(job, setup, train_idx, test_idx, tr, out, final)


def _check_folders(job: InfluenceJob) -> None:
    """Refuse an output folder that is a file, or that lies inside the data folder (its images would be read
    back as data)."""
    out, data = Path(job.output_dir), Path(job.data_dir)
    if out.exists() and not out.is_dir():
        raise TracInError(f"--output_dir {out} is a file; give a folder (new or holding tracin results).")
    if data.is_dir() and out.resolve().is_relative_to(data.resolve()):
        raise TracInError(f"--output_dir {out} is inside --data_dir {data}, where its images would be read as data on the "
                          "next run; choose a folder outside it.")


def _accuracy(run: _Run, predictions: Dict[str, Any]) -> Dict[str, float]:
    """The final model's accuracy on the scored images of each split; a warning when the test accuracy is near chance,
    which for a model that trained well means the images are not prepared as in its training."""
    s = run.setup
    accuracy = {}
    for split, idx, folder in (("train", run.train_idx, s.train_split), ("test", run.test_idx, s.test_split)):
        labels = np.asarray([folder.labels[i] for i in idx.tolist()])
        accuracy[split] = float((np.asarray(predictions[split][0]) == labels).mean()) if len(labels) else float("nan")
    chance = 1 / max(1, len(s.class_names))
    if len(s.class_names) > 1 and accuracy["test"] <= 1.5 * chance:
        fix = ("--image_size, --mean and --std must match how the model was trained" if run.job.own is not None
               else "the model may not have trained")
        warnings.warn(f"The final model gets {accuracy['test']:.0%} of the scored test images right, near chance "
                      f"({chance:.0%}); {fix}. The scores and the report describe the model as it runs here.", stacklevel=2)
    return accuracy


def _scope_line(tr: TracIn, world: int) -> str:
    """'Scoring N layers (names), P parameters in scope, ...' for the progress output."""
    c = tr.config
    names = ", ".join(r["name"] + ("" if r["whole"] else f" ({', '.join(r['parameters'])} only)") for r in tr.scope()[:6]) \
        + (" ..." if len(tr.handlers) > 6 else "")
    return (f"Scoring {len(tr.handlers)} layer{'s' if len(tr.handlers) > 1 else ''} ({names}), {tr.num_parameters:,} parameters in scope"
            + (f", projected to ~{c.projection_dim} dims per layer ({c.projection})" if c.projection_dim else "")
            + (_kfac_words(tr) if tr.preconditioner is not None else ", plain TracIn (no preconditioner)")
            + (f", {c.sample_rate:.0%} of the training set" if c.sample_rate else "")
            + (f", {world} processes" if world > 1 else "") + ".")


def _kfac_words(tr: TracIn) -> str:
    """', K-FAC preconditioned (damping d)' and the requested layers it leaves out, for the scope line."""
    assert tr.preconditioner is not None
    left = tr.preconditioner.left_out
    return (f", K-FAC preconditioned (damping {tr.config.damping:g})"
            + (f"; left out: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''} (layers K-FAC does not cover; "
               "--precondition none scores them)" if left else ""))


def _score(run: _Run, hashes: List[str]) -> InfluenceResult:
    """Top-k (and self-influence) of the subsets, resumable: keyed by the job, the checkpoints' hashes and the images."""
    job, split = run.job, run.setup
    if job.index_dir is not None:
        check_index_source(job.index_dir, split.train_split.paths)
        return run.tr.query(job.index_dir, run.test_set, top_k=job.top_k, self_influence=job.self_influence,
                            ann_probes=job.ann_probes)
    images = images_digest(split.train_split.paths + split.test_split.paths)
    volatile = ("progress", "num_workers", "overwrite", "device", "memory_budget")
    key = {"parameters": {k: str(v) for k, v in job_parameters(job).items() if k not in volatile},
           "checkpoints": hashes, "images": images}
    same = job.self_influence and job.self_influence_layers == "same"
    result = run.tr.influence(run.train_set, run.test_set, top_k=job.top_k, self_influence=same,
                              matrix_path=run.out.file(names.MATRIX_NPY) if job.full_matrix else None,
                              resume_dir=run.out.progress, resume_key=key, keep_progress=True)
    if run.tr.config.progress and result.stats.get("resumed_from_tile"):
        print(f"Resumed an interrupted run after {result.stats['resumed_from_tile']} committed tiles.", file=sys.stderr)
    if job.self_influence and not same:
        result.self_influence = _detector(run).self_influence(run.train_set)
    return result


def _detector(run: _Run) -> TracIn:
    """The self-influence scorer of ``--self_influence_layers output_bias``: K-FAC over the output layer's bias (the
    last layer's parameters when it has no bias), unprojected and unnormalised, on the run's checkpoints."""
    config = run.tr.config.replace(layers="output_bias", precondition="kfac", projection_dim=None, normalize="none", exclude=())
    try:
        return TracIn(run.setup.model, run.setup.checkpoints, device=run.job.device, config=config)
    except TracInError:  # no trainable bias on the output layer
        return TracIn(run.setup.model, run.setup.checkpoints, device=run.job.device, config=config.replace(layers="last"))


def _predict(run: _Run) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The final model's (predicted class, confidence) on each scored subset; a query takes the training images' from
    its index when the index holds them for the same model, images and preprocessing."""
    tr = run.tr
    run.setup.model.load_state_dict(weights_for(run.setup.model, run.final))
    out = {}
    if run.job.index_dir is not None:
        kept = predictions.load(run.job.index_dir, predictions.prediction_key(run.final, run.setup), run.train_idx)
        if kept is not None:
            out["train"] = kept
    for split, dataset in (("train", run.train_set), ("test", run.test_set)):
        if split not in out:
            probs = predict_proba(run.setup.model, dataset, tr.device, tr.config.batch_size, tr.config.num_workers)
            conf, pred = probs.max(1)
            out[split] = (pred.numpy(), conf.numpy())
    return out


def _scored(run: _Run, predictions: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Scored]:
    """The scored images of each split as the result tables name them."""
    s = run.setup
    classes = output_names(s.class_names, predictions)
    tables = {}
    for split, idx, folder in (("train", run.train_idx, s.train_split), ("test", run.test_idx, s.test_split)):
        pred, conf = predictions[split]
        labels = [folder.labels[i] for i in idx.tolist()]
        tables[split] = Scored(idx, [str(folder.paths[i]) for i in idx.tolist()], [classes[c] for c in labels],
                               [classes[int(p)] for p in pred], conf, np.asarray(labels) == np.asarray(pred))
    return tables


def _write_top_k(run: _Run, result: InfluenceResult, tables: Dict[str, Scored]) -> None:
    """The top-k arrays and tables, both prediction tables, and with --full_matrix the scores' CSV."""
    write_top_k(run.out, result, tables["train"], tables["test"])
    if run.job.full_matrix:
        run.out.adopt(names.MATRIX_NPY)
        _write_scores_csv(run.out, run.test_idx, run.train_idx)


def output_names(class_names: List[str], predictions: Dict[str, Any]) -> List[str]:
    """A name for every output the model predicted: the class folders', then ``output N`` for outputs beyond them
    (a model built with more outputs than there are class folders)."""
    top = max((int(np.max(p)) for p, _ in predictions.values() if len(p)), default=-1)
    return list(class_names) + [f"output {i}" for i in range(len(class_names), top + 1)]


SCORES_CSV_LIMIT = 5_000_000  # rows of influence_scores.csv; a larger matrix stays in influence_matrix.npy only


def _write_scores_csv(out: ResultsDir, test_idx: np.ndarray, train_idx: np.ndarray) -> None:
    """influence_scores.csv, one row per (test image, scored training image), read from the memory-mapped matrix
    row by row; skipped (with a warning) past SCORES_CSV_LIMIT rows, where the .npy is the usable form."""
    matrix = np.load(out.file(names.MATRIX_NPY), mmap_mode="r")  # [n_test, n_train]: rows follow test_idx, columns train_idx
    if len(test_idx) * len(train_idx) > SCORES_CSV_LIMIT:
        warnings.warn(f"influence_scores.csv would have {len(test_idx) * len(train_idx):,} rows; the scores are in "
                      f"{names.MATRIX_NPY} only.", stacklevel=2)
        return

    def rows() -> Iterator[Dict[str, Any]]:
        for r, t in enumerate(test_idx.tolist()):
            line = matrix[r]
            for position, j in enumerate(train_idx.tolist()):
                yield {"test_index": t, "train_index": j, "score": float(line[position])}

    out.csv(names.SCORES_CSV, rows(), ["test_index", "train_index", "score"])


def _write_self_influence(run: _Run, s: np.ndarray, train: Scored) -> None:
    """``self_influence.npy`` and ``.csv`` (ranked; with --summed_loss also each image's loss summed over the checkpoints)."""
    setup, extra = run.setup, {}
    if run.job.summed_loss:
        tr = run.tr
        labels = [setup.train_split.labels[i] for i in run.train_idx]
        loss_total = sum(label_losses(p, labels) for p in checkpoint_probabilities(
            setup.model, setup.checkpoints, run.train_set, tr.device, tr.config.batch_size, tr.config.num_workers))
        run.out.npy(names.SUMMED_LOSS, loss_total)
        extra = {"summed_loss": loss_total, "summed_loss_rank": descending_ranks(np.where(np.isfinite(s), loss_total, np.nan))[1]}
    write_self_influence(run.out, s, train, extra)


def _write_manifest(run: _Run, result: InfluenceResult, hashes: List[str]) -> Dict[str, Any]:
    s = run.setup
    data = {"data_dir": str(Path(run.job.data_dir).resolve()), "class_names": s.class_names, "arch": s.arch,
            "image_size": s.image_size, "n_train_total": len(s.train), "n_test_total": len(s.test),
            "n_train": len(run.train_idx), "n_test": len(run.test_idx), "accuracy": run.accuracy,
            "skipped_files": [{"file": f, "reason": r} for f, r in s.train_split.skipped + s.test_split.skipped]}
    final = run.final
    final_hash = hashes[-1] if final is s.checkpoints[-1] else file_sha256(Path(final.source))
    extra = {"prediction_model": {"file": str(Path(final.source).resolve()), "sha256": final_hash}, "world_size": rank_and_world()[1]}
    return run.out.finish("influence", run.tr, RunRecord(job_parameters(run.job), data, run.timings, result.stats, hashes, extra))


def check_index_source(index_dir: Path, train_paths: List[Path]) -> None:
    """Refuse an index whose rows are not exactly these training images, in this order (its indices would name
    other files)."""
    parts = GradientIndex.load(index_dir).meta.parts
    try:
        source = json.loads(parts[0]["source"]) if len(parts) == 1 and parts[0].get("source") else {}
    except ValueError:  # a note that is not the one this job writes
        source = {}
    source = source if isinstance(source, dict) else {}
    if source.get("images") != images_digest(train_paths):
        raise TracInError(f"The gradient index in {index_dir} was not built from these {len(train_paths)} training images "
                          f"(built from {source.get('data_dir', 'other data')}, or since changed); rebuild it with "
                          "tracin index build --data_dir pointing at this folder.")
