"""``tracin demo``: the whole image workflow on scikit-learn's digits with injected label noise."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from .analysis.report import build_report
from .data.digits import write_digits_folder
from .device import resolve_device
from .errors import TracInError
from .image_influence import InfluenceJob, run_influence
from .outputs import write_json
from .train import train_image_classifier

DEMO_TRAINING = {"arch": "smallcnn", "epochs": 12, "save_every": 2, "learning_rate": 0.02, "batch_size": 32, "image_size": 16}


def recall_at(ranking_files, flipped: set, fractions=(0.05, 0.10, 0.15, 0.20, 0.30)) -> Dict[str, float]:
    """Share of flipped files among the first ``fraction`` of the ranking, for each fraction."""
    n = len(ranking_files)
    return {f"{int(round(f * 100))}%": len(flipped & set(ranking_files[: int(round(f * n))])) / max(1, len(flipped)) for f in fractions}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` (Mann-Whitney U, ties averaged)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def run_demo(output_dir: Path, noise_rate: float = 0.1, seed: int = 0, device: str = "auto", progress: bool = True,
             epochs: Optional[int] = None) -> Dict[str, Any]:
    if not 0 <= noise_rate < 0.9:
        raise TracInError(f"--noise_rate must be in [0, 0.9), got {noise_rate}.")
    start = time.perf_counter()
    out = Path(output_dir)
    data_dir, ckpt_dir, results = out / "data", out / "checkpoints", out / "results"
    for folder in (data_dir, ckpt_dir):
        if folder.exists() and any(folder.iterdir()):
            raise TracInError(f"{folder} is not empty; give --output_dir a new or empty folder.")
    records = write_digits_folder(data_dir, noise_rate=noise_rate, seed=seed)
    settings = dict(DEMO_TRAINING, epochs=epochs or DEMO_TRAINING["epochs"])
    summary = train_image_classifier(data_dir, checkpoint_dir=ckpt_dir, seed=seed, device=resolve_device(device),
                                     progress=progress, **settings)
    manifest = run_influence(InfluenceJob(data_dir, ckpt_dir, results, top_k=10, batch_size=256, layers="all",
                                          self_influence=True, device=device, seed=seed, progress=progress))
    report = build_report(results)
    with open(results / "self_influence.csv", newline="") as f:
        ranked = [Path(r["train_file"]).name for r in sorted(csv.DictReader(f), key=lambda r: int(r["rank"]))]
    flipped = {Path(str(r["file"])).name for r in records}
    scores = np.array([-k for k in range(len(ranked))], dtype=float)  # rank order as score
    metrics = {
        "noise_rate": noise_rate, "seed": seed, "n_train": len(ranked), "n_flipped": len(flipped),
        "recall_at_inspected": recall_at(ranked, flipped),
        "roc_auc": roc_auc(scores, np.array([name in flipped for name in ranked])),
        "best_test_accuracy": summary.best_test_accuracy, "health_score": report["health_score"],
        "seconds": time.perf_counter() - start, "report": str(results / "report.html"),
        "engine_seconds": manifest["timings"]["influence_s"],
    }
    write_json(out / "mislabel_metrics.json", metrics)
    return metrics
