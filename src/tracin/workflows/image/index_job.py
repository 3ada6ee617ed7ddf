"""``tracin index build`` and ``tracin index query`` for image folders: a gradient index of the training images
built once (:meth:`tracin.TracIn.build_index`), then test images scored against it with the result files of
``tracin influence`` (its job runs with ``index_dir`` set), so ``tracin report`` reads them unchanged."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ...api import TracIn
from ...checkpoints import Checkpoint, weights_for
from ...config import ScoringConfig
from ...engine.distributed import process_group, rank_and_world
from ...engine.index import META, GradientIndex
from ...errors import TracInError
from ...tasks.classification import predict_proba
from . import predictions
from .folders import images_digest
from .setup import ImageSetup, OwnModel, image_setup


@dataclass
class IndexBuildJob:
    """A ``tracin index build`` run: the folders, the storage dtype and the scoring settings the index holds."""

    data_dir: Path
    checkpoint_dir: Optional[Path]
    index_dir: Path
    dtype: str = "float32"
    device: str = "auto"
    trust_checkpoint: bool = False
    own: Optional[OwnModel] = None
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(layers="last", batch_size=32))


def build_image_index(job: IndexBuildJob) -> Optional[Dict[str, Any]]:
    """Build (or finish) the index of ``job.data_dir``'s training images; returns what it holds (None on ranks other
    than 0 under torchrun, where the ranks write different shards)."""
    with process_group():
        return _build(job)


def _build(job: IndexBuildJob) -> Optional[Dict[str, Any]]:
    if Path(job.index_dir).resolve().is_relative_to(Path(job.data_dir).resolve()):
        raise TracInError(f"--index_dir {job.index_dir} is inside --data_dir {job.data_dir}; choose a folder outside it.")
    rank = rank_and_world()[0]
    setup = image_setup(job.data_dir, job.checkpoint_dir, job.trust_checkpoint, job.own)
    config = job.scoring.replace(progress=job.scoring.progress and rank == 0)
    tr = TracIn(setup.model, setup.checkpoints, device=job.device, config=config)
    source = json.dumps({"data_dir": str(Path(job.data_dir).resolve()), "images": images_digest(setup.train_split.paths),
                         "n": len(setup.train)})
    final = predictions.prediction_model(setup, job.checkpoint_dir, job.trust_checkpoint, job.own)
    begin = time.perf_counter()
    tr.build_index(setup.train, job.index_dir, job.dtype, source=source)
    if rank != 0:
        return None
    _keep_predictions(job, setup, tr, final)
    meta = GradientIndex.load(job.index_dir).meta
    return {"rows": meta.n_rows, "shards": len(meta.shards), "dtype": meta.dtype, "seconds": time.perf_counter() - begin, "layers": len(tr.handlers), "checkpoints": len(tr.checkpoints),
            "bytes": sum(f.stat().st_size for f in Path(job.index_dir).glob("shard-*[0-9].npy"))}


def _keep_predictions(job: IndexBuildJob, setup: ImageSetup, tr: TracIn, final: Checkpoint) -> None:
    """Write the final model's predictions on every training image beside the index (what a query's report needs of
    them), unless its weights come from no file."""
    key = predictions.prediction_key(final, setup)
    if key is None:
        return
    setup.model.load_state_dict(weights_for(setup.model, final))
    probabilities = predict_proba(setup.model, setup.train, tr.device, tr.config.batch_size, tr.config.num_workers)
    predictions.save(job.index_dir, key, probabilities)


def index_settings(index_dir: Path) -> ScoringConfig:
    """The scoring settings an index was built with (``index.json``), which its queries must use."""
    index = GradientIndex.load(index_dir)
    try:
        return ScoringConfig.from_settings(index.meta.description["settings"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TracInError(f"{index.directory / META} is not a tracin index description ({exc}); build the index "
                          "again.") from None
