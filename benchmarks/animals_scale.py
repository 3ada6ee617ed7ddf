"""The original tools' full workload shape, end to end through `tracin influence`.

Animals-10 shape: 20,893 train x 5,224 test images at 224x224, 10 classes, ResNet50, 8 checkpoints,
top-100, last layer. The original tools took 1-2 hours for this on one GPU. The images are
generated (class-coloured noise, JPEG) so nothing is downloaded; checkpoints are random-init
ResNet50 weights with small perturbations (influence cost does not depend on the weight values).

    python benchmarks/animals_scale.py --workdir /tmp/animals            # full size (GPU)
    python benchmarks/animals_scale.py --scale 0.01 --arch resnet18 --image_size 64   # smoke test (CPU)

Prints the time of each stage (image scan and check, influence, predictions and writing) and the total.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch


def _write_class(args) -> int:
    from PIL import Image

    root, split, label, count, size, seed = args
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(label).integers(30, 225, 3)
    folder = Path(root) / split / f"class_{label}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = np.clip(base + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{split}_{label}_{i:05d}.jpg", quality=85)
    return count


def generate(root: Path, n_train: int, n_test: int, classes: int, size: int, workers: int) -> None:
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        per = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
        jobs += [(str(root), split, c, per[c], size, hash((split, c)) % 2**31) for c in range(classes)]
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(_write_class, jobs)) == n_train + n_test


def make_checkpoints(folder: Path, arch: str, classes: int, size: int, count: int) -> None:
    from tracin import save_checkpoint
    from tracin.workflows.image.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, classes)
    names = [f"class_{c}" for c in range(classes)]
    for epoch in range(1, count + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        save_checkpoint(folder / f"checkpoint_epoch_{epoch}.pt", model.state_dict(), learning_rate=0.01, epoch=epoch,
                        class_names=names, arch=arch, image_size=size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("bench_out/animals"))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the full set sizes")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--top_k", type=int, default=100)
    p.add_argument("--layers", default="last")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    from tracin.workflows.parser import parse_layers
    from tracin.config import ScoringConfig
    from tracin.workflows.image.influence import InfluenceJob, run_influence

    n_train, n_test = max(args.top_k, int(20893 * args.scale)), max(10, int(5224 * args.scale))
    data, ckpts, out = args.workdir / "data", args.workdir / "checkpoints", args.workdir / "results"
    t0 = time.perf_counter()
    if not (data / "train").is_dir():
        generate(data, n_train, n_test, 10, args.image_size, max(1, os.cpu_count() or 1))
    if not ckpts.is_dir():
        make_checkpoints(ckpts, args.arch, 10, args.image_size, args.checkpoints)
    t_gen = time.perf_counter() - t0
    scoring = ScoringConfig(layers=parse_layers(args.layers), batch_size=args.batch_size, num_workers=args.num_workers,
                            progress=False)
    job = InfluenceJob(data, ckpts, out, top_k=args.top_k, device=args.device, scoring=scoring)
    t1 = time.perf_counter()
    manifest = run_influence(job)
    total = time.perf_counter() - t1
    t = manifest["timings"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# {n_train} train x {n_test} test, {args.arch} {args.image_size}px, {args.checkpoints} checkpoints, top-{args.top_k}, "
          f"layers={args.layers}, device {manifest['device']} ({gpu}), torch {torch.__version__}")
    print(f"data generation (not timed as workload): {t_gen:.1f}s")
    print(f"scan+check {t['scan_s']:.1f}s | influence {t['influence_s']:.1f}s | predictions {t['predictions_s']:.1f}s | "
          f"end to end {total:.1f}s | engine {json.dumps(manifest['engine'])}")


if __name__ == "__main__":
    main()
