"""The ``tracin influence`` job for image classifiers trained by ``tracin train``."""
from __future__ import annotations

import hashlib
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from . import __version__
from .api import TracIn
from .checkpoints import Checkpoint
from .data.images import ImageDataset, image_transform, scan_split
from .distributed import init_from_env, rank_and_world
from .errors import CheckpointError, TracInError
from .jobs import descending_ranks
from .outputs import (
    MANIFEST,
    begin_results,
    file_sha256,
    write_csv,
    write_json,
    write_npy,
)
from .resume import reset
from .scope import LayerSpec
from .train import CHECKPOINT_PATTERN
from .vision import build_model, checkpoint_metadata, normalization


@dataclass
class InfluenceJob:
    data_dir: Path
    checkpoint_dir: Path
    output_dir: Path
    top_k: int = 100
    batch_size: int = 32
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    layers: LayerSpec = "last"
    self_influence: bool = False
    device: str = "auto"
    seed: int = 0
    memory_budget: Optional[int] = None
    progress: bool = True
    num_workers: int = 0
    projection_dim: Optional[int] = None
    projection_type: str = "gaussian"
    sample_rate: Optional[float] = None
    stratify_by: Optional[str] = None
    trust_checkpoint: bool = False
    full_matrix: bool = False
    overwrite: bool = False
    precision: str = "fp32"
    normalize: str = "none"
    summed_loss: bool = False
    precondition: str = "none"
    damping: float = 0.1


def _subset(n: int, size: Optional[int], seed: int, what: str) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``size`` examples (all when None, or with a
    warning when ``size`` is not smaller than the split's ``n`` images)."""
    if size is not None and size < 1:
        raise TracInError(f"--{what}_subset must be at least 1, got {size}.")
    if size is None or size >= n:
        if size is not None:
            warnings.warn(f"--{what}_subset {size} is not smaller than the {n} {what} images; scoring all of them.",
                          stacklevel=2)
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False))


def predict_proba(model: torch.nn.Module, dataset, device: torch.device, batch_size: int, num_workers: int = 0) -> torch.Tensor:
    """Softmax class probabilities [N, classes] of ``model`` (eval mode) on an (image, label) dataset."""
    model.eval().to(device)
    with torch.no_grad():
        return torch.cat([torch.softmax(model(x.to(device)), dim=1).cpu()
                          for x, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)])


def _predict(model: torch.nn.Module, dataset, device: torch.device, batch_size: int, num_workers: int = 0):
    conf, pred = predict_proba(model, dataset, device, batch_size, num_workers).max(1)
    return pred.numpy(), conf.numpy()


def checkpoint_probabilities(model: torch.nn.Module, checkpoints: List[Checkpoint], dataset, device: torch.device,
                             batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Class probabilities [n, classes] under each checkpoint in turn (the model keeps the last one's weights)."""
    for ck in checkpoints:
        model.load_state_dict(ck.state_dict())
        yield predict_proba(model, dataset, device, batch_size, num_workers)


def label_losses(probs: torch.Tensor, labels: List[int]) -> np.ndarray:
    """Cross-entropy of each example's given label, [n] in float64. Summed over checkpoints it is a
    strong mislabel score (docs/quality.md)."""
    return F.nll_loss(probs.double().clamp_min(1e-300).log(), torch.tensor(labels), reduction="none").numpy()


@dataclass
class ImageSetup:
    """Checkpoints of one `tracin train` run, its metadata, the scanned image folders and a fresh model."""

    checkpoints: List[Checkpoint]
    arch: str
    class_names: List[str]
    image_size: int
    train_split: Any
    test_split: Any
    train: ImageDataset
    test: ImageDataset
    model: torch.nn.Module


def image_setup(data_dir: Path, checkpoint_dir: Path, trust: bool = False) -> ImageSetup:
    """Discover the checkpoints, check they come from one run, scan the folders with its classes."""
    checkpoints = Checkpoint.discover(checkpoint_dir, pattern=CHECKPOINT_PATTERN + ".*", trust=trust)
    arch, class_names, image_size = checkpoint_metadata(checkpoints[-1].metadata, checkpoints[-1].name or "")
    for ck in checkpoints:
        other = checkpoint_metadata(ck.metadata, ck.name or "")
        if other != (arch, class_names, image_size):
            raise CheckpointError(
                f"Checkpoint {ck.name} was trained as {other[0]} on {len(other[1])} classes but {checkpoints[-1].name} as "
                f"{arch} on {len(class_names)}; keep one training run per --checkpoint_dir."
            )
    train_split, _ = scan_split(Path(data_dir), "train", class_names)
    test_split, _ = scan_split(Path(data_dir), "test", class_names)
    transform = image_transform(image_size, normalization(arch))
    return ImageSetup(checkpoints, arch, class_names, image_size, train_split, test_split,
                      ImageDataset(train_split, transform), ImageDataset(test_split, transform),
                      build_model(arch, len(class_names)))


def run_influence(job: InfluenceJob) -> Optional[Dict[str, Any]]:
    """Score top-k proponents/opponents (and optionally self-influence); write the result files
    and, last, ``manifest.json``. Returns the manifest (None on ranks other than 0 under torchrun,
    where every rank scores its shard of the training set and rank 0 writes)."""
    started = init_from_env()
    finished = False
    try:
        manifest = _run_influence(job)
        finished = True
        return manifest
    finally:
        if started:
            import torch.distributed as dist

            if finished:  # no rank tears its connections down while rank 0 still writes
                dist.barrier()
            dist.destroy_process_group()


def _run_influence(job: InfluenceJob) -> Optional[Dict[str, Any]]:
    t_start = time.perf_counter()
    rank, world = rank_and_world()
    setup = image_setup(job.data_dir, job.checkpoint_dir, job.trust_checkpoint)
    checkpoints, arch, class_names, image_size = setup.checkpoints, setup.arch, setup.class_names, setup.image_size
    train_split, test_split, train_full, test_full = setup.train_split, setup.test_split, setup.train, setup.test
    data_dir = Path(job.data_dir)
    t_scan = time.perf_counter()
    train_idx = _subset(len(train_full), job.train_subset, job.seed, "train")
    test_idx = _subset(len(test_full), job.test_subset, job.seed + 1, "test")
    train_set, test_set = Subset(train_full, train_idx.tolist()), Subset(test_full, test_idx.tolist())
    if job.top_k > len(train_set):
        raise TracInError(f"--top_k {job.top_k} is larger than the training set ({len(train_set)} images); use --top_k {len(train_set)} or less.")

    model = setup.model
    tr = TracIn(model, checkpoints, layers=job.layers, device=job.device, batch_size=job.batch_size,
                memory_budget=job.memory_budget, progress=job.progress and rank == 0, num_workers=job.num_workers,
                projection_dim=job.projection_dim, projection=job.projection_type, seed=job.seed,
                sample_rate=job.sample_rate, stratify_by=job.stratify_by, precision=job.precision, normalize=job.normalize,
                precondition=job.precondition, damping=job.damping)
    if job.progress and rank == 0:
        names = ", ".join(r["name"] + ("" if r["whole"] else f" ({', '.join(r['parameters'])} only)") for r in tr.scope()[:6]) \
            + (" ..." if len(tr.handlers) > 6 else "")
        print(f"Scoring {len(tr.handlers)} layer{'s' if len(tr.handlers) > 1 else ''} ({names}), {tr.num_parameters:,} parameters in scope"
              + (f", projected to ~{job.projection_dim} dims per layer ({job.projection_type})" if job.projection_dim else "")
              + (f", K-FAC preconditioned (damping {job.damping:g})" if job.precondition == "kfac" else "")
              + (f", {job.sample_rate:.0%} of the training set" if job.sample_rate else "")
              + (f", {world} processes" if world > 1 else "") + ".", file=sys.stderr)
    if rank == 0:
        begin_results(job.output_dir)
    progress_dir = Path(job.output_dir) / ".progress"
    if job.overwrite:
        reset(progress_dir / f"rank{rank}" if world > 1 else progress_dir)
    checkpoint_hashes = [file_sha256(Path(c.source)) for c in checkpoints]  # read once: resume key and manifest
    inputs = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in train_split.paths + test_split.paths).encode())
    key = {"parameters": {k: str(v) for k, v in vars(job).items() if k not in ("progress", "num_workers", "overwrite", "device")},
           "checkpoints": checkpoint_hashes, "images": inputs.hexdigest()}
    result = tr.influence(train_set, test_set, top_k=job.top_k, self_influence=job.self_influence,
                          matrix_path=Path(job.output_dir) / "influence_matrix.npy" if job.full_matrix else None,
                          resume_dir=progress_dir, resume_key=key)
    if job.progress and rank == 0 and result.stats.get("resumed_from_tile"):
        print(f"Resumed an interrupted run after {result.stats['resumed_from_tile']} committed tiles.", file=sys.stderr)
    t_influence = time.perf_counter()
    if rank != 0:
        return None

    # Predictions of the final model (best_model.pt when training wrote one, else the last checkpoint).
    best = Path(job.checkpoint_dir) / "best_model.pt"
    final = Checkpoint(best, trust=job.trust_checkpoint) if best.is_file() else checkpoints[-1]
    model.load_state_dict(final.state_dict())
    train_pred, train_conf = _predict(model, train_set, tr.device, job.batch_size, job.num_workers)
    test_pred, test_conf = _predict(model, test_set, tr.device, job.batch_size, job.num_workers)
    t_pred = time.perf_counter()

    out = Path(job.output_dir)
    to_full = lambda idx: train_idx[idx.numpy()]  # noqa: E731 - positions in the scored subset -> full train set
    pro_i, opp_i = to_full(result.proponents.indices), to_full(result.opponents.indices)
    pro_v, opp_v = result.proponents.values.numpy(), result.opponents.values.numpy()
    written = [
        write_npy(out / "top_k_influences_values.npy", pro_v),
        write_npy(out / "top_k_influences_indices.npy", pro_i),
        write_npy(out / "top_k_opponents_values.npy", opp_v),
        write_npy(out / "top_k_opponents_indices.npy", opp_i),
        write_npy(out / "test_indices.npy", test_idx),
        write_npy(out / "train_indices.npy", train_idx),
    ] + ([out / "influence_matrix.npy"] if job.full_matrix else [])
    train_paths, test_paths = train_split.paths, test_split.paths
    train_labels, test_labels = train_split.labels, test_split.labels
    pred_of_train = dict(zip(train_idx.tolist(), train_pred.tolist()))

    def rows():
        for row, t in enumerate(test_idx.tolist()):
            for kind, vals, idxs in (("proponent", pro_v, pro_i), ("opponent", opp_v, opp_i)):
                for rank in range(vals.shape[1]):
                    j = int(idxs[row, rank])
                    yield {"test_index": t, "test_file": str(test_paths[t]), "test_label": class_names[test_labels[t]],
                           "test_predicted": class_names[int(test_pred[row])], "kind": kind, "rank": rank + 1,
                           "train_index": j, "train_file": str(train_paths[j]), "train_label": class_names[train_labels[j]],
                           "train_predicted": class_names[pred_of_train[j]], "score": float(vals[row, rank])}

    written.append(write_csv(out / "top_k_influences.csv", rows(),
                             ["test_index", "test_file", "test_label", "test_predicted", "kind", "rank", "train_index",
                              "train_file", "train_label", "train_predicted", "score"]))
    for name, idx, paths, labels, pred, conf in (("train", train_idx, train_paths, train_labels, train_pred, train_conf),
                                                 ("test", test_idx, test_paths, test_labels, test_pred, test_conf)):
        written.append(write_csv(out / f"predictions_{name}.csv", (
            {"index": int(i), "file": str(paths[i]), "label": class_names[labels[i]], "predicted": class_names[int(p)],
             "confidence": float(c), "correct": int(labels[i] == int(p))}
            for i, p, c in zip(idx.tolist(), pred, conf)), ["index", "file", "label", "predicted", "confidence", "correct"]))
    if result.self_influence is not None:
        s = result.self_influence.numpy()
        order, rank_of = descending_ranks(s)  # sampled examples only
        written.append(write_npy(out / "self_influence.npy", s))
        extra: Dict[str, np.ndarray] = {}
        if job.summed_loss:
            labels = [train_labels[i] for i in train_idx]
            loss_total = sum(label_losses(p, labels) for p in checkpoint_probabilities(
                model, checkpoints, train_set, tr.device, job.batch_size, job.num_workers))
            written.append(write_npy(out / "summed_loss.npy", loss_total))
            extra = {"summed_loss": loss_total, "summed_loss_rank": descending_ranks(np.where(np.isfinite(s), loss_total, np.nan))[1]}  # among the scored rows
        written.append(write_csv(out / "self_influence.csv", (
            {"train_index": int(train_idx[p]), "train_file": str(train_paths[train_idx[p]]),
             "label": class_names[train_labels[train_idx[p]]], "predicted": class_names[int(train_pred[p])],
             "score": float(s[p]), "rank": int(rank_of[p]), **{k: v[p].item() for k, v in extra.items()}} for p in order),
            ["train_index", "train_file", "label", "predicted", "score", "rank"] + list(extra)))

    import torchvision

    manifest = {
        "tool": "tracin", "command": "influence", "complete": True, "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(job).items()},
        "data": {"data_dir": str(data_dir.resolve()), "class_names": class_names, "arch": arch, "image_size": image_size,
                 "n_train_total": len(train_full), "n_test_total": len(test_full), "n_train": len(train_idx),
                 "n_test": len(test_idx), "skipped_files": [{"file": f, "reason": r} for f, r in train_split.skipped + test_split.skipped]},
        "checkpoints": [{"file": str(ck.source), "sha256": digest, "learning_rate": ck.learning_rate,
                         "epoch": ck.epoch} for ck, digest in zip(checkpoints, checkpoint_hashes)],
        "prediction_model": {"file": str(final.source), "sha256": checkpoint_hashes[-1] if final is checkpoints[-1]
                             else file_sha256(Path(final.source))},
        "scope": tr.scope(), "num_parameters": tr.num_parameters,
        "precondition": tr.preconditioner.describe() if tr.preconditioner is not None else None, "device": str(tr.device), "world_size": world,
        "engine": {k: v for k, v in result.stats.items() if k != "layer_modes"},
        "timings": {"scan_s": t_scan - t_start, "influence_s": t_influence - t_scan, "predictions_s": t_pred - t_influence,
                    "total_s": time.perf_counter() - t_start},
        "versions": {"tracin": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "outputs": sorted(p.name for p in written),
    }
    write_json(out / MANIFEST, manifest)
    return manifest
