"""Linear datamodeling score (LDS) of tracin's configurations on scikit-learn's digits with an MLP 64-128-10.

The protocol of the TRAK paper (Park et al. 2023): ``--subsets`` random halves of the training set, each
retrained from scratch with ``--seeds`` seeds (all models trained at once with torch.func: stacked parameters
and vmap); for every test example, its margin (true logit minus the logsumexp of the others) averaged over the
seeds of a half. A method's LDS for a test example is the Spearman correlation, over the halves, between the sum
of its attribution scores over the half's examples and that margin; the table gives the mean over test examples
(with a 95% bootstrap interval) and the scoring seconds.

The attributed model is one full training run (SGD, momentum 0.9, a checkpoint per epoch); every configuration
scores it in this process on the same data. Peers (Captum, TRAK, kronfluence, dattri) are not run here: they are
not installed on the development machine.

    python benchmarks/lds_digits.py                 # about 4 minutes on 2 CPU cores
"""
import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from tracin import Checkpoint, TracIn

HIDDEN = 128


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_train = 1200
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def train_full(train, epochs: int, lr: float, seed: int):
    """One SGD run with a checkpoint (weights, learning rate) after every epoch."""
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = train
    checkpoints = []
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        checkpoints.append(Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, learning_rate=lr, epoch=epoch))
    return model, checkpoints


def train_many(train, masks: torch.Tensor, epochs: int, lr: float, seed: int) -> dict:
    """Stacked parameters of one model per row of ``masks`` [M, n_train] (the examples it trains on), trained at once
    with vmap: SGD with momentum 0.9, batches of 64 drawn from each model's own examples."""
    torch.manual_seed(seed)
    template = mlp()
    models = [mlp() for _ in range(masks.shape[0])]
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k, _ in template.named_parameters()}
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    x, y = train
    members = [torch.nonzero(m).flatten() for m in masks]
    size = min(len(m) for m in members)
    g = torch.Generator().manual_seed(seed)

    def loss(p, xb, yb):
        return nn.functional.cross_entropy(functional_call(template, p, (xb,)), yb)

    step = vmap(grad(loss))
    for _ in range(epochs):
        orders = torch.stack([m[torch.randperm(len(m), generator=g)[:size]] for m in members])  # [M, size]
        for start in range(0, size, 64):
            idx = orders[:, start:start + 64]
            grads = step(params, x[idx], y[idx])
            for k in params:
                velocity[k] = 0.9 * velocity[k] + grads[k]
                params[k] = params[k] - lr * velocity[k]
    return params


def margins(params: dict, test) -> torch.Tensor:
    """[M, n_test] true logit minus the logsumexp of the other logits, for each stacked model."""
    template = mlp()
    x, y = test
    logits = vmap(lambda p: functional_call(template, p, (x,)))(params)  # [M, n_test, 10]
    true = logits.gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
    others = logits.scatter(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=2)


def lds(scores: torch.Tensor, masks: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per test example: Spearman over the subsets between summed scores [S, n_test] and margins [S, n_test]."""
    predicted = masks.float() @ scores.T  # [S, n_test]
    return np.array([spearmanr(predicted[:, j], target[:, j]).statistic for j in range(target.shape[1])])


def interval(values: np.ndarray, rng: np.random.Generator):
    means = [rng.choice(values, len(values)).mean() for _ in range(1000)]
    return np.percentile(means, [2.5, 97.5])


CONFIGS = {
    "all layers (the default)": {},
    "last layer": {"layers": "last"},
    "all layers, K-FAC": {"precondition": "kfac"},
    "last layer, K-FAC": {"layers": "last", "precondition": "kfac"},
    "all layers, cosine": {"normalize": "cosine"},
    "all layers, K-FAC damping 0.01": {"precondition": "kfac", "damping": 0.01},
    "all layers, K-FAC damping 1": {"precondition": "kfac", "damping": 1.0},
    "last layer, K-FAC damping 0.01": {"layers": "last", "precondition": "kfac", "damping": 0.01},
    "last layer, K-FAC damping 1": {"layers": "last", "precondition": "kfac", "damping": 1.0},
    "all layers, margin": {"measurement": "margin"},
    "all layers, K-FAC, margin": {"precondition": "kfac", "measurement": "margin"},
    "last layer, K-FAC, margin": {"layers": "last", "precondition": "kfac", "measurement": "margin"},
}
FINAL_ONLY = {"all layers, final checkpoint": {}, "all layers, K-FAC, final checkpoint": {"precondition": "kfac"},
              "all layers, K-FAC, margin, final checkpoint": {"precondition": "kfac", "measurement": "margin"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--n_test", type=int, default=100)
    args = parser.parse_args()
    train, test = data()
    test = (test[0][: args.n_test], test[1][: args.n_test])
    start = time.perf_counter()
    masks = torch.rand(args.subsets, len(train[0]), generator=torch.Generator().manual_seed(1)) < 0.5
    target = torch.stack([margins(train_many(train, masks, args.epochs, args.lr, seed), test) for seed in range(args.seeds)]).mean(0)
    print(f"# digits MLP 64-{HIDDEN}-10, {len(train[0])} train / {len(test[0])} test, {args.subsets} halves x {args.seeds} seeds, "
          f"{args.epochs} epochs; retraining {time.perf_counter() - start:.0f}s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, checkpoints = train_full(train, args.epochs, args.lr, seed=0)
    print(f"{'method':<44} {'LDS':>6} {'95% interval':>16} {'seconds':>8}")
    rng = np.random.default_rng(0)
    runs = [(name, kwargs, checkpoints) for name, kwargs in CONFIGS.items()]
    runs += [(name, kwargs, checkpoints[-1:]) for name, kwargs in FINAL_ONLY.items()]
    for name, kwargs, used in runs:
        begin = time.perf_counter()
        tr = TracIn(model, used, batch_size=400, progress=False, **kwargs)
        scores = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
        seconds = time.perf_counter() - begin
        values = lds(scores, masks, target.detach())
        low, high = interval(values, rng)
        print(f"{name:<44} {values.mean():>6.3f} {f'[{low:.3f}, {high:.3f}]':>16} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
