"""Accuracy and speed of each --precision (fp32, tf32, bf16, fp16), in one process.

Accuracy: every precision against the float64 torch.func reference of tests/reference.py on the
test models (MLP; CNN with BatchNorm and GroupNorm; Conv1d; sequence model with Embedding and
LayerNorm), all layers: max |error| / max |score| and Spearman's rank correlation.

Speed: exact top-10 on the MNIST-example CNN of vs_captum.py (conv32, conv64, fc 9216-128-10),
all layers, each precision timed ``--repeats`` times in turn (median), with top-10 overlap and
Spearman of its full matrix against fp32's.

On a CPU tf32 equals fp32 (TensorFloat-32 is an NVIDIA tensor-core format). Run:

    python benchmarks/precision.py --device cuda --n_train 8192 --n_test 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from models import perturbed_checkpoints  # noqa: E402
from reference import reference_matrix, rel_err  # noqa: E402
from test_exact import all_module_names, make_case  # noqa: E402
from tracin import Checkpoint, TracIn  # noqa: E402
from tracin.workflows.audit import compare  # noqa: E402
from tracin.device import resolve_device  # noqa: E402
from fast_modes import timed  # noqa: E402
from vs_captum import make_data, mnist_cnn, train_with_checkpoints  # noqa: E402

PRECISIONS = ["fp32", "tf32", "bf16", "fp16"]


def accuracy(device: torch.device) -> list:
    rows = []
    for kind in ["mlp", "cnn", "conv1d", "seq"]:
        model, train, test = make_case(kind, 40, 8)
        ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05])
        want = reference_matrix(model, raw, all_module_names(model), train, test)
        for precision in PRECISIONS:
            got = TracIn(model, ckpts, device=device, batch_size=8, progress=False, precision=precision, precondition="none").influence_matrix(
                TensorDataset(*train), TensorDataset(*test))
            rows.append({"model": kind, "precision": precision, "max_rel_err": rel_err(got, want),
                         "spearman": compare(want.float(), got, top=5)["spearman"]})
    return rows


def speed(device: torch.device, n_train: int, n_test: int, batch_size: int, repeats: int) -> list:
    torch.manual_seed(0)
    model = mnist_cnn()
    x, y = make_data(n_train + n_test, seed=0)
    train, test = TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
    with tempfile.TemporaryDirectory() as tmp:
        train_with_checkpoints(model, x[:n_train], y[:n_train], Path(tmp), 3, device)
        model.eval()
        ckpts = Checkpoint.discover(tmp)
        scorers = {p: TracIn(model, ckpts, device=device, batch_size=batch_size, progress=False, precision=p, precondition="none") for p in PRECISIONS}
        matrices = {p: tr.influence_matrix(train, test) for p, tr in scorers.items()}  # also warms every path up
        times = {p: [] for p in PRECISIONS}
        for _ in range(repeats):
            for p, tr in scorers.items():
                times[p].append(timed(lambda: tr.influence(train, test, top_k=10), device)[1])
    base = statistics.median(times["fp32"])
    return [{"precision": p, "n_train": n_train, "n_test": n_test, "top10_s": statistics.median(times[p]),
             "speedup_vs_fp32": base / statistics.median(times[p]),
             "max_rel_diff_vs_fp32": rel_err(matrices[p], matrices["fp32"].double()),
             **compare(matrices["fp32"], matrices[p], top=10)} for p in PRECISIONS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n_train", type=int, default=1024)
    parser.add_argument("--n_test", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"# torch {torch.__version__}, device {name}")
    results = {"accuracy": accuracy(device), "speed": speed(device, args.n_train, args.n_test, args.batch_size, args.repeats)}
    for section, rows in results.items():
        print(f"## {section}")
        for row in rows:
            print("  " + " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
