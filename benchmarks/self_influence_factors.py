"""Why last-layer self-influence trails the loss on some data: split it into its two factors.

For a Linear output layer with bias, an example's gradient at checkpoint c is (p_c - y) (x) [a_c, 1],
so its last-layer self-influence is  sum_c lr_c * (|a_c|^2 + 1) * |p_c - y|^2 : an *error factor*
|p - y|^2 (the output-bias self-influence, ``layers="output_bias"``) times a *feature factor*
|a|^2 + 1 (a = the output layer's input). This script ranks the training images of a
``tracin evaluate mislabel`` run by each factor alone and prints their ROC AUC for finding the
flipped labels, per seed, next to the whole last-layer score and the summed loss:

    tracin evaluate mislabel --data shapes --image_size 24 --noise_rate 0.1 --seeds 0 1 2 --output_dir O
    python benchmarks/self_influence_factors.py --work_dir O/work

A feature-factor AUC below 0.5 means flipped images have *smaller* features than clean ones, so
multiplying by it pulls them down the ranking.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from tracin.evaluation.common import roc_auc
from tracin.image_influence import image_setup, label_losses


def factors(run: Path):
    """(is_flipped [n], {score name: [n]}) for one noisy copy with its checkpoints."""
    setup = image_setup(run, run / "checkpoints")
    flipped = {Path(r["file"]).name for r in csv.DictReader(open(run / "injected_noise.csv"))}
    is_flipped = np.array([p.name in flipped for p in setup.train_split.paths])
    model = setup.model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured = []
    head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().double()))
    labels = torch.tensor(setup.train_split.labels)
    error = feature = whole = loss = 0.0
    for ck in setup.checkpoints:  # one pass per checkpoint gives the head's inputs and the probabilities
        model.load_state_dict(ck.state_dict())
        captured.clear()
        with torch.no_grad():
            probs = torch.cat([model(x).softmax(-1) for x, _ in torch.utils.data.DataLoader(setup.train, batch_size=256)])
        a = torch.cat(captured)
        e = (probs.double() - torch.nn.functional.one_hot(labels, probs.shape[1]).double()).pow(2).sum(1)
        f = a.pow(2).sum(1) + 1
        lr = float(ck.learning_rate)
        error, feature, whole = error + lr * e, feature + lr * f, whole + lr * e * f
        loss = loss + label_losses(probs, setup.train_split.labels)
    return is_flipped, {"last layer (whole)": whole.numpy(), "error factor (output bias)": error.numpy(),
                        "feature factor": feature.numpy(), "summed loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, required=True, help="the work/ folder of a tracin evaluate mislabel run")
    args = p.parse_args()
    runs = sorted(args.work_dir.glob("noisy_seed*"))
    if not runs:
        raise SystemExit(f"{args.work_dir} has no noisy_seed* folders; pass the work/ folder of a 'tracin evaluate mislabel' run.")
    print("| seed | " + " | ".join(["last layer (whole)", "error factor (output bias)", "feature factor", "summed loss"]) + " |")
    print("|---|---|---|---|---|")
    for run in runs:
        is_flipped, scores = factors(run)
        print(f"| {run.name.removeprefix('noisy_seed')} | " + " | ".join(f"{roc_auc(s, is_flipped):.4f}" for s in scores.values()) + " |")


if __name__ == "__main__":
    main()
