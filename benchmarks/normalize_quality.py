"""Proponent quality of the score variants (normalize none / cosine / train, each plain or K-FAC
preconditioned) on a demo run.

    tracin demo --output_dir /tmp/demo1      # once: digits with 10% flipped labels, checkpoints
    python benchmarks/normalize_quality.py --demo_dir /tmp/demo1 [--layers last] [--precondition none kfac]

K-FAC covers Linear and Conv layers only, so with ``--layers all`` its rows score every Conv/Linear
layer (the batch-norm parameters left out).

For every test image's top-k proponents and opponents: the share of proponents with the test image's
label, the share of proponents and opponents whose label was flipped, and how many distinct training
images fill the proponent lists (few = a handful of large-gradient examples dominate).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from tracin import TracIn
from tracin.workflows.image.setup import image_setup
from tracin.engine.scope import kfac_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_dir", type=Path, required=True)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--layers", default="all")
    p.add_argument("--precondition", nargs="+", default=["none"], choices=["none", "kfac"])
    args = p.parse_args()
    s = image_setup(args.demo_dir / "data", args.demo_dir / "checkpoints")
    flipped = {Path(r["file"]).name for r in csv.DictReader(open(args.demo_dir / "data" / "injected_noise.csv"))}
    train_labels, test_labels = torch.tensor(s.train_split.labels), torch.tensor(s.test_split.labels)
    is_flipped = torch.tensor([path.name in flipped for path in s.train_split.paths])
    print("| normalize | precondition | proponents sharing the test label | proponents flipped | opponents flipped | distinct proponents | seconds |")
    print("|---|---|---|---|---|---|---|")
    factor_layers = kfac_layers(s.model)
    for precondition, normalize in ((pre, norm) for pre in args.precondition for norm in ("none", "cosine", "train")):
        layers = factor_layers if precondition == "kfac" and args.layers == "all" else args.layers
        tr = TracIn(s.model, s.checkpoints, layers=layers, device="cpu", batch_size=256, progress=False, normalize=normalize,
                    precondition=precondition)
        start = time.perf_counter()
        res = tr.influence(s.train, s.test, top_k=args.top_k)
        seconds = time.perf_counter() - start
        pro, opp = res.proponents.indices, res.opponents.indices
        print(f"| {normalize} | {precondition} | {(train_labels[pro] == test_labels[:, None]).float().mean():.3f} | "
              f"{is_flipped[pro].float().mean():.3f} | {is_flipped[opp].float().mean():.3f} | "
              f"{len(set(pro.flatten().tolist()))} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
