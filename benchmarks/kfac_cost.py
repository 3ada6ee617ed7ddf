"""What the default (K-FAC TracIn) costs against plain TracIn on the same work, in this process.

  mlp:      784-512-10 MLP (benchmarks/vs_captum.py's workload), 4,096 train x 32 test, 3 checkpoints, every layer,
            top-10 influence; best of 3 after a warm-up.
  resnet18: torchvision resnet18 (10 classes) at 32 px, 240 train x 60 test random images, 3 checkpoints, every
            layer, top-10 influence, batch 32; one run each (they take tens of seconds).

  small_cnn: vs_captum.py's tiny CNN, 1,024 train x 32 test, 3 checkpoints, every layer, and its
            forward+backward floor (best of 3).

    python benchmarks/kfac_cost.py [--part mlp small_cnn resnet18]

Prints seconds of the defaults, of precondition="none" and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from tracin import Checkpoint, TracIn


def _seconds(tr: TracIn, train, test) -> float:
    begin = time.perf_counter()
    tr.influence(train, test, top_k=10)
    return time.perf_counter() - begin


def _trained(build: str, n_train: int, n_test: int = 32):
    """vs_captum.py's model ``build`` ("mlp", "tiny_cnn") trained there with 3 checkpoints on its data:
    (model, inputs, labels, train set, test set, checkpoints)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import vs_captum

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    model = getattr(vs_captum, build)()
    x, y = vs_captum.make_data(n_train + n_test, 0)
    vs_captum.train_with_checkpoints(model, x[:n_train], y[:n_train], folder, 3, torch.device("cpu"))
    model.eval()
    train, test = TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
    return model, x, y, train, test, Checkpoint.discover(folder)


def _best_of(model, checkpoints, train, test, repeats: int, **settings) -> dict:
    """The defaults' and plain TracIn's best seconds of ``repeats`` runs, each after one untimed warm-up."""
    seconds = {}
    for name, preconditioned in (("defaults", {}), ("plain", {"precondition": "none"})):
        runs = [_seconds(TracIn(model, checkpoints, layers="all", progress=False, **settings, **preconditioned), train, test)
                for _ in range(repeats + 1)][1:]
        seconds[name] = min(runs)
    return seconds


def mlp(repeats: int = 3) -> None:
    model, _, _, train, test, checkpoints = _trained("mlp", 4096)
    _row("784-512-10 MLP, 4,096 x 32", _best_of(model, checkpoints, train, test, repeats))


def small_cnn(repeats: int = 3) -> None:
    """benchmarks/vs_captum.py's tiny CNN (57k parameters, 1,024 train x 32 test, 3 checkpoints, batch 256) against
    its forward+backward floor: the same batches through the model with parameter gradients at every checkpoint."""
    model, x, y, train, test, checkpoints = _trained("tiny_cnn", 1024)

    def floor() -> float:
        begin = time.perf_counter()
        for c in checkpoints:
            model.load_state_dict(c.state_dict())
            for start in range(0, 1024, 256):
                torch.nn.functional.cross_entropy(model(x[start:start + 256]), y[start:start + 256]).backward()
        model.zero_grad()
        return time.perf_counter() - begin

    floor()
    seconds = {"floor": min(floor() for _ in range(repeats)),
               **_best_of(model, checkpoints, train, test, repeats, batch_size=256)}
    _row("tiny CNN, 1,024 x 32", seconds)
    print(f"|   against the floor ({seconds['floor']:.2f} s) | {seconds['defaults'] / seconds['floor']:.1f}x | "
          f"{seconds['plain'] / seconds['floor']:.1f}x | |", flush=True)


def resnet18() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 3, 32, 32, generator=g), torch.randint(0, 10, (300,), generator=g)
    base = model.state_dict()
    checkpoints = [Checkpoint({k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                               for k, v in base.items()}, learning_rate=0.01) for _ in range(3)]
    train, test = TensorDataset(x[:240], y[:240]), TensorDataset(x[240:], y[240:])
    seconds = {name: _seconds(TracIn(model, checkpoints, layers="all", progress=False, batch_size=32, **settings), train, test)
               for name, settings in (("plain", {"precondition": "none"}), ("defaults", {}))}
    _row("resnet18 at 32 px, 240 x 60", seconds)


def _row(workload: str, seconds) -> None:
    print(f"| {workload} | {seconds['defaults']:.2f} | {seconds['plain']:.2f} | {seconds['defaults'] / seconds['plain']:.1f}x |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["mlp", "small_cnn", "resnet18"], choices=["mlp", "small_cnn", "resnet18"])
    a = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads\n"
          "| workload | defaults s | plain s | defaults / plain |\n|---|---|---|---|")
    for part in a.part:
        {"mlp": mlp, "small_cnn": small_cnn, "resnet18": resnet18}[part]()


if __name__ == "__main__":
    main()
