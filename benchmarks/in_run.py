"""In-run TracIn (tracin.InRun, tracin train --in_run): what recording costs against the same training loop without it,
and how well its self-influence finds flipped labels against the checkpoint default, in this process.

  overhead: one process, the same seeded loop with and without the recorder (best of 3 after a warm-up), every layer
            in scope, with 0, 32 and 256 query examples (their gradients at every step's weights):
            mlp    digits-sized MLP 64-256-256-10, 2,048 examples, batch 64, 1 epoch (32 steps);
            cnn    3-conv CNN without normalisation, 16 px RGB, 1,024 examples, batch 64, 1 epoch (16 steps);
            gpt2   Hugging Face GPT-2 2x64, T=64, vocabulary 512, 256 sequences, batch 16, 1 epoch (16 steps),
                   every layer but the tied token table and head and the position table (refused in-run: shared, broadcast).
  mislabel: `tracin train --in_run` on an image folder with 10% of the training labels flipped (uniform), against the
            same training without --in_run (seconds, the better of two alternating runs each) and against `tracin influence --self_influence` on its
            checkpoints (the checkpoint default: K-FAC over the output layer's bias): ROC AUC and recall in the top 10%
            of the flipped labels; digits (the demo's data, smallcnn 16 px, 12 epochs) and shapes (generated, 24 px).

    python benchmarks/in_run.py [--part overhead mislabel] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tracin import InRun, Indexed


def _mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def _workload(name: str):
    """(model builder, training set (index, x, y), query set builder (n -> dataset), per-example loss, settings, batch)."""
    g = torch.Generator().manual_seed(0)
    if name == "gpt2":
        from datasets import Dataset
        from transformers import GPT2Config, GPT2LMHeadModel

        from tracin.tasks import HFTask

        config = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=2, n_positions=64)
        ids = torch.randint(0, 512, (256 + 256, 64), generator=g)
        train = Indexed([{"input_ids": row} for row in ids[:256]])
        queries = lambda n: Dataset.from_dict({"input_ids": ids[256:256 + n].tolist()}).with_format("torch")  # noqa: E731
        task = HFTask("causal_lm")
        return (lambda: GPT2LMHeadModel(config), train, queries, lambda m, b: task.loss(m, b), task,
                {"exclude": ["transformer.wte", "transformer.wpe", "lm_head"]}, 16)
    shape, n, build = ((64,), 2048, _mlp) if name == "mlp" else ((3, 16, 16), 1024, _cnn)
    x, y = torch.randn(n + 256, *shape, generator=g), torch.randint(0, 10, (n + 256,), generator=g)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    return (build, Indexed(TensorDataset(x[:n], y[:n])), lambda q: TensorDataset(x[n:n + q], y[n:n + q]), loss, None, {}, 64)


def _epoch(name: str, queries: int = -1) -> float:
    """Seconds of one seeded epoch of the workload: without the recorder (queries -1) or with it and that many queries."""
    build, train, make_queries, loss_of, task, settings, batch = _workload(name)
    torch.manual_seed(0)
    model = build()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    recorder = None
    if queries >= 0:
        recorder = InRun(model, opt, len(train), queries=make_queries(queries) if queries else None, task=task,
                         top_k=min(10, len(train)), query_batch_size=64, **settings)
    loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    begin = time.perf_counter()
    for item in loader:
        ids, batch_data = (item["index"], {k: v for k, v in item.items() if k != "index"}) if isinstance(item, dict) \
            else (item[0], item[1:])
        opt.zero_grad()
        losses = loss_of(model, batch_data)
        if recorder is not None:
            recorder.backward(losses, ids)
        else:
            losses.mean().backward()
        opt.step()
    seconds = time.perf_counter() - begin
    if recorder is not None:
        recorder.remove()
    return seconds


def overhead() -> None:
    print(f"{'workload':8s} {'plain loop':>11s} {'0 queries':>12s} {'32 queries':>12s} {'256 queries':>12s}")
    for name in ("mlp", "cnn", "gpt2"):
        best = {}
        for queries in (-1, 0, 32, 256):
            _epoch(name, queries)  # warm-up
            best[queries] = min(_epoch(name, queries) for _ in range(3))
        base = best[-1]
        cells = " ".join(f"{best[q]:6.2f}s {best[q] / base:4.2f}x" for q in (0, 32, 256))
        print(f"{name:8s} {base:10.2f}s {cells}")


def _flipped(folder: Path) -> set:
    with open(folder / "injected_noise.csv", newline="") as handle:
        return {Path(r["file"]).name for r in csv.DictReader(handle)}


def _detection(results: Path, flipped: set) -> tuple:
    from tracin.workflows.evaluation.common import recall_at, roc_auc

    with open(results / "self_influence.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    scores = np.array([float(r["score"]) for r in rows])
    positive = np.array([Path(r["train_file"]).name in flipped for r in rows])
    return roc_auc(scores, positive), recall_at(scores, positive)["10%"]


def mislabel(seeds) -> None:
    from tracin.config import ScoringConfig
    from tracin.workflows.demo import DEMO_TRAINING
    from tracin.workflows.image.digits import write_digits_folder
    from tracin.workflows.image.influence import InfluenceJob, run_influence
    from tracin.workflows.image.noise import inject_label_noise
    from tracin.workflows.image.shapes import write_shapes_folder
    from tracin.workflows.image.train import ImageTraining, train_image_classifier

    print(f"{'data':7s} {'seed':>4s} {'train':>7s} {'+in-run':>8s} {'ratio':>6s} {'AUC ckpt':>9s} {'AUC in-run':>10s} "
          f"{'top10% ckpt':>11s} {'top10% in-run':>13s}")
    for data in ("digits", "shapes"):
        for seed in seeds:
            root = Path(tempfile.mkdtemp())
            if data == "digits":
                write_digits_folder(root / "data", noise_rate=0.0, seed=seed)
                settings = dict(DEMO_TRAINING)
            else:
                write_shapes_folder(root / "clean", n_train=120, n_test=30, size=24, seed=seed)
                settings = dict(DEMO_TRAINING, image_size=24)
            inject_label_noise(root / ("data" if data == "digits" else "clean"), root / "noisy", 0.1, seed)
            flipped = _flipped(root / "noisy")
            seconds = {"plain": float("inf"), "in_run": float("inf")}
            for attempt in range(2):  # alternating, the better of two each: this machine's timings vary by 10-20%
                for name, extra in (("plain", {}), ("in_run", {"in_run": root / "in_run"})):
                    shutil.rmtree(root / f"ck_{name}", ignore_errors=True)
                    begin = time.perf_counter()
                    train_image_classifier(root / "noisy", root / f"ck_{name}", ImageTraining(seed=seed, **settings, **extra),
                                           torch.device("cpu"), False)
                    seconds[name] = min(seconds[name], time.perf_counter() - begin)
            run_influence(InfluenceJob(root / "noisy", root / "ck_plain", root / "ckpt", top_k=10, self_influence=True,
                                       scoring=ScoringConfig(layers="last", batch_size=256, progress=False)))
            (auc_c, top_c), (auc_i, top_i) = _detection(root / "ckpt", flipped), _detection(root / "in_run", flipped)
            print(f"{data:7s} {seed:4d} {seconds['plain']:6.1f}s {seconds['in_run']:7.1f}s {seconds['in_run'] / seconds['plain']:5.2f}x "
                  f"{auc_c:9.4f} {auc_i:10.4f} {top_c:11.3f} {top_i:13.3f}")
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["overhead", "mislabel"], choices=["overhead", "mislabel"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = p.parse_args()
    if "overhead" in a.part:
        overhead()
    if "mislabel" in a.part:
        mislabel(a.seeds)


if __name__ == "__main__":
    main()
