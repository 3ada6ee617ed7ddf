"""How K-FAC self-influence's mislabel detection depends on the damping, on a finished
``tracin evaluate mislabel`` run (its noisy copies and checkpoints under O/work):

    tracin evaluate mislabel --data shapes --image_size 24 --noise_rate 0.1 --seeds 0 1 2 3 4 --output_dir O
    python benchmarks/kfac_damping.py --work_dir O/work --damping 0.03 0.1 0.3 1

Prints the ROC AUC of last-layer K-FAC self-influence (summed over all checkpoints) for finding the
flipped labels, per seed and on average, for each damping (a fraction of each Kronecker factor's
mean eigenvalue; 0.1 is the default, Kronfluence's heuristic).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from tracin import TracIn
from tracin.workflows.evaluation.common import recall_at, roc_auc
from tracin.workflows.image.setup import image_setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", type=Path, required=True)
    p.add_argument("--damping", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--layers", default="last")
    a = p.parse_args()
    runs = sorted(a.work_dir.glob("noisy_seed*"), key=lambda d: int(d.name.removeprefix("noisy_seed")))
    auc = {d: [] for d in a.damping}
    recall = {d: [] for d in a.damping}
    for run in runs:
        setup = image_setup(run, run / "checkpoints")
        flipped = {Path(r["file"]).name for r in csv.DictReader(open(run / "injected_noise.csv"))}
        is_flipped = np.array([path.name in flipped for path in setup.train_split.paths])
        for damping in a.damping:
            tr = TracIn(setup.model, setup.checkpoints, layers=a.layers, device="cpu", batch_size=256, progress=False,
                        precondition="kfac", damping=damping)
            s = tr.self_influence(setup.train).numpy()
            auc[damping].append(roc_auc(s, is_flipped))
            recall[damping].append(recall_at(s, is_flipped, (0.15,))["15%"])
        print(f"{run.name}: " + ", ".join(f"damping {d:g} AUC {auc[d][-1]:.4f}" for d in a.damping), flush=True)
    print("| damping | ROC AUC (mean) | worst seed | recall at 15% |\n|---|---|---|---|")
    for d in a.damping:
        print(f"| {d:g} | {np.mean(auc[d]):.4f} | {np.min(auc[d]):.4f} | {np.mean(recall[d]):.3f} |")


if __name__ == "__main__":
    main()
