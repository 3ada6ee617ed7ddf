"""The ``tracin ranking`` job: self-influence and influence of training pairs of a pairwise ranking model."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
from torch.utils.data import Subset

from ..api import TracIn
from ..checkpoints import Checkpoint
from ..config import ScoringConfig
from ..errors import TracInError
from .results_dir import pass_stats, ResultsDir, RunRecord, job_parameters
from ..tasks.ranking import LOSS_SETTINGS, RankingTask, model_from_checkpoint, read_pairs

@dataclass
class RankingJob:
    """A ``tracin ranking`` run: pair files, checkpoints, what to compute, the loss, and the scoring settings."""

    pairs_train: Path
    pairs_test: Optional[Path]
    checkpoint_dir: Path
    output_dir: Path
    checkpoint_prefix: str = "model_epoch_"
    compute_self_influence: bool = False
    compute_influence: bool = False
    num_test_samples: int = 5
    loss_type: Optional[str] = None  # None: as stored in the checkpoints (else RankingTask's default)
    margin: Optional[float] = None
    ghm_bins: Optional[int] = None
    ghm_alpha: Optional[float] = None
    device: str = "auto"
    trust_checkpoint: bool = False
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(seed=42))


def _loss_settings(job: RankingJob, checkpoint: Checkpoint) -> Dict[str, Any]:
    """The loss the scores use: each setting as given, else as the checkpoint stores it (what training used), else
    RankingTask's default; a given value that differs from the stored one is warned about (the scores then describe
    another loss than the one trained)."""
    settings = {}
    for key, default in LOSS_SETTINGS.items():
        given, stored = getattr(job, key), checkpoint.metadata.get(key)
        if given is not None and stored is not None and given != stored:
            warnings.warn(f"--{key} {given} differs from the {stored} that {checkpoint.name} was trained with; scoring with "
                          f"{given}.", stacklevel=2)
        settings[key] = given if given is not None else stored if stored is not None else default
    return settings


def run_ranking(job: RankingJob) -> Dict[str, Any]:
    """Self-influence of every training pair and/or the influence of every training pair on a
    seeded sample of test pairs; writes npy/CSV/JSON and, last, ``manifest.json``."""
    if not (job.compute_self_influence or job.compute_influence):
        raise TracInError("Nothing to compute: pass --compute_self_influence, --compute_influence or both.")
    if job.compute_influence and job.num_test_samples < 1:
        raise TracInError(f"--num_test_samples must be at least 1, got {job.num_test_samples}.")
    start = time.perf_counter()
    train = read_pairs(job.pairs_train)
    test = read_pairs(job.pairs_test) if job.compute_influence else None
    checkpoints = Checkpoint.discover(job.checkpoint_dir, pattern=f"{job.checkpoint_prefix}*", trust=job.trust_checkpoint)
    model = model_from_checkpoint(checkpoints[-1])
    width = model[0].in_features
    for name, data in (("training", train), ("test", test)):
        if data is not None and data.num_features != width:
            raise TracInError(f"The {name} pairs have {data.num_features} features but the model takes {width}; "
                              "use the pair files the model was trained on.")
    loss = _loss_settings(job, checkpoints[-1])
    task = RankingTask(loss["loss_type"], loss["margin"], loss["ghm_bins"], loss["ghm_alpha"], train=train,
                       batch_size=job.scoring.batch_size)
    tr = TracIn(model, checkpoints, task=task, device=job.device, config=job.scoring)
    with ResultsDir(Path(job.output_dir)) as out:
        data: Dict[str, Any] = {"n_train": len(train)}
        if job.compute_self_influence:
            out.self_influence_tables(train.pair_ids, tr.self_influence(train).numpy())
        if test is not None:
            rng = np.random.default_rng(job.scoring.seed)
            chosen = np.sort(rng.choice(len(test), size=min(job.num_test_samples, len(test)), replace=False))
            matrix = tr.influence_matrix(train, Subset(test, chosen.tolist())).numpy()
            out.influence_tables(train.pair_ids, [test.pair_ids[i] for i in chosen], matrix)
            data.update(n_test=len(test), test_indices=chosen.tolist())
        record = RunRecord(job_parameters(job), data, {"total_s": time.perf_counter() - start}, pass_stats(tr))
        return out.finish("ranking", tr, record)
