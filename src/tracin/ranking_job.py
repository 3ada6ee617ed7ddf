"""Ranking end to end: train a pair scorer with checkpoints, and the ``tracin ranking`` job."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .api import TracIn
from .checkpoints import Checkpoint, save_checkpoint
from .errors import CheckpointError, TracInError
from .jobs import write_influence, write_manifest, write_self_influence
from .outputs import begin_results
from .ranking import PairData, RankingTask, ranking_mlp, read_pairs

ARCH = "ranking_mlp"


def train_ranking(train: PairData, checkpoint_dir: Path, epochs: int = 5, learning_rate: float = 0.05,
                  hidden: Sequence[int] = (32,), loss_type: str = "standard", margin: float = 0.1,
                  ghm_bins: int = 10, ghm_alpha: float = 1.0, batch_size: int = 32, seed: int = 0,
                  prefix: str = "model_epoch_") -> List[Path]:
    """Train :func:`ranking_mlp` with SGD on the task's per-pair loss (mean over the batch), saving
    ``{prefix}{epoch}.pt`` after every epoch with the learning rate and the architecture inside.
    With the GHM loss the histogram is refreshed at the start of each epoch."""
    torch.manual_seed(seed)
    model = ranking_mlp(train.num_features, hidden)
    task = RankingTask(loss_type, margin, ghm_bins, ghm_alpha, train=train, batch_size=256)
    opt = torch.optim.SGD(model.parameters(), lr=learning_rate)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.eval()
        with torch.no_grad():
            task.on_checkpoint(model, 0)  # the histogram at the epoch's starting weights
        model.train()
        for batch in DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen):
            opt.zero_grad()
            task.loss(model, batch).mean().backward()
            opt.step()
        paths.append(save_checkpoint(checkpoint_dir / f"{prefix}{epoch}.pt", model.state_dict(), learning_rate, epoch=epoch,
                                     arch=ARCH, in_features=train.num_features, hidden=list(hidden), loss_type=loss_type))
    return paths


def model_from_checkpoint(ck: Checkpoint) -> torch.nn.Module:
    """The scorer a ranking checkpoint describes (``arch``, ``in_features``, ``hidden`` stored inside)."""
    meta = ck.metadata
    if meta.get("arch") != ARCH or "in_features" not in meta:
        raise CheckpointError(f"Checkpoint {ck.name} does not describe a ranking model (no arch='{ARCH}' and in_features inside); "
                              "save it with tracin.ranking_job.train_ranking, or use the Python API with your own model.")
    return ranking_mlp(int(meta["in_features"]), [int(h) for h in meta.get("hidden", [])])


@dataclass
class RankingJob:
    pairs_train: Path
    pairs_test: Path
    checkpoint_dir: Path
    output_dir: Path
    checkpoint_prefix: str = "model_epoch_"
    compute_self_influence: bool = False
    compute_influence: bool = False
    num_test_samples: int = 5
    loss_type: str = "standard"
    margin: float = 0.0
    ghm_bins: int = 10
    ghm_alpha: float = 1.0
    layers: Any = "all"
    batch_size: int = 256
    device: str = "auto"
    seed: int = 42
    trust_checkpoint: bool = False
    progress: bool = True


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
    task = RankingTask(job.loss_type, job.margin, job.ghm_bins, job.ghm_alpha, train=train, batch_size=job.batch_size)
    tr = TracIn(model, checkpoints, layers=job.layers, task=task, device=job.device, batch_size=job.batch_size,
                progress=job.progress)
    out = Path(job.output_dir)
    begin_results(out)
    written: List[Path] = []
    data: Dict[str, Any] = {"n_train": len(train)}
    if job.compute_self_influence:
        written += write_self_influence(out, train.pair_ids, tr.self_influence(train).numpy())
    if test is not None:
        rng = np.random.default_rng(job.seed)
        chosen = np.sort(rng.choice(len(test), size=min(job.num_test_samples, len(test)), replace=False))
        matrix = tr.influence_matrix(train, Subset(test, chosen.tolist())).numpy()
        written += write_influence(out, train.pair_ids, [test.pair_ids[i] for i in chosen], matrix)
        data.update(n_test=len(test), test_indices=chosen.tolist())
    return write_manifest(out, "ranking", vars(job), checkpoints, tr.scope(), tr.num_parameters, tr.device,
                          tr.last_stats, written, data, time.perf_counter() - start)
