"""The accuracy audit of fast configurations: speed-up and agreement with the exact scores.

For a sample of test examples, the exact TracIn matrix and each fast configuration's matrix are
computed and compared row by row (each test example's scores over the training set):
speed-up (exact seconds / fast seconds), top-k overlap (|fast top-k ∩ exact top-k| / k, exact top-k
over the whole training set), Spearman and Pearson correlation over the training examples the
configuration scored (sampling leaves the others out).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from ..api import TracIn
from ..config import ScoringConfig
from ..engine.loaders import DataSource, dataset_size, make_loader
from ..errors import TracInError


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def compare(exact: torch.Tensor, approx: torch.Tensor, top: int = 10) -> Dict[str, float]:
    """Mean over test rows of top-k overlap, Spearman and Pearson; NaN columns of ``approx`` are left out."""
    overlaps, spearman, pearson = [], [], []
    for e, a in zip(exact, approx):
        scored = ~torch.isnan(a)
        k = min(top, int(scored.sum()))
        fast_top = set(torch.nonzero(scored).flatten()[a[scored].argsort(descending=True)[:k]].tolist())
        overlaps.append(len(fast_top & set(e.argsort(descending=True)[:top].tolist())) / top)
        spearman.append(_corr(_ranks(e[scored]), _ranks(a[scored])))
        pearson.append(_corr(e[scored], a[scored]))
    return {"top_overlap": float(np.mean(overlaps)), "spearman": float(np.nanmean(spearman)), "pearson": float(np.nanmean(pearson))}


def audit(model: torch.nn.Module, checkpoints: Sequence, train: DataSource, test: DataSource,
          configs: Mapping[str, Mapping[str, Any]], n_test: int = 20, top: int = 10, device: str = "auto",
          **settings: Any) -> List[Dict[str, Any]]:
    """One row per configuration (the exact one first): name, seconds, speed-up, top-k overlap,
    Spearman, Pearson. ``configs`` maps a name to changes of the base settings (e.g.
    ``{"proj1024": {"projection_dim": 1024}}``); the base is ``config=`` (a :class:`ScoringConfig`) or the
    ``settings`` keywords, as :class:`TracIn` takes them, and its seed draws the test sample and seeds every projection."""
    config: Optional[ScoringConfig] = settings.pop("config", None)
    if config is not None and settings:
        raise TracInError("Give audit's base settings either as config= or as keywords, not both.")
    base = config if config is not None else ScoringConfig.from_settings(settings)
    loader = make_loader(test, 1, "test")
    n = dataset_size(loader)
    if n_test < 1:
        raise TracInError(f"n_test must be at least 1, got {n_test}.")
    rows = np.sort(np.random.default_rng(base.seed).choice(n, size=min(n_test, n), replace=False))
    sample = Subset(loader.dataset, rows.tolist())

    def timed(extra: Mapping[str, Any]):
        tr = TracIn(model, checkpoints, device=device, config=base.replace(**extra))
        start = time.perf_counter()
        matrix = tr.influence_matrix(train, sample)
        return matrix, time.perf_counter() - start

    exact, t_exact = timed({})
    out = [{"config": "exact", "seconds": t_exact, "speedup": 1.0, "top_overlap": 1.0, "spearman": 1.0, "pearson": 1.0}]
    for name, extra in configs.items():
        approx, seconds = timed(extra)
        out.append({"config": name, "seconds": seconds, "speedup": t_exact / seconds, **compare(exact, approx, top)})
    return out


def format_table(rows: List[Dict[str, Any]], top: int = 10) -> str:
    lines = [f"{'configuration':<28} {'seconds':>8} {'speed-up':>9} {f'top-{top} overlap':>15} {'Spearman':>9} {'Pearson':>8}"]
    for r in rows:
        lines.append(f"{r['config']:<28} {r['seconds']:>8.2f} {r['speedup']:>8.1f}x {r['top_overlap']:>15.3f} "
                     f"{r['spearman']:>9.3f} {r['pearson']:>8.3f}")
    return "\n".join(lines)
