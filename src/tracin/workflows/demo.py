"""``tracin demo``: the whole image workflow on scikit-learn's digits with injected label noise."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from .analysis.report import build_report
from .image.digits import write_digits_folder
from ..device import resolve_device
from .evaluation.common import recall_at, roc_auc
from ..errors import TracInError
from .image.influence import InfluenceJob, run_influence
from ..io import write_json
from ..config import ScoringConfig
from .image.train import ImageTraining, train_image_classifier

DEMO_TRAINING = {"arch": "smallcnn", "epochs": 12, "save_every": 1, "learning_rate": 0.02, "batch_size": 32, "image_size": 16,
                 "val_fraction": 0.0}  # every image trained on and scored; best_model.pt is the last epoch's


def run_demo(output_dir: Path, noise_rate: float = 0.1, seed: int = 0, device: str = "auto", progress: bool = True,
             epochs: Optional[int] = None, in_run: bool = False) -> Dict[str, Any]:
    """Write the digits folder with ``noise_rate`` of its training labels flipped, train, score the checkpoints
    (influence and self-influence), write the report and the detection figures (mislabel_metrics.json). ``in_run``:
    training also records in-run TracIn (tracin train --in_run) into ``in_run_results/``, reported beside."""
    if not 0 <= noise_rate < 0.9:
        raise TracInError(f"--noise_rate must be in [0, 0.9), got {noise_rate}.")
    start = time.perf_counter()
    out = Path(output_dir)
    data_dir, ckpt_dir, results = out / "data", out / "checkpoints", out / "results"
    for folder in (data_dir, ckpt_dir):
        if folder.exists() and any(folder.iterdir()):
            raise TracInError(f"{folder} is not empty; give --output_dir a new or empty folder.")
    records = write_digits_folder(data_dir, noise_rate=noise_rate, seed=seed)
    settings = dict(DEMO_TRAINING, epochs=epochs or DEMO_TRAINING["epochs"], in_run=out / "in_run_results" if in_run else None)
    summary = train_image_classifier(data_dir, ckpt_dir, ImageTraining(seed=seed, **settings), resolve_device(device), progress)
    scoring = ScoringConfig(layers="all", batch_size=256, seed=seed, progress=progress)
    manifest = run_influence(InfluenceJob(data_dir, ckpt_dir, results, top_k=10, self_influence=True, device=device,
                                          scoring=scoring))
    report = build_report(results)
    flipped = {Path(str(r["file"])).name for r in records}
    metrics = {"noise_rate": noise_rate, "seed": seed, "n_flipped": len(flipped), **_detection(results, flipped),
               "best_test_accuracy": summary.best_test_accuracy, "health_score": report["health_score"],
               "seconds": time.perf_counter() - start, "report": str(results / "report.html"),
               "engine_seconds": manifest["timings"]["influence_s"]}
    if in_run:
        in_run_report = build_report(out / "in_run_results")
        metrics["in_run"] = {**_detection(out / "in_run_results", flipped), "report": in_run_report["report"]}
    write_json(out / "mislabel_metrics.json", metrics)
    return metrics


def _detection(results: Path, flipped: set) -> Dict[str, Any]:
    """How the self-influence ranking in ``results`` finds the ``flipped`` files: recall at inspected shares, ROC AUC."""
    with open(results / "self_influence.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scores = np.array([float(r["score"]) for r in rows])
    is_flipped = np.array([Path(r["train_file"]).name in flipped for r in rows])
    return {"n_train": len(rows), "recall_at_inspected": recall_at(scores, is_flipped), "roc_auc": roc_auc(scores, is_flipped)}
