"""Fast modes against Captum and against tracin's own exact answer (used by vs_captum.py).

  lastlayer:     tracin layers="last" (exact, bias included) vs Captum TracInCPFast and
                 TracInCPFastRandProj on the MLP workload; speed and agreement with the exact scores.
  lastlayer_sweep: tracin layers="last" vs TracInCPFast alone at 32, 1024 and 4096 test examples,
                 medians of alternating repeats, beside the forward pass both must run.
  projection:    tracin projection to 1024 dims (three kinds) vs tracin exact, all layers, MLP workload.
  selfinfluence: self-influence of 50,000 training examples (tracin exact all layers and last layer,
                 Captum TracInCPFast last layer; Captum TracInCP all layers with --with_slow_peer).
  scaling:       tracin exact time against n_train and n_test; writes docs/scaling.png.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tracin import Checkpoint, TracIn
from tracin.workflows.audit import compare


def timed(fn: Callable, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _setup(n_train: int, n_test: int, device, make_data, mlp, train_with_checkpoints, folder: Path):
    torch.manual_seed(0)
    model = mlp()
    x, y = make_data(n_train + n_test, seed=0)
    paths = train_with_checkpoints(model, x[:n_train], y[:n_train], folder, 3, device)
    model.eval()
    # warm-up (thread pools, allocator) so the first timed method is not charged for it
    TracIn(model, Checkpoint.discover(folder), device=device, progress=False, precondition="none").influence_matrix(
        TensorDataset(x[:64], y[:64]), TensorDataset(x[:2], y[:2]))
    return model, TensorDataset(x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), paths


def on_device(dataset: TensorDataset, device) -> TensorDataset:
    """The dataset with its tensors on ``device``: Captum's influence classes do not move training
    batches to the model's device themselves."""
    return TensorDataset(*(t.to(device) for t in dataset.tensors))


def captum_loader(device):
    def load(m: nn.Module, path: str) -> float:
        ck = torch.load(path, map_location=device, weights_only=True)
        m.load_state_dict(ck["model_state_dict"])
        return float(ck["learning_rate"])
    return load


def lastlayer(device, helpers, batch_size: int = 256, test_sizes=(32, 1024)) -> List[Dict]:
    """Each test-set size is its own comparison: Captum's TracInCPFast recomputes the test batch's
    last-layer factors for every (training batch, checkpoint) pair, tracin once per checkpoint, so
    the gap grows with the test set."""
    from captum.influence import TracInCPFast, TracInCPFastRandProj

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, train, (tx_all, ty_all), paths = _setup(4096, max(test_sizes), device, *helpers, Path(tmp))
        for n_test in test_sizes:
            tx, ty = tx_all[:n_test], ty_all[:n_test]
            test = TensorDataset(tx, ty)
            exact, t_ours = timed(lambda: TracIn(model, Checkpoint.discover(tmp), layers="last", device=device,
                                                  batch_size=batch_size, progress=False, precondition="none").influence_matrix(train, test), device)
            rows.append({"method": f"tracin last layer (exact, bias incl.), {n_test} test", "seconds": t_ours,
                         "max_rel_diff": 0.0, **compare(exact, exact)})
            model.to(device)
            fc = model[3]
            load, loss = captum_loader(device), nn.CrossEntropyLoss(reduction="sum")
            peers = {
                "captum TracInCPFast": lambda: TracInCPFast(model, fc, on_device(train, device), [str(p) for p in paths], load,
                                                            loss_fn=loss, batch_size=batch_size),
                "captum TracInCPFastRandProj (no projection)": lambda: TracInCPFastRandProj(
                    model, fc, on_device(train, device), [str(p) for p in paths], load, loss_fn=loss, batch_size=batch_size),
                "captum TracInCPFastRandProj (dim 1024)": lambda: TracInCPFastRandProj(
                    model, fc, on_device(train, device), [str(p) for p in paths], load, loss_fn=loss,
                    batch_size=batch_size, projection_dim=1024, seed=0),
            }
            try:
                import annoy  # noqa: F401  (TracInCPFastRandProj's nearest-neighbour index)
            except ImportError:
                print("# annoy is not installed: TracInCPFastRandProj left out")
                peers = {k: v for k, v in peers.items() if "RandProj" not in k}
            for name, make in peers.items():
                def run():
                    return make().influence((tx.to(device), ty.to(device)), k=None).detach().cpu()
                theirs, t = timed(run, device)
                diff = float((theirs.double() - exact.double()).abs().max() / exact.double().abs().max())
                rows.append({"method": f"{name}, {n_test} test", "seconds": t, "speedup_of_tracin": t / t_ours,
                             "max_rel_diff": diff, **compare(exact, theirs)})
    return rows


def lastlayer_sweep(device, helpers, batch_size: int = 256, test_sizes=(32, 1024, 4096), repeats: int = 5) -> List[Dict]:
    """tracin layers="last" against Captum TracInCPFast alone, alternating the two ``repeats`` times
    per test-set size and reporting the medians (this shared machine's timings spread by +-15%), plus
    the time of the model's forward pass over the training set at every checkpoint, which both must pay."""
    import statistics

    from captum.influence import TracInCPFast

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, train, (tx_all, ty_all), paths = _setup(4096, max(test_sizes), device, *helpers, Path(tmp))
        x_train = train.tensors[0].to(device)
        load = captum_loader(device)

        def forward_only():
            with torch.no_grad():
                for path in paths:
                    load(model, str(path))
                    for start in range(0, len(x_train), batch_size):
                        model(x_train[start:start + batch_size])

        model.to(device)
        t_forward = statistics.median(timed(forward_only, device)[1] for _ in range(repeats))
        for n_test in test_sizes:
            test = TensorDataset(tx_all[:n_test], ty_all[:n_test])
            ours, theirs = [], []
            for _ in range(repeats):
                exact, t = timed(lambda: TracIn(model, Checkpoint.discover(tmp), layers="last", device=device,
                                                 batch_size=batch_size, progress=False, precondition="none").influence_matrix(train, test), device)
                ours.append(t)
                model.to(device)
                peer, t = timed(lambda: TracInCPFast(model, model[3], on_device(train, device), [str(p) for p in paths], load,
                                                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size)
                                 .influence((tx_all[:n_test].to(device), ty_all[:n_test].to(device)), k=None).detach().cpu(), device)
                theirs.append(t)
            rows.append({"n_test": n_test, "tracin_s": statistics.median(ours), "captum_fast_s": statistics.median(theirs),
                         "speedup_of_tracin": statistics.median(theirs) / statistics.median(ours),
                         "forward_pass_s": t_forward, "max_rel_diff": float((peer.double() - exact.double()).abs().max()
                                                                          / exact.double().abs().max())})
    return rows


def projection(device, helpers, batch_size: int = 256) -> List[Dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, train, (tx, ty), _ = _setup(4096, 1024, device, *helpers, Path(tmp))
        ckpts = Checkpoint.discover(tmp)
        for n_test in (32, 1024):
            test = TensorDataset(tx[:n_test], ty[:n_test])
            exact, t_exact = timed(lambda: TracIn(model, ckpts, device=device, batch_size=batch_size,
                                                   progress=False, precondition="none").influence_matrix(train, test), device)
            rows.append({"method": f"exact, {n_test} test", "seconds": t_exact, **compare(exact, exact)})
            for kind in ("gaussian", "rademacher", "sparse"):
                approx, t = timed(lambda: TracIn(model, ckpts, device=device, batch_size=batch_size, progress=False,
                                                  projection_dim=1024, projection=kind, seed=0, precondition="none").influence_matrix(train, test), device)
                rows.append({"method": f"projection 1024 {kind}, {n_test} test", "seconds": t, "speedup": t_exact / t,
                             **compare(exact, approx)})
    return rows


def wide_conv() -> nn.Module:
    """A CNN whose 128->256 and 256->256 3x3 convolutions (295k and 590k weights over 16x16 / 8x8
    positions) are materialised by the exact kernel."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # 14x14
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 7x7
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(256, 10),
    )


def projection_conv(device, helpers, batch_size: int = 64) -> List[Dict]:
    """Exact vs projection on large convolutions (all layers), 512 train x 128 test, 3 checkpoints."""
    make_data, _, train_with_checkpoints = helpers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, train, (tx, ty), _ = _setup(512, 128, device, make_data, wide_conv, train_with_checkpoints, Path(tmp))
        ckpts = Checkpoint.discover(tmp)
        test = TensorDataset(tx, ty)
        exact, t_exact = timed(lambda: TracIn(model, ckpts, device=device, batch_size=batch_size,
                                               progress=False, precondition="none").influence_matrix(train, test), device)
        rows.append({"method": "exact (conv layers materialised)", "seconds": t_exact, **compare(exact, exact)})
        for dim in (1024, 4096):
            approx, t = timed(lambda: TracIn(model, ckpts, device=device, batch_size=batch_size, progress=False,
                                              projection_dim=dim, seed=0, precondition="none").influence_matrix(train, test), device)
            rows.append({"method": f"projection {dim} gaussian", "seconds": t, "speedup": t_exact / t, **compare(exact, approx)})
    return rows


def selfinfluence(device, helpers, batch_size: int = 256, with_slow_peer: bool = False) -> List[Dict]:
    from captum.influence import TracInCP, TracInCPFast

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, train, _, paths = _setup(50_000, 1, device, *helpers, Path(tmp))
        ckpts = Checkpoint.discover(tmp)
        exact_all, t_all = timed(lambda: TracIn(model, ckpts, device=device, batch_size=batch_size, progress=False, precondition="none").self_influence(train), device)
        rows.append({"method": "tracin all layers (exact)", "seconds": t_all})
        exact_last, t_last = timed(lambda: TracIn(model, ckpts, layers="last", device=device, batch_size=batch_size,
                                                   progress=False, precondition="none").self_influence(train), device)
        rows.append({"method": "tracin last layer (exact)", "seconds": t_last})
        model.to(device)
        fast = lambda: TracInCPFast(model, model[3], on_device(train, device), [str(p) for p in paths], captum_loader(device),  # noqa: E731
                                    loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size).self_influence().cpu()
        theirs, t = timed(fast, device)
        rows.append({"method": "captum TracInCPFast last layer", "seconds": t, "speedup_of_tracin_last": t / t_last,
                     "max_rel_diff_vs_exact_last": float((theirs.double() - exact_last.double()).abs().max() / exact_last.abs().max())})
        if with_slow_peer:
            slow = lambda: TracInCP(model, on_device(train, device), [str(p) for p in paths], captum_loader(device),  # noqa: E731
                                    loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size,
                                    sample_wise_grads_per_batch=True).self_influence().cpu()
            theirs, t = timed(slow, device)
            rows.append({"method": "captum TracInCP all layers", "seconds": t, "speedup_of_tracin_all": t / t_all,
                         "max_rel_diff_vs_exact_all": float((theirs.double() - exact_all.double()).abs().max() / exact_all.abs().max())})
    return rows


def scaling(device, helpers, out_png: Path, batch_size: int = 256) -> List[Dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, train, (tx, ty), _ = _setup(32_768, 1024, device, *helpers, Path(tmp))
        ckpts = Checkpoint.discover(tmp)
        tr = TracIn(model, ckpts, device=device, batch_size=batch_size, progress=False, precondition="none")
        for n in (1024, 4096, 16_384, 32_768):
            sub = TensorDataset(*train[:n])
            _, t = timed(lambda: tr.influence(sub, TensorDataset(tx[:32], ty[:32]), top_k=10), device)
            rows.append({"axis": "n_train", "n_train": n, "n_test": 32, "seconds": t})
        sub = TensorDataset(*train[:4096])
        for m in (8, 32, 128, 512, 1024):
            _, t = timed(lambda: tr.influence(sub, TensorDataset(tx[:m], ty[:m]), top_k=10), device)
            rows.append({"axis": "n_test", "n_train": 4096, "n_test": m, "seconds": t})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, axis, label in ((axes[0], "n_train", "training examples (32 test)"), (axes[1], "n_test", "test examples (4096 train)")):
        pts = [r for r in rows if r["axis"] == axis]
        ax.loglog([r[axis] for r in pts], [r["seconds"] for r in pts], "o-")
        ax.set(xlabel=label, ylabel="seconds (top-10, 3 checkpoints)", title=f"tracin exact, MLP 784-512-10: time vs {axis}")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return rows
