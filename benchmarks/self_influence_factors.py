"""Why last-layer self-influence trails the loss on some data, and what other scores computed from
the same checkpoints do: closed forms over the output layer, on a finished ``tracin evaluate
mislabel`` run.

For a Linear output layer with bias, an example's gradient at checkpoint c is (p_c - y) (x) [a_c, 1],
so its last-layer self-influence is  sum_c lr_c * (|a_c|^2 + 1) * |p_c - y|^2 : an *error factor*
|p - y|^2 (the output-bias self-influence, ``layers="output_bias"``) times a *feature factor*
|a|^2 + 1 (a = the output layer's input). By default this script ranks the training images by each
factor alone and prints their ROC AUC for finding the flipped labels, per seed, next to the whole
last-layer score and the summed loss:

    tracin evaluate mislabel --data shapes --image_size 24 --noise_rate 0.1 --seeds 0 1 2 --output_dir O
    python benchmarks/self_influence_factors.py --work_dir O/work

A feature-factor AUC below 0.5 means flipped images have *smaller* features than clean ones, so
multiplying by it pulls them down the ranking.

With ``--sweep`` it scores every variant in ``VARIANTS`` (K-FAC on either side of the Kronecker
product or both, the true Fisher, equal checkpoint weights, the loss, a first-order leave-one-out
loss) and compares each with the cleanlab baseline of the same run (read from its
mislabel_per_seed.csv): mean ROC AUC, worst seed, recall at 15% inspected, seeds at least as good.
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from tracin.workflows.evaluation.common import recall_at, roc_auc
from tracin.tasks.classification import checkpoint_probabilities, label_losses
from tracin.workflows.image.setup import image_setup
from tracin.layers.inverses import whitener


@dataclass
class HeadPasses:
    """The output layer at every checkpoint of one noisy copy: inputs a [C, n, da], class
    probabilities p [C, n, K], given labels y [n], learning rates lr [C] and, per checkpoint, the
    epochs since the last one [C]; the mean batch size of training; which labels were flipped [n]."""

    a: torch.Tensor
    p: torch.Tensor
    y: torch.Tensor
    lr: np.ndarray
    epochs: np.ndarray
    batch_size: float
    is_flipped: np.ndarray

    @property
    def error(self) -> torch.Tensor:
        """p - onehot(y) [C, n, K]: the output-gradient of the cross-entropy."""
        return self.p - torch.nn.functional.one_hot(self.y, self.p.shape[-1]).double()

    @property
    def error_factor(self) -> torch.Tensor:
        """|p - y|^2 [C, n]."""
        return self.error.pow(2).sum(-1)

    @property
    def feature_factor(self) -> torch.Tensor:
        """|a|^2 + 1 [C, n]."""
        return self.a.pow(2).sum(-1) + 1

    def summed(self, per_checkpoint: torch.Tensor, weights=None) -> np.ndarray:
        """sum_c w_c * per_checkpoint[c] [n] from [C, n], with w the learning rates unless given."""
        w = torch.as_tensor(self.lr if weights is None else weights, dtype=per_checkpoint.dtype)
        return (w[:, None] * per_checkpoint).sum(0).numpy()

    def losses(self, c: int) -> np.ndarray:
        return label_losses(self.p[c], self.y.tolist())

    def summed_loss(self) -> np.ndarray:
        return sum(self.losses(c) for c in range(len(self.lr)))


def head_passes(run: Path) -> HeadPasses:
    """One forward pass over the training images per checkpoint, capturing the output layer's inputs."""
    setup = image_setup(run, run / "checkpoints")
    flipped = {Path(r["file"]).name for r in csv.DictReader(open(run / "injected_noise.csv"))}
    is_flipped = np.array([p.name in flipped for p in setup.train_split.paths])
    model = setup.model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured = []
    head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().double()))
    A, P = [], []
    for probs in checkpoint_probabilities(model, setup.checkpoints, setup.train, torch.device("cpu"), 256):
        P.append(probs.double())
        A.append(torch.cat(captured))
        captured.clear()
    epochs = np.diff([0] + [int(ck.epoch or 0) for ck in setup.checkpoints])
    last = setup.checkpoints[-1]
    batch_size = len(is_flipped) * int(last.epoch or 1) / max(1, int(last.step or 1))
    return HeadPasses(torch.stack(A), torch.stack(P), torch.tensor(setup.train_split.labels),
                      np.array([float(ck.learning_rate) for ck in setup.checkpoints]), epochs, batch_size, is_flipped)


def factor_scores(h: HeadPasses) -> Dict[str, np.ndarray]:
    e, f = h.error_factor, h.feature_factor
    return {"last layer (whole)": h.summed(e * f), "error factor (output bias)": h.summed(e),
            "feature factor": h.summed(f), "summed loss": h.summed_loss()}


def _quadratic(x: torch.Tensor, S: torch.Tensor, damping: float = 0.1) -> torch.Tensor:
    """x_i^T (S + l I)^-1 x_i for each row of x [n, d], with the library's damping (tracin.layers.precondition)."""
    W = whitener(S.unsqueeze(0), damping)[0]
    return (x @ W).pow(2).sum(-1)


def sweep_scores(h: HeadPasses) -> Dict[str, np.ndarray]:
    """Every variant, [n] each, higher = more suspect."""
    D = h.error
    A1 = torch.cat([h.a, torch.ones_like(h.a[..., :1])], -1)
    n = D.shape[1]
    err, feat = h.error_factor, h.feature_factor
    lev = torch.stack([_quadratic(A1[c], A1[c].T @ A1[c] / n) for c in range(len(h.lr))])
    mah = torch.stack([_quadratic(D[c], D[c].T @ D[c] / n) for c in range(len(h.lr))])
    true_fisher = [torch.diag(h.p[c].mean(0)) - h.p[c].T @ h.p[c] / n for c in range(len(h.lr))]
    mah_true = torch.stack([_quadratic(D[c], true_fisher[c]) for c in range(len(h.lr))])
    final_loss = h.losses(len(h.lr) - 1)
    return {
        "last layer": h.summed(err * feat),
        "output bias": h.summed(err),
        "last layer, K-FAC": h.summed(lev * mah),
        "last layer, K-FAC on inputs only": h.summed(lev * err),
        "last layer, K-FAC on output-gradients only": h.summed(feat * mah),
        "output bias, K-FAC": h.summed(mah),
        "last layer, K-FAC with the true Fisher": h.summed(lev * mah_true),
        "output bias, equal checkpoint weights": h.summed(err, weights=np.ones(len(h.lr))),
        "summed loss": h.summed_loss(),
        "final loss": final_loss,
        # first order: each epoch's step on z lowered its own loss by lr / B * |g|^2
        "final loss + last-layer self-influence x epochs / B": final_loss + h.summed(
            err * feat, weights=h.lr * h.epochs / h.batch_size),
    }


def cleanlab_per_seed(work_dir: Path) -> Dict[int, Tuple[float, float]]:
    """seed -> (ROC AUC, recall at 15%) of the run's cleanlab baseline."""
    path = work_dir.parent / "mislabel_per_seed.csv"
    if not path.is_file():
        raise SystemExit(f"{path} is missing; --sweep compares with the cleanlab rows of the run that made {work_dir}.")
    return {int(r["seed"]): (float(r["roc_auc"]), float(r["recall@15%"])) for r in csv.DictReader(open(path)) if r["method"].startswith("cleanlab")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, required=True, help="the work/ folder of a tracin evaluate mislabel run")
    p.add_argument("--sweep", action="store_true", help="score every variant and compare with the run's cleanlab rows")
    args = p.parse_args()
    runs = sorted(args.work_dir.glob("noisy_seed*"), key=lambda d: int(d.name.removeprefix("noisy_seed")))
    if not runs:
        raise SystemExit(f"{args.work_dir} has no noisy_seed* folders; pass the work/ folder of a 'tracin evaluate mislabel' run.")
    if not args.sweep:
        print("| seed | " + " | ".join(["last layer (whole)", "error factor (output bias)", "feature factor", "summed loss"]) + " |")
        print("|---|---|---|---|---|")
        for run in runs:
            h = head_passes(run)
            print(f"| {run.name.removeprefix('noisy_seed')} | "
                  + " | ".join(f"{roc_auc(s, h.is_flipped):.4f}" for s in factor_scores(h).values()) + " |")
        return
    cleanlab = cleanlab_per_seed(args.work_dir)
    auc: Dict[str, list] = {}
    recall: Dict[str, list] = {}
    seeds = []
    for run in runs:
        seeds.append(int(run.name.removeprefix("noisy_seed")))
        h = head_passes(run)
        for name, s in sweep_scores(h).items():
            auc.setdefault(name, []).append(roc_auc(s, h.is_flipped))
            recall.setdefault(name, []).append(recall_at(s, h.is_flipped, (0.15,))["15%"])
    base = np.array([cleanlab[s][0] for s in seeds])
    print(f"cleanlab (cross-validated): ROC AUC {base.mean():.4f} (worst seed {base.min():.4f}), "
          f"recall at 15% {np.mean([cleanlab[s][1] for s in seeds]):.3f}")
    print("| score | ROC AUC (worst seed) | recall at 15% | seeds >= cleanlab |\n|---|---|---|---|")
    for name in auc:
        a = np.array(auc[name])
        print(f"| {name} | {a.mean():.4f} ({a.min():.4f}) | {np.mean(recall[name]):.3f} | {int((a >= base).sum())} of {len(a)} |")


if __name__ == "__main__":
    main()
