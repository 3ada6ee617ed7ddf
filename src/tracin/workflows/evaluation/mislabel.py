"""``tracin evaluate mislabel``: does self-influence find flipped labels, and better than the baselines?

Per seed: flip labels (uniform or asymmetric), train with checkpoints, and rank the training images by
  tracin self-influence    sum over checkpoints of lr_c |g_c|^2 (exact), over the chosen layers (the
                           last layer by default, as in `tracin influence`), over all layers, over
                           the output layer's bias alone (layers="output_bias"), and lr_c g_c^T P_c g_c
                           over the last layer with P_c its K-FAC inverse Fisher (precondition="kfac");
  loss (final model)       cross-entropy of the given label under the last checkpoint;
  loss (summed)            the same summed over the checkpoints;
  cleanlab                 1 - cleanlab's label-quality score from out-of-fold probabilities of the same
                           architecture trained the same way (K-fold cross-validation);
then report, for each, recall of the flipped labels after inspecting 5/10/15/20/30% and ROC AUC, with
mean and spread over seeds, a recall-vs-fraction-inspected plot, and the checkpoint-choice study
(which checkpoints' self-influence, over the chosen layers, detects best).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ...io import write_csv, write_figure, write_json
from .common import (Noise, note, FRACTIONS, Training, cleanlab_scores, cross_validated_probabilities, noisy_runs, recall_at,
                     recall_curve, roc_auc, summarise, variant_key)

# Self-influence scores reported beside the chosen one: all layers, the output layer's bias (the error
# term alone), and the last layer with K-FAC preconditioning (docs/quality.md).
EXTRA_VARIANTS = [("all", "none"), ("output_bias", "none"), ("last", "kfac")]


def checkpoint_subsets(count: int) -> Dict[str, List[int]]:
    """Named subsets of C checkpoints (in training order) for the checkpoint-choice study."""
    half = max(1, count // 2)
    subsets = {"all": list(range(count)), "last": [count - 1], "first": [0], "early half": list(range(half)),
               "late half": list(range(count - half, count)), "last two": list(range(max(0, count - 2), count)),
               "every other": list(range(count - 1, -1, -2))[::-1]}
    return {name: idx for name, idx in subsets.items() if idx}


def _variant_name(key: str) -> str:
    """"last layer", "last layer, K-FAC", ... for a :func:`variant_key`."""
    layers, _, precondition = key.partition("+")
    name = {"last": "last layer", "all": "all layers", "output_bias": "output-layer bias"}.get(layers, f"layers {layers}")
    return name + (", K-FAC" if precondition == "kfac" else "")


def method_scores(scores: Dict[str, np.ndarray], pred_probs: Optional[np.ndarray], training: Training) -> Dict[str, np.ndarray]:
    """Suspicion scores [n] per method (higher = more likely mislabelled)."""
    main = variant_key((training.layers, training.precondition))
    out = {f"tracin self-influence ({_variant_name(main)})": scores["self_influence"].sum(0)}
    out.update({f"tracin self-influence ({_variant_name(key.split(':', 1)[1])})": v.sum(0)
                for key, v in scores.items() if key.startswith("self_influence:")})
    out.update({"loss (final model)": scores["loss"][-1], "loss (summed over checkpoints)": scores["loss"].sum(0)})
    if pred_probs is not None:
        out["cleanlab (cross-validated)"] = cleanlab_scores(scores["labels"], pred_probs)
    return out


def run_mislabel(setting: Noise, output_dir: Path, training: Optional[Training] = None, cv_folds: int = 5,
                 use_cleanlab: bool = True, progress: bool = True) -> Dict[str, Any]:
    data, noise_rate, seeds, noise, flip_map = setting.data, setting.rate, setting.seeds, setting.kind, setting.flip_map
    training = training or Training()
    out = Path(output_dir)
    per_seed: List[Dict[str, Any]] = []
    curves: Dict[str, List[np.ndarray]] = {}
    study: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for run in noisy_runs(setting, out, training, also=EXTRA_VARIANTS,
                          cv_folds=cv_folds if use_cleanlab else None, require_flips=True, progress=progress):
        seed, flipped, summary, scores = run.seed, run.flipped, run.summary, run.scores
        if use_cleanlab:
            note(progress, f"seed {seed}: the cleanlab baseline trains {cv_folds} more models (cross-validation)")
        probs = cross_validated_probabilities(run.noisy, run.work / f"cv_seed{seed}", training, cv_folds, seed) if use_cleanlab else None
        for method, s in method_scores(scores, probs, training).items():
            per_seed.append({"seed": seed, "method": method, "n_train": len(s), "n_flipped": int(flipped.sum()),
                             "roc_auc": roc_auc(s, flipped), **{f"recall@{k}": v for k, v in recall_at(s, flipped).items()}})
            curves.setdefault(method, []).append(recall_curve(s, flipped))
        for name, idx in checkpoint_subsets(len(scores["lr"])).items():
            s = scores["self_influence"][idx].sum(0)
            study.append({"seed": seed, "checkpoints": name, "epochs": " ".join(str(int(e)) for e in scores["epoch"][idx]),
                          "roc_auc": roc_auc(s, flipped), "recall@15%": recall_at(s, flipped, (0.15,))["15%"]})
        if progress:
            best = {r["method"]: r for r in per_seed if r["seed"] == seed}
            print(f"seed {seed}: {int(flipped.sum())} flipped of {len(flipped)}, test accuracy {summary.best_test_accuracy:.1%}; "
                  + "; ".join(f"{m} AUC {r['roc_auc']:.3f}, recall@15% {r['recall@15%']:.2f}" for m, r in best.items())
                  + f" ({time.perf_counter() - start:.0f}s)", flush=True)
        start = time.perf_counter()
    metrics = ["roc_auc"] + [f"recall@{int(round(f * 100))}%" for f in FRACTIONS]
    summary_rows = {m: {k: summarise([r[k] for r in per_seed if r["method"] == m]) for k in metrics} for m in curves}
    study_rows = {name: {k: summarise([r[k] for r in study if r["checkpoints"] == name]) for k in ("roc_auc", "recall@15%")}
                  for name in dict.fromkeys(r["checkpoints"] for r in study)}
    png = _plot(out / "recall_vs_inspected.png", curves, noise_rate, noise, len(seeds))
    result = {"data": data, "noise": noise, "noise_rate": noise_rate, "flip_map": flip_map, "seeds": list(seeds),
              "training": vars(training), "cv_folds": cv_folds if use_cleanlab else None, "summary": summary_rows,
              "checkpoint_study": study_rows, "per_seed": per_seed, "plot": png.name}
    write_csv(out / "mislabel_per_seed.csv", per_seed, list(per_seed[0]))
    write_csv(out / "checkpoint_study.csv", study, list(study[0]))
    write_json(out / "mislabel_evaluation.json", result)
    return result


def _plot(path: Path, curves: Dict[str, List[np.ndarray]], noise_rate: float, noise: str, n_seeds: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.linspace(0, 100, 101)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for method, runs in curves.items():
        stack = np.stack(runs)
        ax.plot(x, stack.mean(0), label=method, lw=2 if method.startswith("tracin") else 1.3)
        if len(runs) > 1:
            ax.fill_between(x, stack.min(0), stack.max(0), alpha=0.15)
    ax.plot(x, np.minimum(1, x / 100 / max(noise_rate, 1e-9)) if noise == "uniform" else x / 100, ":", color="grey",
            label="ideal" if noise == "uniform" else "random")
    ax.set_xlabel("training data inspected (%)")
    ax.set_ylabel("flipped labels found (recall)")
    ax.set_title(f"{noise} noise {noise_rate:.0%}, {n_seeds} seed(s): mean, band = min..max")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return write_figure(path, fig, dpi=120)


def format_summary(result: Dict[str, Any]) -> str:
    """The summary as a Markdown table: mean ± std over seeds per method."""
    keys = ["roc_auc"] + [f"recall@{int(round(f * 100))}%" for f in FRACTIONS]
    lines = ["| method | " + " | ".join(k.replace("recall@", "recall ") for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, stats in result["summary"].items():
        lines.append(f"| {method} | " + " | ".join(f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}" for k in keys) + " |")
    return "\n".join(lines)
