"""``tracin evaluate cleaning``: act on the top suspects, retrain, and compare test accuracy.

Per seed: flip labels, train with checkpoints (the "noisy" accuracy), rank the training images by
tracin self-influence, by the final model's loss and at random (plus the oracle: exactly the
flipped images, as a ceiling), take the top ``fraction`` of each ranking and either remove those
images or relabel them to the final model's prediction, retrain the same way with the same seed,
and record the test accuracy after the last epoch.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..image.folders import ImageSplit, scan_split
from ..image.noise import place
from ...errors import DataError
from ...io import write_csv, write_json
from .common import Noise, Training, final_test_accuracy, noisy_runs, summarise

METHODS = ("tracin self-influence", "loss (final model)", "random", "oracle (the flipped images)")  # self-influence over --layers


def _cleaned_copy(train: ImageSplit, test: ImageSplit, classes: List[str], target: Path, chosen: np.ndarray, action: str,
                  predicted: np.ndarray, method: str) -> None:
    """The noisy copy's ``train`` / ``test`` images in ``target``, with the ``chosen`` training images
    removed, or moved to their predicted class."""
    if target.exists():
        shutil.rmtree(target)
    pick = set(chosen.tolist())
    kept = [(path, int(predicted[i]) if i in pick else label) for i, (path, label) in enumerate(zip(train.paths, train.labels))
            if not (i in pick and action == "remove")]
    empty = sorted(set(range(len(classes))) - {label for _, label in kept})
    if empty:
        doing = {"remove": "Removing", "relabel": "Relabelling"}[action]
        raise DataError(f"{doing} the top {len(pick)} by {method} would leave class '{classes[empty[0]]}' without training "
                        "images; lower --fraction.")
    for part, images in (("train", kept), ("test", zip(test.paths, test.labels))):
        for path, label in images:
            place(Path(path), target / part / classes[label] / Path(path).name)
    for part in ("train", "test"):
        for c in classes:
            (target / part / c).mkdir(parents=True, exist_ok=True)


def run_cleaning(setting: Noise, output_dir: Path, training: Optional[Training] = None, fraction: float = 0.1,
                 action: str = "remove", progress: bool = True) -> Dict[str, Any]:
    data, noise_rate, seeds, noise = setting.data, setting.rate, setting.seeds, setting.kind
    if not 0 < fraction < 1:
        raise DataError(f"--fraction must be in (0, 1), got {fraction}.")
    training = training or Training()
    out = Path(output_dir)
    rows: List[Dict[str, Any]] = []
    for run in noisy_runs(setting, out, training, progress=progress):
        seed, noisy, flipped, base, scores, work = run.seed, run.noisy, run.flipped, run.summary, run.scores, run.work
        n = len(flipped)
        k = max(1, int(round(fraction * n)))
        rng = np.random.default_rng(seed)
        rankings = {METHODS[0]: np.argsort(-scores["self_influence"].sum(0), kind="stable"),
                    METHODS[1]: np.argsort(-scores["loss"][-1], kind="stable"),
                    METHODS[2]: rng.permutation(n), METHODS[3]: np.flatnonzero(flipped)}
        rows.append({"seed": seed, "method": "none (noisy labels)", "changed": 0, "flipped_among_changed": 0,
                     "test_accuracy": final_test_accuracy(base.log_csv)})
        train, classes = scan_split(noisy, "train")  # once per seed, for every method's copy
        test, _ = scan_split(noisy, "test", classes)
        for method, order in rankings.items():
            chosen = order[:k]
            cleaned = work / f"cleaned_seed{seed}"
            _cleaned_copy(train, test, classes, cleaned, chosen, action, scores["predicted"], method)
            after = training.fit(cleaned, cleaned / "checkpoints", seed, save_every=training.epochs)
            rows.append({"seed": seed, "method": method, "changed": int(len(chosen)),
                         "flipped_among_changed": int(flipped[chosen].sum()), "test_accuracy": final_test_accuracy(after.log_csv)})
            shutil.rmtree(cleaned)
        if progress:
            print(f"seed {seed}: " + "; ".join(f"{r['method']} {r['test_accuracy']:.1%}" for r in rows if r["seed"] == seed), flush=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {m: {"test_accuracy": summarise([r["test_accuracy"] for r in rows if r["method"] == m]),
                   "flipped_among_changed": summarise([r["flipped_among_changed"] for r in rows if r["method"] == m])}
               for m in methods}
    result = {"data": data, "noise": noise, "noise_rate": noise_rate, "seeds": list(seeds), "fraction": fraction,
              "action": action, "training": vars(training), "summary": summary, "per_seed": rows}
    write_csv(out / "cleaning_per_seed.csv", rows, list(rows[0]))
    write_json(out / "cleaning_evaluation.json", result)
    return result


def format_cleaning(result: Dict[str, Any]) -> str:
    """Test accuracy per method, mean ± std over seeds, as a Markdown table."""
    lines = [f"| {result['action']} top {result['fraction']:.0%} by | flipped among them | test accuracy |", "|---|---|---|"]
    for method, s in result["summary"].items():
        lines.append(f"| {method} | {s['flipped_among_changed']['mean']:.1f} | "
                     f"{s['test_accuracy']['mean']:.2%} ± {s['test_accuracy']['std']:.2%} |")
    return "\n".join(lines)
