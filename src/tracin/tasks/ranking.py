"""Pairwise ranking models: pair files, the ranking task (margin or GHM loss), a small scorer.

A training example is a pair ``(x1, x2, target)`` with ``target`` in {-1, 1}: 1 means x1 should
score higher than x2. The model maps a batch of feature vectors [B, d] to scores [B] (or [B, 1]);
the task calls it once per side, so each layer sees two calls per batch and the per-example
gradient is the sum of both sides' contributions (exact under the ghost kernels).

Losses (per pair, never reduced):
  standard: MarginRankingLoss, ``max(0, -target * (s1 - s2) + margin)``.
  ghm:      a gradient-harmonised (GHM-C) logistic ranking loss, ``w(g) * BCE(s1 - s2, (target + 1) / 2)``
            with ``g = |sigmoid(s1 - s2) - (target + 1) / 2|`` the gradient norm of the logistic loss.
            ``w`` comes from a histogram of ``g`` over the *training* pairs in ``bins`` equal bins on
            [0, 1]: ``w = (N / (count(bin of g) * non-empty bins)) ** alpha`` (alpha = 1 is GHM-C,
            alpha = 0 the plain logistic loss). The histogram is computed once per checkpoint, when its
            weights are loaded, and then frozen: ``w`` is a constant, so every pair's loss, and hence its
            gradient, is well defined and does not depend on which pairs share its batch. Training with
            a running (momentum) histogram is approximated by the histogram at the checkpoint.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoints import Checkpoint, save_checkpoint
from ..errors import CheckpointError, DataError
from ..io import csv_value, write_csv
from .base import Batch, Task


class PairData(Dataset):
    """Pairs of feature vectors. Items are ``(x1 [d], x2 [d], target, pair_id)``; ``pair_id`` is
    ``"<id1>_<id2>"``, the key of the JSON outputs."""

    def __init__(self, x1: torch.Tensor, x2: torch.Tensor, target: torch.Tensor,
                 id1: Optional[Sequence[str]] = None, id2: Optional[Sequence[str]] = None, origin: str = "pairs"):
        n = x1.shape[0]
        if n == 0:
            raise DataError(f"{origin} holds no pairs; give at least one row.")
        if x1.shape != x2.shape or x1.dim() != 2:
            raise DataError(f"{origin}: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} must both be [pairs, features] of one shape.")
        if target.shape != (n,):
            raise DataError(f"{origin}: {target.numel()} targets for {n} pairs; give one target per pair.")
        bad = sorted(set(target.tolist()) - {-1.0, 1.0})
        if bad:
            raise DataError(f"{origin}: target {bad[0]:g} is not -1 or 1; 1 means the first item should rank higher.")
        if not (torch.isfinite(x1).all() and torch.isfinite(x2).all()):
            raise DataError(f"{origin} has NaN or infinite features; clean or impute them first.")
        self.x1, self.x2, self.target = x1.float(), x2.float(), target.float()
        self.id1 = [str(i) for i in (id1 if id1 is not None else range(n))]
        self.id2 = [str(i) for i in (id2 if id2 is not None else range(n, 2 * n))]
        self.pair_ids = [f"{a}_{b}" for a, b in zip(self.id1, self.id2)]

    def __len__(self) -> int:
        return self.x1.shape[0]

    def __getitem__(self, i: int):
        return self.x1[i], self.x2[i], self.target[i], self.pair_ids[i]

    @property
    def num_features(self) -> int:
        return self.x1.shape[1]


def read_pairs(path: Path) -> PairData:
    """Read pairs from ``.npz`` (arrays ``x1``, ``x2`` [n, d], ``target`` [n], optional ``id1``, ``id2``)
    or ``.csv`` (header ``id1,id2,target,x1_0..x1_{d-1},x2_0..x2_{d-1}``; the id columns are optional)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Pair file {path} does not exist; check the path.")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise DataError(f"Pair file {path} is not a readable .npz ({type(exc).__name__}); re-save it with numpy.savez.") from exc
        missing = [k for k in ("x1", "x2", "target") if k not in arrays]
        if missing:
            raise DataError(f"Pair file {path} lacks the array(s) {', '.join(missing)}; it needs x1, x2 and target.")
        try:
            x1, x2 = (torch.as_tensor(arrays[k].astype(np.float32)) for k in ("x1", "x2"))
            target = torch.as_tensor(arrays["target"].astype(np.float32)).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise DataError(f"Pair file {path} has non-numeric x1, x2 or target arrays; store numbers.") from exc
        return PairData(x1, x2, target, arrays.get("id1"), arrays.get("id2"), origin=f"Pair file {path}")
    if path.suffix == ".csv":
        return _read_pair_csv(path)
    raise DataError(f"Pair file {path} is neither .csv nor .npz; see the README for the two formats.")


def _read_pair_csv(path: Path) -> PairData:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"Pair file {path} is empty; it needs a header row and one row per pair.")
    header = rows[0]
    x1_cols = [i for i, h in enumerate(header) if h.startswith("x1_")]
    x2_cols = [i for i, h in enumerate(header) if h.startswith("x2_")]
    if "target" not in header or not x1_cols or len(x1_cols) != len(x2_cols):
        raise DataError(f"Pair file {path} needs a header with target and as many x1_* as x2_* feature columns "
                        f"(got {', '.join(header[:6])}{', ...' if len(header) > 6 else ''}).")
    t_col = header.index("target")
    id_cols = [header.index(h) if h in header else None for h in ("id1", "id2")]
    x1, x2, target, ids = [], [], [], ([], [])
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"Pair file {path} line {line} has {len(row)} fields, the header {len(header)}; fix that row.")
        try:
            x1.append([float(row[i]) for i in x1_cols])
            x2.append([float(row[i]) for i in x2_cols])
            target.append(float(row[t_col]))
        except ValueError:
            raise DataError(f"Pair file {path} line {line} has a non-numeric feature or target; fix that row.") from None
        for k, col in enumerate(id_cols):
            if col is not None:
                ids[k].append(csv_value(row[col]))  # as write_pairs_csv wrote it
    n = len(target)
    if n == 0:
        raise DataError(f"Pair file {path} holds no pairs; give at least one row after the header.")
    return PairData(torch.tensor(x1), torch.tensor(x2), torch.tensor(target),
                    ids[0] if id_cols[0] is not None else None, ids[1] if id_cols[1] is not None else None,
                    origin=f"Pair file {path}")


def write_pairs_csv(path: Path, pairs: PairData) -> Path:
    """Write ``pairs`` in the CSV format :func:`read_pairs` reads."""
    d = pairs.num_features
    fields = ["id1", "id2", "target"] + [f"x1_{j}" for j in range(d)] + [f"x2_{j}" for j in range(d)]
    rows = (dict(zip(fields, [pairs.id1[i], pairs.id2[i], int(pairs.target[i])] + pairs.x1[i].tolist() + pairs.x2[i].tolist()))
            for i in range(len(pairs)))
    return write_csv(Path(path), rows, fields)


def ranking_mlp(in_features: int, hidden: Sequence[int] = (32,)) -> nn.Module:
    """A scorer [B, in_features] -> [B, 1]: Linear layers with ReLU between them."""
    layers: List[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _side_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    s = model(x)
    if s.dim() == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.shape != (x.shape[0],):
        raise DataError(f"A ranking model must give one score per item ([B] or [B, 1]); this one gave {tuple(s.shape)}.")
    return s


class RankingTask(Task):
    """Per-pair ranking loss of a scorer; batches are ``(x1, x2, target, pair_ids)``.

    Args:
        loss_type: ``"standard"`` (MarginRankingLoss) or ``"ghm"`` (see the module docstring).
        margin: the margin of MarginRankingLoss.
        ghm_bins, ghm_alpha: GHM histogram bins and weight exponent.
        train: the training pairs (needed for ``"ghm"``: its histogram is taken over them).
        batch_size: batch size of the histogram pass.
    """

    def __init__(self, loss_type: str = "standard", margin: float = 0.0, ghm_bins: int = 10, ghm_alpha: float = 1.0,
                 train: Optional[Dataset] = None, batch_size: int = 256):
        if loss_type not in ("standard", "ghm"):
            raise DataError(f"loss_type must be 'standard' or 'ghm', got {loss_type!r}.")
        if loss_type == "ghm" and (train is None or ghm_bins < 1):
            raise DataError("The GHM loss needs the training pairs (train=...) and ghm_bins >= 1 for its histogram.")
        self.loss_type, self.margin, self.bins, self.alpha = loss_type, margin, ghm_bins, ghm_alpha
        self.train, self.stats_batch_size = train, batch_size
        self.bin_weights: Dict[Tuple[int, float], torch.Tensor] = {}  # (checkpoint index, weight fingerprint) -> [bins]
        self._current: Optional[Tuple[int, float]] = None

    def scores(self, model: nn.Module, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        return _side_scores(model, batch[0]), _side_scores(model, batch[1])

    def _bin(self, g: torch.Tensor) -> torch.Tensor:
        return (g * self.bins).long().clamp_(0, self.bins - 1)

    def _grad_norm(self, s1: torch.Tensor, s2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(s1 - s2) - (target + 1) / 2).abs()

    def on_checkpoint(self, model: nn.Module, index: int) -> None:
        # keyed by the weights too, so a task reused with other checkpoints never sees stale statistics
        key = (index, float(sum(p.detach().double().sum() for p in model.parameters())))
        self._current = key
        if self.loss_type != "ghm" or key in self.bin_weights:
            return
        device = next(model.parameters()).device
        counts = torch.zeros(self.bins, dtype=torch.float64)
        for batch in DataLoader(self.train, batch_size=self.stats_batch_size):
            batch = self.to_device(batch, device)
            g = self._grad_norm(*self.scores(model, batch), batch[2])
            counts += torch.bincount(self._bin(g).cpu(), minlength=self.bins).double()
        total, filled = counts.sum(), (counts > 0).sum()
        weights = torch.where(counts > 0, total / (counts.clamp_min(1) * filled), torch.zeros_like(counts))
        self.bin_weights[key] = weights.pow(self.alpha)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        s1, s2 = self.scores(model, batch)
        target = batch[2].to(s1.dtype)
        if self.loss_type == "standard":
            return F.margin_ranking_loss(s1, s2, target, margin=self.margin, reduction="none")
        if self._current is None or self._current not in self.bin_weights:
            raise DataError("The GHM loss has no histogram for these weights: call task.on_checkpoint(model, index) "
                            "after loading a checkpoint (TracIn does this itself).")
        w = self.bin_weights[self._current].to(s1.device, s1.dtype)[self._bin(self._grad_norm(s1, s2, target).detach())]
        return w * F.binary_cross_entropy_with_logits(s1 - s2, (target + 1) / 2, reduction="none")

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        return batch[2]


ARCH = "ranking_mlp"


@dataclass
class RankingTraining:
    """How :func:`train_ranking` trains: SGD epochs and step size, hidden widths, batch size, seed, and the
    checkpoint file prefix; the loss is that of a :class:`RankingTask`."""

    epochs: int = 5
    learning_rate: float = 0.05
    hidden: Sequence[int] = (32,)
    batch_size: int = 32
    seed: int = 0
    prefix: str = "model_epoch_"
    loss_type: str = "standard"
    margin: float = 0.1
    ghm_bins: int = 10
    ghm_alpha: float = 1.0


LOSS_SETTINGS = {"loss_type": "standard", "margin": 0.0, "ghm_bins": 10, "ghm_alpha": 1.0}  # RankingTask's defaults


def loss_settings(source) -> dict:
    """The loss settings (loss type, margin, GHM bins and exponent) of ``source``, as stored in checkpoints."""
    return {k: getattr(source, k) for k in LOSS_SETTINGS}


def train_ranking(train: PairData, checkpoint_dir: Path, training: Optional[RankingTraining] = None) -> List[Path]:
    """Train :func:`ranking_mlp` with SGD on the task's per-pair loss (mean over the batch), saving
    ``{prefix}{epoch}.pt`` after every epoch with the learning rate, the architecture and the loss settings inside.
    With the GHM loss the histogram is refreshed at the start of each epoch."""
    s = training or RankingTraining()
    epochs, learning_rate, hidden, batch_size, seed, prefix = s.epochs, s.learning_rate, s.hidden, s.batch_size, s.seed, s.prefix
    torch.manual_seed(seed)
    model = ranking_mlp(train.num_features, hidden)
    task = RankingTask(s.loss_type, s.margin, s.ghm_bins, s.ghm_alpha, train=train, batch_size=256)
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
                                     arch=ARCH, in_features=train.num_features, hidden=list(hidden), **loss_settings(s)))
    return paths


def model_from_checkpoint(ck: Checkpoint) -> torch.nn.Module:
    """The scorer a ranking checkpoint describes (``arch``, ``in_features``, ``hidden`` stored inside)."""
    meta = ck.metadata
    if meta.get("arch") != ARCH or "in_features" not in meta:
        raise CheckpointError(f"Checkpoint {ck.name} does not describe a ranking model (no arch='{ARCH}' and in_features inside); "
                              "save it with tracin.tasks.ranking.train_ranking, or use the Python API with your own model.")
    return ranking_mlp(int(meta["in_features"]), [int(h) for h in meta.get("hidden", [])])
