"""tracin vs Captum's TracInCP on the same data, model and checkpoints, in one process.

Workloads (defaults follow docs/benchmarks.md):
  mlp: MLP 784-512-10, 4096 train x 32 test, 3 checkpoints, all layers
  cnn: PyTorch's MNIST example CNN (2 conv + 2 linear, 1.2M params), 1024 train x 32 test, 3 checkpoints, all layers
  tinycnn: a 57k-parameter CNN, same sizes as cnn: the case where an exact method can gain least

`--workload fast` runs the fast-mode comparisons of fast_modes.py (last layer vs TracInCPFast and
TracInCPFastRandProj, projection agreement, self-influence on 50k examples, scaling plot).

Both tools score the full [n_test, n_train] TracInCP matrix (Captum: TracInCP with
sample_wise_grads_per_batch=True, k=None). The script prints each time, the speed-up and the
largest score difference relative to the largest score. Run:

    python benchmarks/vs_captum.py --workload all
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fast_modes
from tracin import Checkpoint, TracIn, save_checkpoint
from tracin.engine.scheduler import PRECISION_MODES as PRECISIONS
from tracin.device import set_float32_math


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))


def mnist_cnn() -> nn.Module:
    """The CNN of PyTorch's MNIST example (1.2M parameters; dropout is off in eval mode)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def tiny_cnn() -> nn.Module:
    """57k parameters, most of them in convolutions over many positions: per-example gradients are
    cheap here, so the forward/backward pass every exact method pays dominates."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def make_data(n: int, seed: int):
    """Ten Gaussian clusters in 1x28x28 space (a learnable, MNIST-shaped problem)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + 1.5 * torch.randn(n, 1, 28, 28, generator=g)
    return x, y


def train_with_checkpoints(model: nn.Module, x, y, folder: Path, n_ckpt: int, device) -> list:
    """Three short epochs of SGD with a decaying learning rate, a checkpoint after each."""
    model.to(device).train()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    paths = []
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    for epoch in range(1, n_ckpt + 1):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
            opt.step()
        paths.append(save_checkpoint(folder / f"ckpt_{epoch}.pt", model.state_dict(), learning_rate=lr, epoch=epoch))
        lr *= 0.5
        for group in opt.param_groups:
            group["lr"] = lr
    return paths


def run_workload(name: str, n_train: int, n_test: int, n_ckpt: int, device: torch.device, batch_size: int, skip_captum: bool,
                 repeats: int = 1, precision: str = "fp32", precondition: str = "none") -> dict:
    """Time both tools on one workload; with ``repeats`` > 1 they alternate and the medians are reported
    (the first, cold run of each then does not decide the figure). Both run under the same float32 math:
    ``precision`` "fp32" (full float32; cuDNN would otherwise use TF32 for Captum's convolutions on
    NVIDIA GPUs) or "tf32"."""
    import statistics

    from captum.influence import TracInCP

    torch.manual_seed(0)
    model = {"mlp": mlp, "cnn": mnist_cnn, "tinycnn": tiny_cnn}[name]()
    x, y = make_data(n_train + n_test, seed=0)
    train = TensorDataset(x[:n_train], y[:n_train])
    test_x, test_y = x[n_train:], y[n_train:]
    test = TensorDataset(test_x, test_y)
    with tempfile.TemporaryDirectory() as tmp:
        paths = train_with_checkpoints(model, x[:n_train], y[:n_train], Path(tmp), n_ckpt, device)
        model.eval()

        def ours_matrix():  # checkpoint discovery and loading included in the time
            tr = TracIn(model, Checkpoint.discover(tmp), layers="all", device=device, batch_size=batch_size, progress=False,
                        precision=precision, precondition=precondition)
            return tr, tr.influence_matrix(train, test)

        def captum_matrix():
            model.to(device)
            captum = TracInCP(model, fast_modes.on_device(train, device), checkpoints=[str(p) for p in paths],
                              checkpoints_load_func=fast_modes.captum_loader(device),
                              loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size,
                              sample_wise_grads_per_batch=True)
            restore = set_float32_math(PRECISIONS[precision][1])
            try:
                return captum.influence((test_x.to(device), test_y.to(device)), k=None).detach().cpu()
            finally:
                restore()

        t_ours, t_topk, t_captum = [], [], []
        for _ in range(repeats):
            (tr, ours), t = fast_modes.timed(ours_matrix, device)
            t_ours.append(t)
            t_topk.append(fast_modes.timed(lambda: tr.influence(train, test, top_k=10), device)[1])
            if not skip_captum:
                theirs, t = fast_modes.timed(captum_matrix, device)
                t_captum.append(t)

        result = {"workload": name, "precision": precision, "precondition": precondition, "n_train": n_train, "n_test": n_test, "checkpoints": n_ckpt, "repeats": repeats,
                  "params": tr.num_parameters, "tracin_matrix_s": statistics.median(t_ours),
                  "tracin_topk10_s": statistics.median(t_topk), "kernels": {r["name"]: r["kernel"] for r in tr.scope()}}
        if skip_captum:
            return result
        diff = float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()) if precondition == "none" else float("nan")
        result.update({"captum_matrix_s": statistics.median(t_captum), "speedup": statistics.median(t_captum) / result["tracin_matrix_s"],
                       "max_rel_diff": diff})
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["mlp", "cnn", "tinycnn", "all", "lastlayer", "lastlayer_sweep", "projection", "projection_conv", "selfinfluence", "scaling", "fast"],
                        default="all", help="all: the exact workloads; fast: lastlayer, projection, selfinfluence, scaling")
    parser.add_argument("--with_slow_peer", action="store_true", help="selfinfluence: also run Captum TracInCP on all layers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--mlp_train", type=int, default=4096)
    parser.add_argument("--cnn_train", type=int, default=1024)
    parser.add_argument("--n_test", type=int, default=32)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--skip_captum", action="store_true")
    parser.add_argument("--precondition", choices=["none", "auto"], default="none",
                        help="exact workloads: tracin's preconditioner (auto: its default, K-FAC; Captum has none)")
    parser.add_argument("--precision", choices=["fp32", "tf32"], default="fp32", help="exact workloads: float32 math for both tools")
    parser.add_argument("--repeats", type=int, default=1, help="exact workloads: alternate the tools this many times, report medians")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from tracin.device import resolve_device

    device = resolve_device(args.device)
    print(f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    fast = ["lastlayer", "projection", "projection_conv", "selfinfluence", "scaling"]
    if args.workload in fast + ["fast", "lastlayer_sweep"]:
        helpers = (make_data, mlp, train_with_checkpoints)
        results = {}
        for name in (fast if args.workload == "fast" else [args.workload]):
            if name == "selfinfluence":
                rows = fast_modes.selfinfluence(device, helpers, args.batch_size, args.with_slow_peer)
            elif name == "scaling":
                plot = "scaling.png" if device.type == "cpu" else f"scaling_{device.type}.png"
                rows = fast_modes.scaling(device, helpers, Path(__file__).resolve().parents[1] / "docs" / plot, args.batch_size)
            else:
                rows = getattr(fast_modes, name)(device, helpers, args.batch_size)
            results[name] = rows
            print(f"## {name}")
            for row in rows:
                print("  " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    names = ["mlp", "cnn", "tinycnn"] if args.workload == "all" else [args.workload]
    rows = []
    for name in names:
        n_train = args.mlp_train if name == "mlp" else args.cnn_train
        row = run_workload(name, n_train, args.n_test, args.checkpoints, device, args.batch_size, args.skip_captum, args.repeats,
                           args.precision, args.precondition)
        rows.append(row)
        line = f"{name} ({row['precision']}, precondition {row['precondition']}): {row['n_train']} train x {row['n_test']} test x {row['checkpoints']} ckpts, {row['params']} params | " \
               f"tracin matrix {row['tracin_matrix_s']:.3f}s, top-10 {row['tracin_topk10_s']:.3f}s"
        if "captum_matrix_s" in row:
            line += f" | captum {row['captum_matrix_s']:.3f}s | speed-up x{row['speedup']:.1f} | max rel diff {row['max_rel_diff']:.1e}"
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
