"""End-to-end TracIn on generated data: train with checkpoints, find proponents/opponents of test
points, and surface mislabelled training points with self-influence.

    python examples/quickstart.py [--output_dir example_out] [--noise_rate 0.1] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tracin import Checkpoint, TracIn, save_checkpoint


def make_blobs(n: int, classes: int, dim: int, seed: int):
    """Gaussian clusters, one per class."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("example_out"))
    parser.add_argument("--noise_rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    x, y = make_blobs(1200, classes=5, dim=20, seed=args.seed)
    x_train, y_true, x_test, y_test = x[:1000], y[:1000], x[1000:], y[1000:]
    flip = torch.randperm(1000)[: int(args.noise_rate * 1000)]
    y_train = y_true.clone()
    y_train[flip] = (y_true[flip] + torch.randint(1, 5, (len(flip),))) % 5  # a different class
    train, test = TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)

    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(1, 6):
        for xb, yb in DataLoader(train, batch_size=32, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        save_checkpoint(out / "checkpoints" / f"epoch_{epoch}.pt", model.state_dict(), learning_rate=lr, epoch=epoch)

    tr = TracIn(model, Checkpoint.discover(out / "checkpoints"), layers="all", device="auto")
    result = tr.influence(train, test, top_k=5, self_influence=True)
    print(f"Scored {len(train)} training x {len(test)} test examples over {len(tr.checkpoints)} checkpoints, "
          f"{tr.num_parameters} parameters, in {result.stats['seconds']:.2f}s.")
    for i in range(2):
        print(f"test {i} (label {int(y_test[i])}): proponents {result.proponents.indices[i].tolist()} "
              f"(labels {y_train[result.proponents.indices[i]].tolist()}), "
              f"opponents {result.opponents.indices[i].tolist()} (labels {y_train[result.opponents.indices[i]].tolist()})")

    ranking = torch.argsort(result.self_influence, descending=True)
    flipped = set(flip.tolist())
    found = {pct: len(flipped & set(ranking[: int(pct / 100 * 1000)].tolist())) / max(1, len(flipped)) for pct in (10, 20)}
    print(f"Self-influence finds {found[10]:.0%} of the {len(flipped)} flipped labels in its top 10%, {found[20]:.0%} in its top 20%.")
    (out / "quickstart_metrics.json").write_text(json.dumps({"recall_top10pct": found[10], "recall_top20pct": found[20]}, indent=2))
    print(f"Wrote {out / 'quickstart_metrics.json'}")


if __name__ == "__main__":
    main()
