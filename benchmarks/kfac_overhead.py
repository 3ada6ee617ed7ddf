"""What K-FAC preconditioning costs: self-influence with ``precondition="kfac"`` against plain TracIn,
both in this process, on the checkpoints of a ``tracin train`` run (or of a ``tracin evaluate`` seed).

The preconditioner adds one forward and backward pass over the training set per checkpoint (to fit
the two Kronecker factors of each layer) and a small matmul per batch (to whiten the factors), so
expect about twice the plain cost for self-influence and much less for influence, whose cost is
dominated by the test x train products:

    tracin evaluate mislabel --data digits --noise_rate 0.1 --seeds 0 --output_dir O
    python benchmarks/kfac_overhead.py --data_dir O/work/noisy_seed0 --checkpoint_dir O/work/noisy_seed0/checkpoints

Prints, per scope, the median seconds of ``--repeats`` alternating runs and the ratio kfac / plain.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tracin import TracIn
from tracin.workflows.image.setup import image_setup
from tracin.engine.scope import kfac_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", type=Path, required=True)
    p.add_argument("--checkpoint_dir", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--test_images", type=int, default=200, help="test images for the influence timing")
    a = p.parse_args()
    setup = image_setup(a.data_dir, a.checkpoint_dir)
    from torch.utils.data import Subset

    test = Subset(setup.test, range(min(a.test_images, len(setup.test))))
    convs_and_linears = kfac_layers(setup.model)
    print(f"{len(setup.train)} training images, {len(test)} test images, {len(setup.checkpoints)} checkpoints")
    print("| scope | work | plain (s) | kfac (s) | kfac / plain |\n|---|---|---|---|---|")
    for scope_name, layers in (("last layer", "last"), ("every Conv/Linear layer", convs_and_linears)):
        for work in ("self-influence", "influence top-10"):
            times = {"none": [], "kfac": []}
            for _ in range(a.repeats):
                for pre in ("none", "kfac"):
                    tr = TracIn(setup.model, setup.checkpoints, layers=layers, device=a.device, batch_size=256,
                                progress=False, precondition=pre)
                    start = time.perf_counter()
                    if work == "self-influence":
                        tr.self_influence(setup.train)
                    else:
                        tr.influence(setup.train, test, top_k=10)
                    times[pre].append(time.perf_counter() - start)
            plain, kfac = statistics.median(times["none"]), statistics.median(times["kfac"])
            print(f"| {scope_name} | {work} | {plain:.2f} | {kfac:.2f} | {kfac / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
